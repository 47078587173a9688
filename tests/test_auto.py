"""schedule="auto": the draft length chosen per round from the measured verify curve v, the drafter's cost c and the
live acceptance, including γ = 0 (a plain step) when no draft pays."""
import pytest

import mtplab
from mtplab import costs, decoder, kernels, theory
from mtplab.decoder import AutoDraftLength, SpeculativeDecoder, draft_cost

from conftest import Oracle, tiny

PROMPT = [1, 2, 3, 4, 5, 6, 1, 2, 3]


def test_expected_tokens_by_position_is_leviathans_formula_for_equal_rates():
    for alpha in (0.0, 0.3, 0.8, 1.0):
        for gamma in range(6):
            assert theory.expected_tokens_per_round_by_position([alpha] * gamma) == pytest.approx(
                theory.expected_tokens_per_round(alpha, gamma))
    assert theory.expected_tokens_per_round_by_position([0.5, 0.4]) == pytest.approx(1 + 0.5 + 0.2)


def test_best_draft_length_falls_back_to_plain_when_drafting_is_a_loss():
    costly = {g: 1 + 0.5 * g for g in range(16)}  # each drafted token costs half a step more to verify
    assert theory.best_draft_length([0.3] * 8, c=0.2, verify_cost=costly) == (0, 1.0)
    # ... and the best γ >= 1 when asked for one (a probe)
    g, f = theory.best_draft_length([0.3] * 8, c=0.2, verify_cost=costly, allow_plain=False)
    assert g == 1 and f == pytest.approx(1.3 / 1.7)


def test_best_draft_length_grows_with_acceptance_and_shrinks_with_cost():
    flat = {g: 1.0 + 0.02 * g for g in range(16)}
    high = theory.best_draft_length([0.95] * 8, c=0.02, verify_cost=flat)
    low = theory.best_draft_length([0.5] * 8, c=0.02, verify_cost=flat)
    assert high[0] == 8 and 1 <= low[0] < high[0]
    dear = theory.best_draft_length([0.95] * 8, c=0.3, verify_cost=flat)
    assert 1 <= dear[0] < high[0]
    # decaying per-position acceptance stops the draft where the next position no longer pays
    g, _ = theory.best_draft_length([0.9, 0.8, 0.1, 0.1], c=0.05, verify_cost=flat)
    assert g == 2
    # the expected factor is the one of the formula
    assert high[1] == pytest.approx(theory.expected_tokens_per_round_by_position([0.95] * 8) / (8 * 0.02 + flat[8]))


def test_tree_nodes_make_a_verify_dearer():
    curve = {g: 1 + 0.1 * g for g in range(16)}
    _, chain = theory.best_draft_length([0.6] * 3, c=0.0, verify_cost=curve)
    _, tree = theory.best_draft_length([0.6] * 3, c=0.0, verify_cost=curve, extra_nodes=2.5)
    assert tree < chain


def test_policy_learns_conditional_acceptance_per_position():
    auto = AutoDraftLength({g: 1.0 for g in range(16)}, 0.0)
    assert auto.rates(3) == [0.6] * 3  # the prior before any round
    for _ in range(98):  # position 1 always accepted, position 2 never
        auto.observe(mtplab.Round(index=0, context_len=5, drafter="x", num_draft_tokens=3, draft_ids=[1, 2, 3],
                                  num_accepted=1))
    rates = auto.rates(3)
    assert rates[0] == pytest.approx((98 + 1.2) / 100) and rates[1] == pytest.approx(1.2 / 100)
    assert rates[2] == pytest.approx(0.6)  # never reached: still the prior


def fake_costs(monkeypatch, v, c):
    monkeypatch.setattr(costs, "verify_curve", lambda target, **kw: dict(v))
    monkeypatch.setattr(decoder, "draft_cost", lambda drafter, target, **kw: c)


def rejected_drafts(monkeypatch, v, c, n):
    """Draft lengths auto chooses for a drafter whose every draft is rejected, under costs ``v`` and ``c``; the
    output must still be the target's."""
    target = tiny()
    plain = SpeculativeDecoder(target, None).generate(PROMPT, n)
    fake_costs(monkeypatch, v, c)
    trace = SpeculativeDecoder(target, Oracle(plain.prompt_ids + plain.token_ids, wrong=True),
                               num_draft_tokens=6).generate(PROMPT, n)
    assert trace.token_ids == plain.token_ids
    return trace, [r.num_draft_tokens for r in trace.rounds]


def test_auto_decodes_plainly_when_no_draft_pays(monkeypatch):
    trace, lengths = rejected_drafts(monkeypatch, {g: 1 + 0.5 * g for g in range(16)}, 0.3, 40)
    first = AutoDraftLength.PROBE_AFTER + 1
    # plain from the start (prior 0.6: a draft would not pay); one probe after 8 plain rounds (it would pay if
    # accepted); rejected, it leaves no hope that drafting pays, so no more probes
    assert lengths == [0] * (first - 1) + [1] + [0] * (len(lengths) - first)
    assert all(r.expected_speedup == pytest.approx(1.0) for r in trace.rounds if r.num_draft_tokens == 0)
    assert trace.config["schedule"] == "auto" and trace.config["draft_cost"] == 0.3
    assert trace.config["verify_cost"][:3] == pytest.approx([1.0, 1.5, 2.0])


def test_auto_probes_again_while_drafting_could_pay(monkeypatch):
    """Probes after 8, then 16 more plain rounds while a run of accepts could still make drafting pay."""
    _, lengths = rejected_drafts(monkeypatch, {g: 1 + 0.1 * g for g in range(16)}, 0.5, 60)
    assert [i for i, k in enumerate(lengths) if k] == [8, 25, 58][: sum(1 for k in lengths if k)]
    assert sum(1 for k in lengths if k) >= 2


def test_auto_never_drafts_a_drafter_that_cannot_pay(monkeypatch):
    """c = 0.9 with v(1) = 1.13: even an always-accepted draft would not pay; not even a probe is spent on it."""
    target = tiny()
    fake_costs(monkeypatch, {g: 1 + 0.13 * g for g in range(16)}, 0.9)
    trace = SpeculativeDecoder(target, mtplab.PromptLookupDrafter(1), num_draft_tokens=4).generate(PROMPT, 40)
    assert all(r.num_draft_tokens == 0 for r in trace.rounds)


def test_auto_drafts_long_when_acceptance_is_high(monkeypatch):
    target = tiny()
    plain = SpeculativeDecoder(target, None).generate(PROMPT, 60)
    fake_costs(monkeypatch, {g: 1 + 0.02 * g for g in range(16)}, 0.01)
    trace = SpeculativeDecoder(target, Oracle(plain.prompt_ids + plain.token_ids), num_draft_tokens=6).generate(
        PROMPT, 60)
    assert trace.token_ids == plain.token_ids
    left = [60 - sum(len(x.emitted_ids) for x in trace.rounds[:i]) for i in range(len(trace.rounds))]
    assert trace.rounds[0].num_draft_tokens >= 4  # the prior (0.6 per position) already pays for a long draft
    assert all(r.num_draft_tokens == min(6, n - 1) for r, n in zip(trace.rounds[1:], left[1:]))  # then the most
    assert trace.rounds[1].expected_speedup > 2
    back = mtplab.Trace.from_json(trace.to_json())
    assert [r.expected_speedup for r in back.rounds] == [r.expected_speedup for r in trace.rounds]


def test_auto_sampling_follows_the_target_as_its_draft_length_adapts(monkeypatch):
    """Costs where one drafted token pays only while acceptance looks good: auto drafts in round 1, and after a
    rejection decodes plainly. The first three tokens of the real decoder still follow the target's joint
    distribution (chi-square over 2000 seeded runs): choosing γ from the past never biases the output."""
    from scipy.stats import chisquare

    from test_distribution import CTX, V, dist

    target, draft = tiny(vocab_size=V, seed=0), tiny(vocab_size=V, seed=1)
    fake_costs(monkeypatch, {g: 1 + 0.5 * g for g in range(16)}, 0.0)
    cfg = mtplab.SamplingConfig(1.0)
    dec = SpeculativeDecoder(target, mtplab.DraftModelDrafter(draft.model), num_draft_tokens=2, temperature=1.0,
                             record=False)
    n, counts, lengths = 2000, {}, set()
    for seed in range(n):
        trace = dec.generate(CTX, max_new_tokens=3, seed=seed)
        counts[tuple(trace.token_ids[:3])] = counts.get(tuple(trace.token_ids[:3]), 0) + 1
        lengths.add(tuple(r.num_draft_tokens for r in trace.rounds))
    assert any(0 in ks for ks in lengths) and any(ks[0] > 0 for ks in lengths)  # it did adapt
    p1 = dist(target, CTX, cfg)
    expected = {}
    for a in range(V):
        p2 = dist(target, CTX + [a], cfg)
        for b in range(V):
            p3 = dist(target, CTX + [a, b], cfg)
            for c in range(V):
                expected[a, b, c] = float(p1[a] * p2[b] * p3[c]) * n
    keep = [k for k, e in expected.items() if e >= 5]
    rest = [k for k in expected if k not in keep]
    obs = [counts.get(k, 0) for k in keep] + [sum(counts.get(k, 0) for k in rest)]
    exp = [expected[k] for k in keep] + [sum(expected[k] for k in rest)]
    stat, pvalue = chisquare(obs, [e * sum(obs) / sum(exp) for e in exp])
    assert pvalue > 1e-3, f"auto's samples do not follow the target (chi2={stat:.1f}, p={pvalue:.2g})"


def test_measured_costs_on_a_tiny_target_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPLAB_KERNEL_CACHE", str(tmp_path))
    target = tiny(seed=3)
    v = costs.verify_curve(target, progress=False)
    assert sorted(v) == list(range(16)) and v[0] == 1.0 and all(x > 0 for x in v.values())
    c = draft_cost(mtplab.PromptLookupDrafter(), target)
    assert 0 <= c < 1
    calls = []
    monkeypatch.setattr(kernels, "measure_passes", lambda *a, **k: calls.append(1))
    assert costs.verify_curve(target) == v and draft_cost(mtplab.PromptLookupDrafter(), target) == c
    assert calls == []


def test_verify_curve_is_made_non_decreasing():
    """A longer pass never costs less: noisy measurements that say so are pooled (least squares)."""
    assert costs.as_verify_cost({1: 2.0, 2: 2.2, 3: 2.6}) == pytest.approx({0: 1.0, 1: 1.1, 2: 1.3})
    v = costs.as_verify_cost({1: 2.0, 2: 1.8, 3: 2.6, 4: 2.4})
    assert v == pytest.approx({0: 1.0, 1: 1.0, 2: 2.5 / 1.9, 3: 2.5 / 1.9})
    assert all(v[g] <= v[g + 1] for g in range(3))
