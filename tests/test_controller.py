"""The controller behind the Playground, driven without a browser on a tiny random target: runs, steps, live
settings, stops, failures that keep the last good run, 100 runs without growing, and random clicking."""
import random
import time

import pytest

import mtplab
from mtplab.controller import Controller
from mtplab.widgets.token_view import round_tokens

from conftest import tiny

PROMPT = [1, 2, 3, 4, 5, 1, 2, 3, 4]


@pytest.fixture
def ctrl():
    c = Controller(tiny(), prompt=PROMPT, max_new_tokens=24, refresh_seconds=0.0)
    c.events = []
    c.subscribe(c.events.append)
    return c


def test_a_run_is_decoded_timed_and_announced(ctrl):
    assert ctrl.settings["drafter"] == "prompt lookup" and ctrl.run()
    ctrl.wait(60)
    trace, plain = ctrl.trace, ctrl.plain
    assert ctrl.error is None and trace.stop_reason == "max_new_tokens" and ctrl.shown is trace
    assert trace.token_ids == plain.token_ids  # greedy: the baseline decodes the same text
    assert trace is not ctrl.decoder.trace and trace.token_ids == ctrl.decoder.trace.token_ids  # timed again, undrawn
    assert plain.config["drafter"] == "none" and trace.config["drafter"] == "prompt-lookup"
    assert f"{mtplab.speedup(trace, plain):.2f}× plain decoding" in ctrl.status
    events = ctrl.events
    assert events[0] == "started" and events[-1] == "finished" and "rounds" in events and "status" in events


def test_a_bad_setting_keeps_the_last_good_run(ctrl):
    ctrl.run()
    ctrl.wait(60)
    good = ctrl.trace
    ctrl.set("top_p", 0.0)
    ctrl.run()
    ctrl.wait(60)
    assert ctrl.trace is good and ctrl.shown is good
    assert "top_p must be in (0, 1]" in str(ctrl.error) and ctrl.events[-1] == "error"
    ctrl.set("top_p", 1.0)
    assert ctrl.run()
    ctrl.wait(60)
    assert ctrl.error is None and ctrl.trace is not good
    with pytest.raises(ValueError, match="setting must be one of"):
        ctrl.set("gamma", 3)


def test_steps_then_live_settings_then_run_to_the_end(ctrl):
    ctrl.set("schedule", "constant")
    ctrl.set("num_draft_tokens", 2)
    for _ in range(2):
        assert ctrl.step()
    assert ctrl.running and not ctrl.busy and len(ctrl.shown.rounds) == 2 and ctrl.trace is None
    ctrl.set("num_draft_tokens", 5)  # live: from the next round, marked
    with pytest.raises(ValueError, match="num_draft_tokens must be in"):
        ctrl.set("num_draft_tokens", 0)
    assert "num_draft_tokens" in str(ctrl.error)
    ctrl.set("num_draft_tokens", 5)
    assert ctrl.error is None
    ctrl.run()  # finishes the stepped run, then times it
    ctrl.wait(60)
    ks = [r.num_draft_tokens for r in ctrl.trace.rounds]
    assert ks[:3] == [2, 2, 5] and max(ks) == 5 and ctrl.marks == {2: "γ=5"}  # (γ shrinks near the end)
    assert ctrl.plain is not None and ctrl.trace is ctrl.decoder.trace  # changed mid-run: the live timings kept


def test_stop_keeps_what_was_decoded(ctrl):
    ctrl.set("max_new_tokens", 480)  # (the tiny target's context: 512 tokens)
    assert ctrl.run()
    deadline = time.monotonic() + 60
    while not (ctrl.decoder and ctrl.decoder.trace.rounds) and time.monotonic() < deadline:
        time.sleep(0.001)
    ctrl.stop()
    ctrl.wait(60)
    assert ctrl.trace.stop_reason == "stopped" and 0 < len(ctrl.trace.token_ids) < 480
    assert ctrl.plain is None and ctrl.status.startswith("stopped after") and not ctrl.running
    ctrl.step()
    ctrl.stop()  # a stepped run too
    assert ctrl.trace.stop_reason == "stopped" and len(ctrl.trace.rounds) == 1 and not ctrl.running


def test_stop_before_a_queued_run_starts_ends_it(ctrl):
    import threading

    gate = threading.Event()
    ctrl._worker.submit(gate.wait)  # the worker is busy: the run queues behind this
    ctrl.set("max_new_tokens", 200)
    assert ctrl.run()
    ctrl.stop()  # before the run has a decoder
    gate.set()
    ctrl.wait(60)
    assert ctrl.trace.stop_reason == "stopped" and ctrl.trace.rounds == [] and not ctrl.running


class Breaks(mtplab.PromptLookupDrafter):
    """Prompt lookup that fails in its third round."""

    def propose(self, ids, k, cfg, generator, target_hidden=None):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 3:
            raise RuntimeError("the drafter broke")
        return super().propose(ids, k, cfg, generator, target_hidden)


def test_a_run_that_fails_keeps_the_last_good_run(ctrl):
    ctrl.set("schedule", "constant")  # (auto would measure the new drafter's cost first, and fail there)
    ctrl.run()
    ctrl.wait(60)
    good, plain = ctrl.trace, ctrl.plain
    ctrl._drafters[ctrl.settings["drafter"]] = Breaks()
    ctrl.run()
    ctrl.wait(60)
    assert str(ctrl.error) == "the drafter broke" and "failed" in ctrl.status
    assert ctrl.trace is good and ctrl.plain is plain and ctrl.shown is good and not ctrl.running
    assert ctrl.events[-1] == "finished"  # views redraw the last good run


def test_sweep_measures_each_gamma(ctrl):
    assert ctrl.sweep((1, 3))
    ctrl.wait(120)
    assert [g for g, _ in ctrl.sweep_points] == [1, 3] and all(s > 0 for _, s in ctrl.sweep_points)
    assert ctrl.events[-1] == "swept"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_a_hundred_runs_keep_memory_flat(ctrl):
    ctrl.set("max_new_tokens", 8)
    ctrl.run()
    ctrl.wait(60)
    first = rss_mb()
    for i in range(100):
        ctrl.set("seed", i)
        ctrl.set("temperature", 0.0 if i % 2 else 0.8)
        assert ctrl.run()
        ctrl.wait(60)
        assert ctrl.error is None and ctrl.plain is not None
    assert rss_mb() < first + 50


def test_random_clicks_never_raise_nor_leave_a_half_drawn_view():
    """Run/Step/Stop/Reset and setting changes in random order, during runs: nothing raises, an error is shown
    inline, and once the worker is idle every view shows exactly the run the controller holds."""
    pg = mtplab.Playground(tiny(), prompt=" ", max_new_tokens=30)
    pg.prompt.value = "x"  # a tiny target has no tokenizer: prompts are token ids, set on the controller
    ctrl = pg.controller
    ctrl.set("prompt", PROMPT)
    ctrl.refresh_seconds = 0.0
    rng = random.Random(0)
    values = dict(num_draft_tokens=[1, 3, 6], schedule=["auto", "constant", "heuristic"], temperature=[0.0, 0.7],
                  top_k=[0, 5], top_p=[1.0, 0.9], seed=[0, 1], max_new_tokens=[10, 40], drafter=list(ctrl.labels))
    bad = dict(temperature=-1.0, top_p=0.0, max_new_tokens=0)  # each refused, inline, until set right again
    good, errors = None, 0
    for i in range(150):
        before = ctrl.trace
        action = rng.choice(["run", "run", "step", "stop", "reset", "set", "set", "set", "wait"])
        if action == "set":
            name = rng.choice(sorted(values))
            getattr(pg, name).value = bad[name] if name in bad and rng.random() < 0.15 else rng.choice(values[name])
        elif action == "wait":
            pg.wait(60)
        else:
            getattr(pg, action)()
        if rng.random() < 0.3:
            time.sleep(0.01)
        if ctrl.trace is not None and ctrl.trace.stop_reason in ("max_new_tokens", "eos"):
            good = ctrl.trace
        errors += ctrl.error is not None
        if action == "reset":
            assert ctrl.trace is None and pg.tokens.rounds == []
        elif before is not None:  # a last good run is only ever replaced by another one
            assert ctrl.trace is not None and ctrl.trace.stop_reason in ("max_new_tokens", "eos", "stopped")
    pg.wait(60)
    pg.stop()
    pg.wait(60)
    shown = ctrl.shown
    assert good is not None and errors, "no run completed or no error shown: the sequence tested too little"
    if shown is None:
        assert pg.tokens.rounds == []
    else:
        assert pg.tokens.rounds == [round_tokens(r, ctrl.marks.get(r.index, ""), pg.tokens.rounds[i]["auto"])
                                    for i, r in enumerate(shown.rounds)]
    assert (pg.error.value == "") == (ctrl.error is None)
