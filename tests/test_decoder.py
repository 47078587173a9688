"""The decoder on tiny random models: greedy exactness, rollback, reproducibility, live settings, bad input."""
import pytest
import torch

import mtplab
from mtplab import SpeculativeDecoder, fastpath
from mtplab.decoder import TargetPasses
from mtplab.models import forward, new_cache

from conftest import Oracle, tiny

PROMPT = [1, 2, 3, 4, 5, 6, 1, 2, 3]


def drafters_for(target):
    other = tiny(seed=7)  # a separate random model with the same vocabulary
    return {
        "prompt-lookup": mtplab.PromptLookupDrafter(),
        "draft-model": mtplab.DraftModelDrafter(other.model),
        "truncated-copy": mtplab.DraftModelDrafter(mtplab.truncated_copy(target, 1)),
        "layer-skip": mtplab.LayerSkipDrafter(target, exit_layer=1),
    }


def plain_ids(target, prompt, n):
    return SpeculativeDecoder(target, None).generate(prompt, max_new_tokens=n).token_ids


def gap_report(target, prompt, got, want):
    """Top-2 logit gap where two greedy runs part: ≈1e-5 means float rounding, larger means a bug."""
    i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    with torch.inference_mode():
        logits = target.model(torch.tensor([list(prompt) + want[:i]])).logits[0, -1]
    top = torch.topk(logits, 2).values
    return f"first mismatch at new token {i}: top-2 logit gap {float(top[0] - top[1]):.3g}"


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("gamma", [1, 3, 7])
def test_greedy_through_the_fused_layers_equals_generate(seed, gamma):
    """The target's passes through mtplab's fused C layers (mtplab.fastpath.fused_forward): every drafter's greedy
    output is transformers' generate token for token."""
    target = tiny(seed=seed)
    with torch.inference_mode():
        hf = target.model.generate(torch.tensor([PROMPT]), max_new_tokens=40, do_sample=False, min_new_tokens=40)
    want = hf[0, len(PROMPT):].tolist()
    with fastpath.fused_forward(target.model):
        assert plain_ids(target, PROMPT, 40) == want
        for name, drafter in drafters_for(target).items():
            trace = SpeculativeDecoder(target, drafter, num_draft_tokens=gamma, schedule="constant").generate(
                PROMPT, max_new_tokens=40)
            assert trace.token_ids == want, f"{name}: {gap_report(target, PROMPT, trace.token_ids, want)}"


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("gamma", [1, 3, 7])
def test_greedy_equals_plain_for_every_drafter(seed, gamma):
    target = tiny(seed=seed)
    want = plain_ids(target, PROMPT, 40)
    with torch.inference_mode():
        hf = target.model.generate(torch.tensor([PROMPT]), max_new_tokens=40, do_sample=False, min_new_tokens=40)
    assert hf[0, len(PROMPT):].tolist() == want
    for name, drafter in drafters_for(target).items():
        trace = SpeculativeDecoder(target, drafter, num_draft_tokens=gamma, schedule="constant").generate(PROMPT, max_new_tokens=40)
        assert trace.token_ids == want, f"{name}: {gap_report(target, PROMPT, trace.token_ids, want)}"
        assert len(trace.token_ids) == 40 and trace.stop_reason == "max_new_tokens"
        assert all(r.num_drafted <= gamma for r in trace.rounds)


def test_layer_skip_and_truncated_copy_accept_something():
    target = tiny(seed=0, num_layers=4)
    for drafter in (mtplab.LayerSkipDrafter(target, exit_layer=3), mtplab.DraftModelDrafter(mtplab.truncated_copy(target, 3))):
        m = SpeculativeDecoder(target, drafter, num_draft_tokens=3, schedule="constant").generate(PROMPT, max_new_tokens=40).metrics
        assert m.accepted > 0 and m.mean_acceptance_length > 1


def test_round_records_are_consistent():
    target = tiny()
    trace = SpeculativeDecoder(target, mtplab.DraftModelDrafter(tiny(seed=7).model), num_draft_tokens=3, schedule="constant",
                               temperature=0.8).generate(PROMPT, max_new_tokens=30, seed=4)
    ctx = len(PROMPT)
    for r in trace.rounds:
        assert r.context_len == ctx
        ctx += len(r.emitted_ids)
        assert r.target_cache_len == ctx - 1  # the cache holds every token but the newest
        assert r.target_cache_before == r.context_len + r.num_drafted
        assert r.drafter_cache_len <= ctx - 1
        assert len(r.p) == len(r.q) == r.num_drafted
        assert len(r.accept_probs) == len(r.draws) == min(r.num_drafted, r.num_accepted + 1)
        for i in range(min(r.num_drafted, r.num_accepted + 1)):
            assert r.accept_probs[i] == pytest.approx(min(1.0, r.p[i] / r.q[i]), rel=1e-5)
            assert 0 <= r.draws[i] < 1
            assert (r.draws[i] < r.accept_probs[i]) == (i < r.num_accepted)
        want = "plain" if not r.num_drafted else "bonus" if r.num_accepted == r.num_drafted else "correction"
        assert r.token_kind == want
        if r.token_kind == "correction":
            assert r.residual_top and all(x[2] >= 0 for x in r.residual_top)
            assert r.token_id in [x[0] for x in r.residual_top] or r.residual_top[-1][2] < 0.2
        assert len(r.p_top) == r.num_drafted + 1 and len(r.q_top) == r.num_drafted
        assert r.draft_seconds >= 0 and r.verify_seconds > 0 and r.bookkeeping_seconds >= 0
    m = trace.metrics
    assert m.new_tokens == 30 == sum(len(r.emitted_ids) for r in trace.rounds)
    assert m.mean_acceptance_length == pytest.approx(30 / m.rounds)
    assert m.acceptance_rate == pytest.approx(m.accepted / m.drafted)
    assert m.per_position_acceptance[0] == pytest.approx(
        sum(r.num_accepted > 0 for r in trace.rounds if r.num_drafted) / sum(1 for r in trace.rounds if r.num_drafted))


def test_same_seed_same_trace_and_json_round_trip():
    target = tiny()
    dec = SpeculativeDecoder(target, mtplab.DraftModelDrafter(tiny(seed=7).model), num_draft_tokens=4, schedule="constant",
                             temperature=1.0, top_k=20, top_p=0.9)
    a = dec.generate(PROMPT, max_new_tokens=30, seed=11)
    b = dec.generate(PROMPT, max_new_tokens=30, seed=11)
    c = dec.generate(PROMPT, max_new_tokens=30, seed=12)
    strip = lambda t: [(r.draft_ids, r.num_accepted, r.token_id, r.draws, r.accept_probs) for r in t.rounds]
    assert strip(a) == strip(b) and a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    back = mtplab.Trace.from_json(a.to_json())
    assert back.token_ids == a.token_ids and back.metrics == a.metrics and back.config == a.config
    assert back.rounds[3].p_top == a.rounds[3].p_top


def test_rollback_leaves_caches_equal_to_fresh_prefill():
    target = tiny()
    drafter = mtplab.DraftModelDrafter(tiny(seed=7).model)
    dec = SpeculativeDecoder(target, drafter, num_draft_tokens=5, schedule="constant", temperature=1.0)
    passes = TargetPasses(target.model)  # the decoder's target side, handed in to look at its cache
    stream = dec.stream(PROMPT, max_new_tokens=25, seed=3, passes=passes)
    seen = [next(stream) for _ in range(4)]
    assert any(r.num_accepted < r.num_drafted for r in seen), "want at least one rollback to check"
    ids = PROMPT + dec.trace.token_ids
    cache = passes.cache
    fresh = new_cache(target.model)
    with torch.inference_mode():
        forward(target.model, ids[:-1], fresh, logits=False)
    assert cache.get_seq_length() == len(ids) - 1
    for a, b in zip(cache.layers, fresh.layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
    dfresh = new_cache(drafter.model)
    n = drafter.cache.get_seq_length()
    with torch.inference_mode():
        forward(drafter.model, ids[:n], dfresh, logits=False)
    for a, b in zip(drafter.cache.layers, dfresh.layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-5)
    stream.close()


def test_settings_change_between_rounds_and_heuristic_schedule():
    target = tiny()
    dec = SpeculativeDecoder(target, mtplab.LayerSkipDrafter(target, exit_layer=1), num_draft_tokens=2, schedule="constant")
    ks = []
    for r in dec.stream(PROMPT, max_new_tokens=40):
        ks.append(r.num_draft_tokens)
        if r.index == 2:
            dec.num_draft_tokens = 5
            dec.temperature = 0.9
    budget = [40 - (r.context_len - len(PROMPT)) for r in dec.trace.rounds]  # tokens still to emit
    assert ks[:3] == [2, 2, 2] and ks[3:] == [min(5, b - 1) for b in budget[3:]] and ks.count(5) >= 3
    assert dec.trace.rounds[2].temperature == 0.0 and dec.trace.rounds[3].temperature == 0.9

    dec = SpeculativeDecoder(target, mtplab.PromptLookupDrafter(), num_draft_tokens=2, schedule="heuristic")
    k = 2
    for r in dec.generate(PROMPT, max_new_tokens=60).rounds:
        if r.num_drafted:
            assert r.num_draft_tokens == min(k, 60)
            k = k + 2 if r.num_accepted == r.num_drafted else max(1, k - 1)


def test_stop_ends_stream_cleanly():
    target = tiny()
    dec = SpeculativeDecoder(target, mtplab.PromptLookupDrafter())
    for r in dec.stream(PROMPT, max_new_tokens=50):
        if r.index == 3:
            dec.stop()
    assert len(dec.trace.rounds) == 4 and dec.trace.stop_reason == "stopped"


def eos_target():
    """A tiny target whose 13th greedy token is its EOS: ``(target, its greedy text, the text up to the EOS)``."""
    target = tiny()
    want = plain_ids(target, PROMPT, 40)
    target.eos_token_ids = {want[12]}
    return target, want, want[: want.index(want[12]) + 1]


def test_accepted_eos_ends_the_run():
    target, want, cut = eos_target()
    for drafter in (None, mtplab.PromptLookupDrafter(), mtplab.LayerSkipDrafter(target, exit_layer=1)):
        trace = SpeculativeDecoder(target, drafter, num_draft_tokens=7, schedule="constant").generate(PROMPT, max_new_tokens=40)
        assert trace.token_ids == cut and trace.stop_reason == "eos"


def test_eos_accepted_inside_a_drafted_block_ends_the_run_there():
    """An EOS accepted in the middle of a draft is emitted (and the drafted tokens after it are not)."""
    target, want, cut = eos_target()
    eos = cut[-1]
    trace = SpeculativeDecoder(target, Oracle(PROMPT + want), num_draft_tokens=7,
                               schedule="constant").generate(PROMPT, max_new_tokens=40)
    assert trace.token_ids == cut and trace.stop_reason == "eos"
    last = trace.rounds[-1]
    assert last.draft_ids[last.num_accepted - 1] == eos and last.num_accepted < last.num_drafted
    assert last.token_id is None and last.emitted_ids[-1] == eos


def test_a_round_that_emits_nothing_stops_the_run():
    target = tiny()
    dec = SpeculativeDecoder(target, mtplab.PromptLookupDrafter(), num_draft_tokens=2, schedule="constant")
    real = dec._round
    dec._round = lambda *a: (lambda rnd, h: (setattr(rnd, "num_accepted", 0) or setattr(rnd, "token_id", None)
                                             or (rnd, h)))(*real(*a))
    with pytest.raises(RuntimeError, match="emitted no token"):
        dec.generate(PROMPT, max_new_tokens=10)


def test_max_new_tokens_is_exact():
    target = tiny()
    for n in (1, 2, 5):
        trace = SpeculativeDecoder(target, mtplab.PromptLookupDrafter(), num_draft_tokens=7, schedule="constant").generate(PROMPT, n)
        assert len(trace.token_ids) == n


@pytest.mark.parametrize("kw,call,msg", [
    (dict(num_draft_tokens=0), {}, r"num_draft_tokens must be in \[1, 64\], got 0"),
    (dict(num_draft_tokens=-3), {}, "num_draft_tokens"),
    (dict(num_draft_tokens=10_000), {}, r"num_draft_tokens must be in \[1, 64\]"),
    (dict(temperature=-1.0), {}, "temperature must be"),
    (dict(top_p=0.0), {}, r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.01), {}, "top_p"),
    (dict(top_k=-2), {}, "top_k must be an integer >= 0"),
    (dict(schedule="fast"), {}, "schedule must be one of"),
    ({}, dict(max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
    ({}, dict(prompt=[]), "prompt token ids must be a non-empty list"),
    ({}, dict(prompt=[1] * 500, max_new_tokens=20), r"exceeds the context .* at most 512 tokens"),
])
def test_bad_input_is_refused_with_the_value_and_range(kw, call, msg):
    target = tiny()
    with pytest.raises(ValueError, match=msg):
        dec = SpeculativeDecoder(target, mtplab.PromptLookupDrafter(), **kw)
        args = dict(prompt=PROMPT, max_new_tokens=8) | call
        dec.generate(args.pop("prompt"), **args)


def test_live_setting_rejected_keeps_old_value():
    dec = SpeculativeDecoder(tiny(), None, temperature=0.5)
    with pytest.raises(ValueError, match="top_p"):
        dec.top_p = 0
    assert dec.top_p == 1.0 and dec.temperature == 0.5


def test_mismatched_vocabulary_is_refused():
    target = tiny(vocab_size=64)
    with pytest.raises(ValueError, match="vocabulary of 80 tokens but the target .* has 64"):
        SpeculativeDecoder(target, mtplab.DraftModelDrafter(tiny(vocab_size=80).model))


def test_layer_skip_exit_layer_range():
    target = tiny(num_layers=2)
    with pytest.raises(ValueError, match=r"exit_layer must be an integer in \[1, 1\]"):
        mtplab.LayerSkipDrafter(target, exit_layer=2)


def test_record_off_keeps_decisions():
    target = tiny()
    d = lambda rec: SpeculativeDecoder(target, mtplab.DraftModelDrafter(tiny(seed=7).model), temperature=1.0,
                                       record=rec).generate(PROMPT, 20, seed=5)
    on, off = d(True), d(False)
    assert on.token_ids == off.token_ids and off.rounds[0].p_top == [] and on.rounds[0].p_top


def test_truncated_copy_has_its_own_layers_and_shares_only_the_embeddings():
    target = tiny(num_layers=3)
    small = mtplab.truncated_copy(target, 2)
    assert len(small.model.layers) == 2 and len(target.model.model.layers) == 3
    assert small.model.layers[0].self_attn.q_proj.weight.data_ptr() != target.model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    assert small.model.norm is not target.model.model.norm
    assert small.model.embed_tokens is target.model.model.embed_tokens and small.lm_head is target.model.lm_head
    alone = mtplab.truncated_copy(target, 2, share_embeddings=False)  # nothing shared
    assert alone.model.embed_tokens is not target.model.model.embed_tokens and alone.lm_head is not target.model.lm_head
    assert torch.equal(alone.lm_head.weight, target.model.lm_head.weight)
    shared = mtplab.truncated_copy(target, 2, share_weights=True)
    assert shared.model.layers[1] is target.model.model.layers[1] and shared.lm_head is target.model.lm_head
    x = torch.tensor([PROMPT])
    with torch.inference_mode():
        assert torch.allclose(small(x).logits, shared(x).logits) and torch.allclose(alone(x).logits, shared(x).logits)


def test_no_rejected_token_after_an_accepted_eos():
    from mtplab.trace import Round

    r = Round(index=0, context_len=3, drafter="d", num_draft_tokens=3, draft_ids=[5, 2, 7], draft_text=["a", "<eos>", "b"],
              num_accepted=2, token_id=None)
    assert [e[0] for e in r.token_events()] == ["accepted", "accepted"]


def test_recorded_candidates_are_the_rows_top_candidates():
    """What a Round records for the views, against torch.topk row by row: the top 5 of every row of p and q, the
    drafted tokens' p and q, and per drafted token the union of it and both rows' top 5 with their p and q, most
    likely under p first."""
    from types import SimpleNamespace

    from mtplab.decoder import Round

    target = mtplab.tiny_random_target(vocab_size=49152, seed=0, hidden_size=16, num_layers=1)
    dec = SpeculativeDecoder(target, None)
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(3 * torch.randn(4, 49152, generator=g), -1)
    q = torch.softmax(3 * torch.randn(3, 49152, generator=g), -1)
    tokens = [int(torch.topk(q[0], 2).indices[1]), 77, int(torch.argmax(p[2]))]
    residual = torch.softmax(torch.randn(49152, generator=g), -1)
    for qq in (q, None):
        rnd = Round(index=0, context_len=5, drafter="x", num_draft_tokens=3, draft_ids=tokens, num_accepted=1,
                    token_id=9, token_kind="resampled")
        dec._record(rnd, p, qq, SimpleNamespace(residual=residual))
        text = target.token_text

        def tops(row):
            v, i = torch.topk(row, 5)
            return [[int(a), text(int(a)), float(b)] for b, a in zip(v, i)]

        assert rnd.p_top == [tops(row) for row in p] and rnd.residual_top == tops(residual)
        assert rnd.q_top == ([] if qq is None else [tops(row) for row in q])
        assert rnd.p == [float(p[i, t]) for i, t in enumerate(tokens)]
        assert rnd.q == ([1.0] * 3 if qq is None else [float(q[i, t]) for i, t in enumerate(tokens)])
        for i, t in enumerate(tokens):
            ids = {t, *torch.topk(p[i], 5).indices.tolist()} | (set() if qq is None else set(torch.topk(q[i], 5).indices.tolist()))
            want = sorted(([j, text(j), float(p[i, j]), float(j == t) if qq is None else float(q[i, j])] for j in ids),
                          key=lambda r: -r[2])
            assert rnd.candidates[i] == want
        assert rnd.draft_text == [text(t) for t in tokens] and rnd.token_text == text(9)
    # token texts are remembered per id, and each is the id's own
    assert [target.token_text(t) for t in (5, 6, 5, 77)] == [target.decode([t]) for t in (5, 6, 5, 77)]
