"""The one prepared command that makes a drafter end to end (scripts/make_mtp_drafter.py: the target's answers,
then training) runs, resumes, and writes a folder the CPU side loads and exports. It is the command a GPU session
runs with --device cuda and a few minutes of budget, so it must not fail there on something a CPU run would catch."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mtplab
from mtplab.cli import main
from mtplab.drafters.eagle import Eagle3Drafter
from mtplab.drafters.mtp import MTPDrafter

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--limit", "6", "--max-new-tokens", "12", "--gen-minutes", "1", "--train-minutes", "0.5",
         "--train-batch", "2", "--batch-size", "4", "--draft-vocab", "512"]


def make(out: Path, steps: int, heads: str) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_mtp_drafter.py"), str(out), *SMALL,
                        "--heads", heads, "--steps", str(steps)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("heads", ["eagle3", "1x256"])
def test_the_one_command_makes_a_drafter_that_loads_decodes_exactly_and_exports(tmp_path, bundled, heads):
    out = tmp_path / "run"
    log = make(out, 4, heads)
    assert "a_greedy: 6 sequences, 72 answer tokens" in log and log.rstrip().endswith("done")
    shards = {p: p.stat().st_mtime_ns for p in out.glob("*/shard_*.pt")}
    assert {p.parent.name for p in shards} == {"a_greedy", "b_greedy", "a_t07"}
    assert (out / "data_a_greedy_tokens.npy").exists()

    again = make(out, 6, heads)  # the same command with more steps: no data made again, training resumes
    assert "resuming from step 4 of 6" in again and "step 6 head 0 " in again
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/shard_*.pt")} == shards

    drafter = mtplab.load_drafter(str(out / "train" / "head0"), bundled)
    assert isinstance(drafter, Eagle3Drafter if heads == "eagle3" else MTPDrafter)
    prompt = "Name three primary colours."
    plain = mtplab.SpeculativeDecoder(bundled, None).generate(prompt, max_new_tokens=16)
    spec = mtplab.SpeculativeDecoder(bundled, drafter, num_draft_tokens=3, schedule="constant").generate(
        prompt, max_new_tokens=16)
    assert spec.token_ids == plain.token_ids and spec.metrics.drafted > 0

    if heads != "eagle3":
        return  # (MTP heads have no vLLM format: the export refuses them, tests/test_export.py)
    assert main(["export-drafter", str(tmp_path / "vllm"), "--format", "speculators", "--drafter",
                 str(out / "train" / "head0")]) == 0
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    # the draft vocabulary: the most frequent answer tokens, at most --draft-vocab (this tiny corpus has fewer)
    assert config["speculators_model_type"] == "eagle3" and config["draft_vocab_size"] == len(drafter.vocab_ids) <= 512
