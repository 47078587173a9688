"""The race replays two recorded runs at their pace: what the browser is sent must be the runs' own clock."""
import pytest

from conftest import made_up_traces
from mtplab.trace import speedup
from mtplab.widgets.race import RaceView, lane, race_summary


def test_each_lane_shows_a_rounds_tokens_when_that_round_ended():
    spec, plain = made_up_traces()
    spec.prefill_seconds, plain.prefill_seconds = 0.05, 0.05
    got = lane(spec, "spec", "spec")
    # rounds end at prefill + draft + verify + bookkeeping, cumulatively
    assert [t for t, _ in got["events"]] == pytest.approx([0.05 + 0.025, 0.05 + 0.050, 0.05 + 0.066])
    assert got["events"][0][1] == [["accepted", "d10"], ["accepted", "d11"], ["bonus", "t0"]]
    assert got["events"][1][1] == [["accepted", "d12"], ["correction", "t1"]]  # the rejected d13 never shows
    assert got["events"][-1][0] == pytest.approx(spec.metrics.seconds) == got["seconds"]
    assert (got["tokens"], got["passes"]) == (spec.metrics.new_tokens, 3) == (6, 3)
    shown = [text for _, toks in got["events"] for _, text in toks]
    assert len(shown) == got["tokens"]
    base = lane(plain, "plain", "plain")
    assert [len(toks) for _, toks in base["events"]] == [1] * 7  # plain: one token per pass
    assert base["events"][-1][0] == pytest.approx(plain.metrics.seconds)
    # the lanes' paces give the dashboard's speedup: plain s/token over speculative s/token
    pace = lambda ln: ln["seconds"] / ln["tokens"]
    assert pace(base) / pace(got) == pytest.approx(speedup(spec, plain))


def test_the_view_sends_both_lanes_and_says_who_won():
    spec, plain = made_up_traces()
    view = RaceView(spec, plain)
    assert [ln["key"] for ln in view.lanes] == ["plain", "spec"]
    assert view.lanes == [lane(plain, "plain decoding", "plain"), lane(spec, "speculative · made-up", "spec")]
    x = speedup(spec, plain)
    assert f"→ {x:.2f}× plain decoding" in view.summary and view.summary == race_summary(spec, plain)
    assert ("faster" if x >= 1 else "slower") in view.summary
    slow_spec, _ = made_up_traces()
    for r in slow_spec.rounds:
        r.draft_seconds *= 20  # a drafter that costs more than it saves loses the race
    assert "slower on this machine" in RaceView(slow_spec, plain).summary
    view.clear()
    assert view.lanes == [] and view.summary == ""


def test_the_race_refuses_two_runs_it_cannot_compare():
    spec, plain = made_up_traces()
    with pytest.raises(ValueError, match="must be a plain run"):
        RaceView(spec, spec)
    plain.prompt_ids = [7, 7]
    with pytest.raises(ValueError, match="different prompts"):
        RaceView(spec, plain)
