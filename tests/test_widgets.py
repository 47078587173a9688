"""Widget logic in plain pytest: traits follow the rounds, Stop cancels, bad values show inline and keep the trace."""
import html

import pytest

import mtplab
from mtplab.widgets.dashboard import ACCEPTANCE, THEORY_MEASURED_V
from mtplab.widgets.inspector import P_BARS, Q_BARS, RoundInspector, bars, describe
from mtplab.widgets.theory_sim import SIMULATED
from mtplab.widgets.playground import MTP_LABEL

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
    assert list(pg.dashboard.traces[ACCEPTANCE].y) == trace.metrics.per_position_acceptance
    # the race replays the timed run next to the plain run that timed it, on their own clocks
    assert [(ln["key"], ln["seconds"]) for ln in pg.race.lanes] == [
        ("plain", pg.plain.metrics.seconds), ("spec", trace.metrics.seconds)]
    assert f"{mtplab.speedup(trace, pg.plain):.2f}× plain decoding" in pg.race.summary


def test_auto_schedule_is_the_default_and_is_shown(pg):
    """The first run (above) used schedule="auto": every round says what it expected, the token view marks the
    rounds where auto changed γ, the dashboard names its choices and draws theory from this machine's v(γ)."""
    from mtplab import costs, theory
    from mtplab.costs import cost_model

    trace = pg.trace
    assert pg.schedule.value == "auto" and trace.config["schedule"] == "auto"
    assert all(r.expected_speedup is not None and 0 <= r.num_draft_tokens <= 4 for r in trace.rounds)
    changes = [r["i"] for r in pg.tokens.rounds if r["auto"]]
    ks = [r.num_draft_tokens for r in trace.rounds]
    assert changes == [0] + [i for i in range(1, len(ks)) if ks[i] != ks[i - 1]]
    assert pg.tokens.rounds[0]["auto"].startswith(f"γ={ks[0]}, expects ")
    assert "auto draft length" in pg.dashboard.metrics.value and "chose γ=" in pg.dashboard.metrics.value
    v = costs.verify_curve(pg.target, progress=False)
    cm = cost_model(trace, pg.plain)
    want = [theory.walltime_factor(cm["alpha"], g, cm["c"], v) for g in range(1, 9)]
    assert list(pg.dashboard.traces[THEORY_MEASURED_V].y) == pytest.approx(want)


def test_clicking_a_token_updates_the_inspector(pg):
    rnd = next(r for r in pg.trace.rounds if r.num_accepted < r.num_drafted)
    pg.tokens.selected = {"round": rnd.index, "pos": rnd.num_accepted}
    assert pg.inspector.selection == (rnd.index, rnd.num_accepted)
    assert "rejected" in pg.inspector.title.value
    labels = list(pg.inspector.bars[P_BARS].x)
    assert repr(rnd.draft_text[rnd.num_accepted]) in labels
    assert len(pg.inspector.bars[Q_BARS].y) == len(labels)  # q bars next to p bars
    assert f"{rnd.target_cache_before} → {rnd.target_cache_len}" in pg.inspector.costs.value
    # the default drafter is the shipped MTP drafter: the inspector names the seeding hidden state and draws the curve
    assert pg.drafter.value == MTP_LABEL and rnd.draft_start_position == rnd.context_len - 2
    seq = pg.trace.prompt_ids + pg.trace.token_ids
    token = html.escape(repr(pg.target.token_text(seq[rnd.draft_start_position])))
    assert f"hidden state at position {rnd.draft_start_position} (<code>{token}</code>)" in pg.inspector.mtp_note.value
    assert pg.inspector.mtp_view.layout.display != "none"
    assert list(pg.inspector.acceptance.y) == pg.trace.metrics.per_position_acceptance


def test_bad_value_shows_inline_error_and_keeps_previous_trace(pg):
    before, shown, race = pg.trace, list(pg.tokens.rounds), list(pg.race.lanes)
    pg.top_p.value = 0.0
    pg.run()
    pg.wait(60)
    assert "top_p must be in (0, 1]" in pg.error.value and "last good result is kept" in pg.error.value
    assert pg.trace is before and pg.tokens.rounds == shown and pg.race.lanes == race
    pg.top_p.value = 1.0


def test_stop_cancels_a_running_decode(pg):
    pg.max_new_tokens.value = 400
    pg.prompt.value = "Write a long story about a dragon who learns to bake bread."
    old = pg.decoder
    pg.run()
    import time
    while pg.decoder is old or not pg.decoder.trace.rounds:
        time.sleep(0.05)
    pg.stop()
    pg.wait(60)
    assert pg.trace.stop_reason == "stopped" and len(pg.trace.token_ids) < 400
    assert not pg.running and "stopped" in pg.tokens.status
    pg.max_new_tokens.value = 40


def test_live_draft_length_change_applies_from_next_round(pg):
    pg.reset()
    pg.schedule.value = "constant"
    pg.num_draft_tokens.value = 2
    for _ in range(3):
        pg.step()
    pg.num_draft_tokens.value = 6
    for _ in range(3):
        pg.step()
    ks = [r.num_draft_tokens for r in pg.decoder.trace.rounds]
    assert ks[:3] == [2, 2, 2] and ks[3:] == [6, 6, 6]
    assert pg.tokens.rounds[3]["mark"] == "γ=6" and not any(r["auto"] for r in pg.tokens.rounds)
    pg.reset()
    pg.schedule.value = "auto"
    assert pg.tokens.rounds == [] and pg.trace is None


def test_inspector_text_for_bonus_and_plain_rounds(bundled):
    dec = mtplab.SpeculativeDecoder(bundled, mtplab.PromptLookupDrafter(), num_draft_tokens=2, schedule="constant")
    trace = dec.generate("Repeat exactly: one two three four five six seven eight nine ten.", max_new_tokens=30)
    bonus = next(r for r in trace.rounds if r.token_kind == "bonus")
    assert "bonus" in describe(bonus, bonus.num_drafted)
    labels, p, q, res = bars(bonus, bonus.num_drafted)
    assert labels and q is None and res is None and p == sorted(p, reverse=True)


def test_inspector_mtp_view_only_for_mtp_rounds(bundled):
    prompt = "List three uses of a paper clip."
    trace = mtplab.SpeculativeDecoder(bundled, mtplab.load_drafter("mtp", bundled), num_draft_tokens=4, schedule="constant").generate(
        prompt, max_new_tokens=24)
    seq = trace.prompt_ids + trace.token_ids
    ins = RoundInspector()
    first, later = trace.rounds[0], [r for r in trace.rounds[1:] if r.draft_start_position is not None][-1]
    assert first.draft_start_position == len(trace.prompt_ids) - 2  # seeded by the prefill's hidden state
    assert later.draft_start_position >= len(trace.prompt_ids)
    for rnd in (first, later):  # a start in the prompt (token decoded from its id), then one in the answer
        ins.show(rnd, 0, trace, bundled.token_text)
        start = rnd.draft_start_position
        note = ins.mtp_note.value
        assert f"hidden state at position {start} (<code>{html.escape(repr(bundled.token_text(seq[start])))}</code>)" in note
        assert f"newest token (<code>{html.escape(repr(bundled.token_text(seq[start + 1])))}</code>)" in note
        assert ins.mtp_view.layout.display != "none"
    curve = ins.acceptance
    assert list(curve.x) == [0, 1, 2, 3] and list(curve.y) == trace.metrics.per_position_acceptance
    n = sum(r.draft_start_position is not None for r in trace.rounds)
    assert "so far" in ins.curve.layout.title.text and f"({n} rounds)" in ins.curve.layout.title.text
    assert "drafted from target position" in ins.costs.value

    lookup = mtplab.SpeculativeDecoder(bundled, mtplab.PromptLookupDrafter(), num_draft_tokens=4, schedule="constant").generate(
        "Repeat exactly: one two three four five six.", max_new_tokens=16)
    rnd = next(r for r in lookup.rounds if r.num_drafted)
    ins.show(rnd, 0, lookup, bundled.token_text)
    assert rnd.draft_start_position is None and "Round" in ins.title.value
    assert ins.mtp_note.value == "" and ins.mtp_view.layout.display == "none" and list(ins.acceptance.y) == []
    ins.show(later, 0, trace)  # without a decoder for prompt ids: answer tokens still come from the rounds' texts
    assert f"position {later.draft_start_position} (<code>" in ins.mtp_note.value
    ins.clear()
    assert ins.mtp_view.layout.display == "none" and ins.mtp_note.value == ""


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
    assert list(sim.traces[SIMULATED].x) == [2]


def test_saved_trace_renders_static_html(tmp_path, bundled):
    trace = mtplab.SpeculativeDecoder(bundled, mtplab.PromptLookupDrafter()).generate("Say hi twice: hi hi", 12)
    back = mtplab.Trace.from_json(trace.to_json())
    page = mtplab.report.save_html(back, tmp_path / "t.html").read_text()
    assert page.count('class="tok tok-') == sum(len(r.token_events()) for r in trace.rounds) + 5  # + legend
    assert "mean acceptance length" in page and "<script" not in page
    assert page.count("<svg") == 2 and page.count("<rect") >= len(trace.rounds)  # acceptance + time charts


def test_the_cache_view_draws_the_rows_a_round_added_and_dropped():
    from mtplab.widgets.inspector import cache_view
    from conftest import made_up_traces

    spec, _ = made_up_traces()
    rnd = spec.rounds[1]  # context 6, two drafts, the second rejected
    rnd.target_cache_before, rnd.target_cache_len, rnd.drafter_cache_len = 8, 7, 0
    html_ = cache_view(rnd)
    assert "5 rows before the round; the verify pass added 3 (the pending token + 2 drafted); the rollback dropped 1 " \
           "and kept 2" in html_
    verify, rollback = html_.split("after verify: 8")[1].split("after rollback: 7")
    assert verify.count("mtplab-cache-kept") == 2 and verify.count("mtplab-cache-dropped") == 1
    assert "line-through;\">&#x27;d13&#x27;" in verify  # the rejected draft's row, struck out
    assert rollback.count("mtplab-cache-kept") == 2 and "mtplab-cache-dropped" not in rollback
    assert "next pending token (not cached yet): <code>&#x27;t1&#x27;</code>" in html_
    long = cache_view(rnd, show=2)  # only the last rows are drawn, the rest counted
    assert "+1</span>" in long.split("after rollback")[0]


def test_the_tree_picture_draws_the_tree_and_its_mask():
    from mtplab.widgets.pictures import tree_html
    from conftest import made_up_traces

    spec, _ = made_up_traces()
    rnd = spec.rounds[0]
    with pytest.raises(ValueError, match="verified as a chain, not a token tree"):
        tree_html(rnd)
    rnd.tree_branches, rnd.tree_branch, rnd.num_accepted = [[10, 11], [10, 12], [13]], 1, 2  # nodes 10, 11, 12, 13
    page = tree_html(rnd, lambda t: f"w{t}")
    assert page.count("mtplab-tree-node") == 4 and "4 nodes from 3 branches" in page
    assert page.count("✓") == 2 + 1  # nodes 10 and 12 on the followed path (+ the legend)
    mask = page.split("mtplab-tree-mask")[1]
    rows = mask.split("<tr>")[2:]  # pending, then nodes 10, 11, 12, 13
    seen = [row.count("mtplab-mask-on") for row in rows]
    assert seen == [1, 2, 3, 3, 2]  # pending sees itself; a node sees the pending token, its ancestors and itself
    import re
    pattern = re.findall(r"mtplab-mask-(on|off)", rows[3])  # node 12: columns pending, 10, 11, 12, 13
    assert pattern == ["on", "on", "off", "on", "off"]  # not its sibling 11, not the other branch's 13


def test_the_family_table_names_what_each_drafter_reads_and_its_measured_cost():
    from mtplab.widgets.pictures import FAMILY, family_html

    page = family_html({"mtp-head": 0.071, "eagle3": 0.12})
    assert page.count("mtplab-family-row") == len(FAMILY) == 7
    for name in ("draft model", "layer-skip", "Medusa", "EAGLE-3", "Gemma 4 assistant", "mtplab MTP head"):
        assert name in page
    assert "<td>0.07</td>" in page and "<td>0.12</td>" in page and page.count("<td>—</td>") == 5


def test_the_verify_cost_figure_plots_this_machines_measured_passes():
    from mtplab import costs
    from mtplab.widgets.pictures import VERIFY_ASSUMED, VERIFY_PLAIN, VERIFY_USED, verify_cost_figure
    from mtplab.widgets.style import named_traces

    target = mtplab.tiny_random_target()
    traces = named_traces(verify_cost_figure(target))
    seconds, v = costs.pass_seconds(target), costs.verify_curve(target)
    assert list(traces[VERIFY_PLAIN].x) == list(range(1, 17)) and traces[VERIFY_PLAIN].y[0] == 1.0
    assert list(traces[VERIFY_PLAIN].y) == pytest.approx([seconds["plain"][n] / seconds["plain"][1] for n in range(1, 17)])
    assert list(traces[VERIFY_USED].y) == pytest.approx([v[g] for g in range(16)])  # the decoder's own v(γ)
    assert list(traces[VERIFY_ASSUMED].y) == [1, 1]
