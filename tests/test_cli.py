"""The command line, run in-process on the bundled model, and the benchmark table on synthetic rows."""
import json

import pytest

from mtplab.bench import format_table, load_prompts
from mtplab.cli import main
from mtplab.kernels import cpu_model


@pytest.fixture
def no_color(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")


@pytest.mark.slow
def test_run_marks_accepted_tokens_on_a_repetition_prompt(no_color, capsys, tmp_path):
    path = tmp_path / "trace.json"
    code = main(["run", "Repeat after me: the cat sat on the mat.", "--drafter", "prompt-lookup", "-k", "4",
                 "--max-new-tokens", "16", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("legend: [+accepted] [-rejected] [!correction] [*bonus] plain")
    assert "[+ sat]" in out or "[+ on]" in out  # prompt lookup copies the sentence from the prompt
    assert "\x1b[" not in out  # NO_COLOR: markers, no escape codes
    assert "acceptance rate" in out and "tokens/s" in out
    trace = json.loads(path.read_text())
    assert trace["config"]["drafter"] == "prompt-lookup" and trace["rounds"]


@pytest.mark.slow
def test_run_without_drafter_prints_plain_tokens(no_color, capsys):
    assert main(["run", "Say hello.", "--drafter", "none", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    body = out.split("\n", 1)[1].split("rounds ")[0]
    assert not any(mark in body for mark in ("[+", "[-", "[!", "[*"))  # every token is the target's own
    assert "acceptance rate 0.00 (0/0 drafted)" in out


@pytest.mark.parametrize("args, name", [(["--top-p", "0"], "top_p"), (["--temperature", "-1"], "temperature")])
def test_bad_sampling_values_exit_2_with_a_message(capsys, args, name):
    with pytest.raises(SystemExit) as e:
        main(["run", "hello", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err


@pytest.mark.slow
def test_bad_draft_length_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "hello", "-k", "0"])
    assert e.value.code == 2
    assert "num_draft_tokens" in capsys.readouterr().err


def test_shipped_prompts():
    prompts = load_prompts()
    assert len(prompts) == 10
    assert len({p["id"] for p in prompts}) == 10
    assert all(p["prompt"].strip() for p in prompts)


def test_format_table_on_synthetic_rows():
    rows = [
        dict(engine="mtplab", method="prompt-lookup", gamma=4, schedule="auto", mean_gamma=3.2, temperature=0.0,
             mean_acceptance_length=2.5,
             acceptance_rate=0.6123, tokens_per_second=30.0, plain_tokens_per_second=20.0, speedup=1.5,
             draft_cost_ratio=0.001, exact=True, prompts=3, max_new_tokens=32, device="cpu"),
        dict(engine="transformers", method="prompt-lookup", gamma=4, temperature=0.7, tokens_per_second=25.0,
             plain_tokens_per_second=21.25, speedup=1.1765, exact=None, prompts=3, max_new_tokens=32, device="cpu"),
    ]
    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows) + 1  # header, rule, rows, footer
    assert lines[0].split()[:7] == ["engine", "method", "γ", "schedule", "mean", "γ", "T"]
    assert "1.50x" in lines[2] and "yes" in lines[2] and "0.61" in lines[2] and " auto " in lines[2]
    assert "3.2" in lines[2]
    assert "1.18x" in lines[3] and lines[3].split()[3:7] == ["-", "-", "0.7", "-"]  # no schedule, no acceptance length
    assert lines[-1].startswith("speedup = plain s/token / speculative s/token, measured interleaved in this run")
    assert "3 prompts, 32 new tokens" in lines[-1] and f"machine: {cpu_model()}, " in lines[-1]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule line up


def test_make_lab_starts_jupyterlab_as_root_too():
    """`make lab` (the README's main command) passes --allow-root exactly when the user is root."""
    import os
    import subprocess
    from pathlib import Path

    out = subprocess.run(["make", "-n", "lab"], cwd=Path(__file__).parent.parent, capture_output=True, text=True,
                         check=True).stdout
    line = next(ln for ln in out.splitlines() if "jupyter lab" in ln)
    assert line.endswith("notebooks/01_quickstart.ipynb")
    assert ("--allow-root" in line) == (os.geteuid() == 0)


@pytest.mark.slow
def test_bench_rows_and_cost_report_on_the_bundled_model(bundled):
    """One small real bench: rows carry the pooled metrics of their runs, greedy rows are exact, and the cost
    report names the machine, the roofline and each drafter's c."""
    from mtplab.bench import cost_report, format_table, run_bench

    rows = run_bench(bundled, prompts=2, max_new_tokens=12, gammas=(3,), temperatures=(0.0,),
                     drafters=("prompt-lookup",), schedule="constant", progress=False)
    base, ours, theirs = rows
    assert base["method"] == "plain vs transformers plain" and base["exact"] is True
    assert ours["engine"] == "mtplab" and ours["exact"] is True and ours["new_tokens"] == 24
    assert ours["mean_acceptance_length"] >= 1 and 0 <= ours["acceptance_rate"] <= 1
    assert ours["speedup"] == pytest.approx(ours["tokens_per_second"] / ours["plain_tokens_per_second"])
    assert theirs["engine"] == "transformers" and theirs["exact"] is True
    assert "prompt-lookup" in format_table(rows)
    text = cost_report(bundled, drafters=("prompt-lookup",), reps=1)
    assert text.startswith("machine: ") and "roofline" in text and "prompt-lookup  c = " in text


@pytest.mark.slow
def test_a_trained_drafters_folder_is_a_drafter_name(no_color, capsys, tmp_path, bundled):
    """`mtplab run --drafter DIR` (and `bench --drafters DIR`) take a trained drafter's folder: here an untrained
    EAGLE-3 head saved for the bundled target. Greedy output is the plain text whatever it drafts; a path that
    is not a folder is refused with the allowed names."""
    import torch

    from mtplab.drafters import registry
    from mtplab.drafters.eagle import Eagle3Drafter, Eagle3Head
    from mtplab.trace import Trace

    torch.manual_seed(0)
    folder = Eagle3Drafter(Eagle3Head.for_target(bundled.model.config)).save(tmp_path / "head0", target=bundled.name)
    assert registry.is_folder(str(folder)) and not registry.is_folder("mtp")
    assert type(registry.make(str(folder), bundled)) is Eagle3Drafter
    prompt = ["run", "Name three colours.", "--max-new-tokens", "12", "--schedule", "constant", "-k", "3"]
    assert main([*prompt, "--drafter", "none", "--json", str(tmp_path / "plain.json")]) == 0
    assert main([*prompt, "--drafter", str(folder), "--json", str(tmp_path / "head.json")]) == 0
    plain, head = (Trace.from_json((tmp_path / f"{n}.json").read_text()) for n in ("plain", "head"))
    assert head.config["drafter"] == "eagle3" and len(head.rounds[0].draft_ids) == 3
    assert head.token_ids == plain.token_ids and len(plain.token_ids) == 12
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["run", "hello", "--drafter", str(tmp_path / "missing")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "missing" in err and "prompt-lookup" in err and "Traceback" not in err
