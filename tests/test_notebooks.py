"""Every notebook runs top to bottom, offline, on the bundled model."""
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert outputs, "the notebook showed nothing"
    warned = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr" and "Warning" in o.text]
    assert not warned, f"the notebook printed warnings: {warned}"  # a reader sees them; they often mean a time bomb
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "identical output: False" not in text  # notebooks that compare with plain decoding must match it
    assert "✗" not in text  # a notebook's own check of exactness failed (e.g. 02: the round by hand vs mtplab's)
    if path.name.startswith("04_"):
        shown = "".join(o["data"].get("text/html", "") for o in outputs if o.get("data"))
        assert shown.count("mtplab-family-row") == 7 and "mtplab-tree-mask" in shown  # the family, a real tree
    if path.name.startswith("02_"):
        assert "identical to the round by hand ✓" in text and "after rollback" in text
        figures = [json.dumps(o["data"]) for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
        exactness = [f for f in figures if "resampled: rejected mass" in f and "emitted share" in f]
        assert len(exactness) == 2, "the exactness pictures (the draft model, then a deliberately bad drafter)"
        shown = "".join(o["data"].get("text/html", "") for o in outputs if o.get("data"))
        assert "mtplab-cache-view" in shown and "after rollback" in shown  # the KV-cache rows of mtplab's round
