# The two README commands: `make lab` (the main job) and `make test`. Both set up first (idempotent).
.PHONY: setup lab test test-fast bench
setup:
	bash scripts/setup.sh

# JupyterLab refuses to start as root without --allow-root (containers and cloud VMs often run as root)
LAB_FLAGS := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: setup
	.venv/bin/jupyter lab $(LAB_FLAGS) notebooks/01_quickstart.ipynb

test: setup
	.venv/bin/python -m pytest -q --durations=12

# the edit-test loop: tiny random models only (no bundled model), about a minute
test-fast:
	.venv/bin/python -m pytest -q -m "not slow"

bench:
	.venv/bin/mtplab bench
