# The two README commands: `make lab` (the main job) and `make test`. Both set up first (idempotent).
.PHONY: setup lab test test-fast bench
setup:
	bash scripts/setup.sh

lab: setup
	.venv/bin/jupyter lab notebooks/01_quickstart.ipynb

test: setup
	.venv/bin/python -m pytest -q --durations=12

# the edit-test loop: tiny random models only (no bundled model), about a minute
test-fast:
	.venv/bin/python -m pytest -q -m "not slow"

bench:
	.venv/bin/mtplab bench
