"""Widget logic in plain pytest: traits follow the rounds, Stop cancels, bad values show inline and keep the trace."""
import pytest

import mtplab
from mtplab.widgets.inspector import bars, describe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pg(bundled):
    return mtplab.Playground(bundled, max_new_tokens=40)


def test_run_fills_views_round_by_round(pg):
    pg.run()
    pg.wait(120)
    trace = pg.trace
    assert pg.error.value == "" and trace is not None and pg.plain is not None
    assert [r["i"] for r in pg.tokens.rounds] == list(range(len(trace.rounds)))
    shown = [tuple(t[:3]) for r in pg.tokens.rounds for t in r["toks"]]
    assert shown == [(k, text, pos) for rnd in trace.rounds for k, _, text, pos in rnd.token_events()]
    kinds = {k for k, _, _ in shown}
    assert {"accepted", "rejected"} <= kinds and kinds & {"bonus", "correction"}
    assert "identical to plain ✓" in pg.dashboard.metrics.value
    assert "measured speedup" in pg.dashboard.metrics.value
    assert list(pg.dashboard.fig.data[0].y) == trace.metrics.per_position_acceptance


def test_clicking_a_token_updates_the_inspector(pg):
    rnd = next(r for r in pg.trace.rounds if r.num_accepted < r.num_drafted)
    pg.tokens.selected = {"round": rnd.index, "pos": rnd.num_accepted}
    assert pg.inspector.selection == (rnd.index, rnd.num_accepted)
    assert "rejected" in pg.inspector.title.value
    labels = list(pg.inspector.fig.data[0].x)
    assert repr(rnd.draft_text[rnd.num_accepted]) in labels
    assert len(pg.inspector.fig.data[1].y) == len(labels)  # q bars next to p bars
    assert f"{rnd.target_cache_before} → {rnd.target_cache_len}" in pg.inspector.costs.value


def test_bad_value_shows_inline_error_and_keeps_previous_trace(pg):
    before, shown = pg.trace, list(pg.tokens.rounds)
    pg.top_p.value = 0.0
    pg.run()
    pg.wait(60)
    assert "top_p must be in (0, 1]" in pg.error.value and "last good result is kept" in pg.error.value
    assert pg.trace is before and pg.tokens.rounds == shown
    pg.top_p.value = 1.0


def test_stop_cancels_a_running_decode(pg):
    pg.max_new_tokens.value = 400
    pg.prompt.value = "Write a long story about a dragon who learns to bake bread."
    pg.run()
    import time
    while not pg.decoder.trace.rounds:
        time.sleep(0.05)
    pg.stop()
    pg.wait(60)
    assert pg.trace.stop_reason == "stopped" and len(pg.trace.token_ids) < 400
    assert not pg.running and "stopped" in pg.tokens.status
    pg.max_new_tokens.value = 40


def test_live_draft_length_change_applies_from_next_round(pg):
    pg.reset()
    pg.num_draft_tokens.value = 2
    for _ in range(3):
        pg.step()
    pg.num_draft_tokens.value = 6
    for _ in range(3):
        pg.step()
    ks = [r.num_draft_tokens for r in pg.decoder.trace.rounds]
    assert ks[:3] == [2, 2, 2] and ks[3:] == [6, 6, 6]
    assert pg.tokens.rounds[3]["mark"] == "γ=6"
    pg.reset()
    assert pg.tokens.rounds == [] and pg.trace is None


def test_inspector_text_for_bonus_and_plain_rounds(bundled):
    dec = mtplab.SpeculativeDecoder(bundled, mtplab.PromptLookupDrafter(), num_draft_tokens=2)
    trace = dec.generate("Repeat exactly: one two three four five six seven eight nine ten.", max_new_tokens=30)
    bonus = next(r for r in trace.rounds if r.token_kind == "bonus")
    assert "bonus" in describe(bonus, bonus.num_drafted)
    labels, p, q, res = bars(bonus, bonus.num_drafted)
    assert labels and q is None and res is None and p == sorted(p, reverse=True)


def test_theory_simulator_updates_instantly():
    from mtplab import theory

    sim = mtplab.TheorySimulator(alpha=0.8, gamma=4, c=0.05)
    assert "3.36" in sim.numbers.value  # E(0.8, 4) = 3.3616
    assert len(sim.tokens.rounds) == 30
    sim.gamma.value = 2
    assert all(r["k"] == 2 for r in sim.tokens.rounds)
    assert f"{theory.expected_tokens_per_round(0.8, 2):.2f}" in sim.numbers.value
    sim.alpha.value = 1.0
    assert all(t[0] in ("accepted", "bonus") for r in sim.tokens.rounds for t in r["toks"])
    assert list(sim.fig.data[1].x) == [2]


def test_saved_trace_renders_static_html(tmp_path, bundled):
    trace = mtplab.SpeculativeDecoder(bundled, mtplab.PromptLookupDrafter()).generate("Say hi twice: hi hi", 12)
    back = mtplab.Trace.from_json(trace.to_json())
    page = mtplab.report.save_html(back, tmp_path / "t.html").read_text()
    assert page.count('class="tok tok-') == sum(len(r.token_events()) for r in trace.rounds) + 5  # + legend
    assert "mean acceptance length" in page and "<script" not in page
    assert page.count("<svg") == 2 and page.count("<rect") >= len(trace.rounds)  # acceptance + time charts
