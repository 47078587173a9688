"""The MTP head's fused C step (mtplab.drafters.mtp.FusedHeadStep): the head's own function from float16 weights,
exact decoding through it (greedy and sampled), and when the drafter uses it."""
import json

import pytest
import torch

import mtplab
from mtplab import SpeculativeDecoder, kernels, sampling
from mtplab.drafters.mtp import FusedHeadStep, MTPDrafter, MTPHead

from conftest import tiny
from test_distribution import CONFIGS, CTX, V, dist, first_token_dist, target_joint, two_token_dist
from test_mtp import PROMPT



def needs_kernel():
    why = FusedHeadStep.unavailable(half_head(16), torch.zeros(4, 16))
    if why is not None:
        pytest.fail(f"the fused MTP step cannot run here: {why}")


def half_head(hidden, layers=2, inner=None, seed=0):
    """A random head whose weights are float16 values, as the shipped head's are."""
    torch.manual_seed(seed)
    head = MTPHead(hidden, num_layers=layers, intermediate_size=inner)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn_like(p).mul_(0.3).half().float())
    return head.eval()


def forced(target, head, vocab_ids=None, **kw):
    """A drafter bound to ``target`` that drafts through the fused step whatever was measured here."""
    drafter = MTPDrafter(head, vocab_ids, **kw)
    drafter.bind(target)
    drafter._fused = FusedHeadStep(head, target.model.get_output_embeddings().weight, drafter.vocab_ids)
    return drafter


@pytest.mark.parametrize("hidden, inner, vocab, rows", [(32, 64, 64, 1), (40, 72, 50, 3), (64, 144, 97, 5)])
def test_the_fused_step_is_the_heads_step_with_a_float16_lm_head(hidden, inner, vocab, rows):
    """Sizes off the 16-lane and 4-row blocks on purpose: the kernels' tails run too."""
    needs_kernel()
    head = half_head(hidden, layers=3, inner=inner)
    lm = torch.randn(vocab, hidden)
    vocab_ids = torch.tensor([v for v in range(vocab) if v % 3])
    step = FusedHeadStep(head, lm, vocab_ids)
    h, e = torch.randn(rows, hidden), torch.randn(rows, hidden)
    with torch.inference_mode():
        s_want = head(h, e)
        logits_want = s_want @ lm[vocab_ids].half().float().T
        s, logits = step(h, e)
    assert torch.allclose(s, s_want, atol=1e-5, rtol=1e-5), (s - s_want).abs().max()
    assert torch.allclose(logits, logits_want, atol=1e-4, rtol=1e-4), (logits - logits_want).abs().max()
    for r in range(rows):  # each row on its own gives the same
        s1, l1 = step(h[r:r + 1], e[r:r + 1])
        assert torch.allclose(s1, s[r:r + 1], atol=1e-6) and torch.allclose(l1, logits[r:r + 1], atol=1e-5)


@pytest.mark.parametrize("gamma", [1, 3, 7])
@pytest.mark.parametrize("vocab, ngram", [(None, None), (list(range(0, 64, 2)), None), (None, 2)])
def test_greedy_through_the_fused_step_equals_plain(gamma, vocab, ngram):
    needs_kernel()
    target = tiny()
    want = SpeculativeDecoder(target, None).generate(PROMPT, 40).token_ids
    drafter = forced(target, half_head(32), vocab, context_ngram=ngram)
    trace = SpeculativeDecoder(target, drafter, num_draft_tokens=gamma, schedule="constant").generate(PROMPT, 40)
    assert trace.token_ids == want
    assert sum(r.num_drafted for r in trace.rounds) > 0


def test_greedy_tree_drafts_through_the_fused_step_equal_plain():
    needs_kernel()
    target = tiny()
    want = SpeculativeDecoder(target, None).generate(PROMPT, 40).token_ids
    drafter = forced(target, half_head(32), tree_width=3, tree_copy=True)
    trace = SpeculativeDecoder(target, drafter, num_draft_tokens=3, schedule="constant").generate(PROMPT, 40)
    assert trace.token_ids == want


def test_drafts_advanced_together_each_read_their_own_token():
    """Tree drafting advances several drafts in one call: each row gets what it would alone."""
    needs_kernel()
    target = tiny()
    drafter = forced(target, half_head(32))
    h, tokens = torch.randn(3, 32), [5, 9, 9]
    with torch.inference_mode():
        s, logits = drafter.advance(h, tokens, None)
        for r, t in enumerate(tokens):
            s1, l1 = drafter.advance(h[r:r + 1], [t], None)
            assert torch.allclose(s[r], s1[0], atol=1e-6) and torch.equal(logits[r].isinf(), l1[0].isinf())
            assert torch.allclose(s1, drafter.step(h[r:r + 1], [t], None), atol=1e-5)


def fused_q(target, drafter, cfg):
    """q of the first and second drafted token, computed through the fused step itself."""
    def state(ctx):
        with torch.inference_mode():
            h = target.model(torch.tensor([ctx[:-1]]), output_hidden_states=True).hidden_states[-1][0, -1]
            return drafter.advance(h[None], [ctx[-1]], None)

    def q_first(ctx):
        return sampling.probs(state(ctx)[1][0], cfg).double()

    def q_next(ctx, x1):
        with torch.inference_mode():
            return sampling.probs(drafter.advance(state(ctx)[0], [x1], None)[1][0], cfg).double()

    return q_first, q_next


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_sampling_through_the_fused_step_is_exact(cfg):
    """Enumerated: the emitted tokens follow the target's distribution with the fused step's q; and the decoder
    verifies with the very q the fused step drafted from (recorded in the trace)."""
    needs_kernel()
    target = tiny(vocab_size=V)
    drafter = forced(target, half_head(32), [0, 1, 2, 3, 5])
    q_first, q_next = fused_q(target, drafter, cfg)
    assert torch.allclose(first_token_dist(target, q_first, CTX, cfg), dist(target, CTX, cfg), atol=1e-9)
    assert torch.allclose(two_token_dist(target, q_first, CTX, cfg, q_next), target_joint(target, CTX, cfg), atol=1e-9)
    dec = SpeculativeDecoder(target, drafter, num_draft_tokens=1, schedule="constant", temperature=cfg.temperature,
                             top_k=cfg.top_k, top_p=cfg.top_p)
    trace = dec.generate(CTX, 6, seed=3)
    ids = list(CTX)
    for r in trace.rounds:
        if r.num_drafted:
            want = float(q_first(ids)[r.draft_ids[0]])
            assert r.q[0] == pytest.approx(want, rel=1e-5, abs=1e-7)
        ids += r.emitted_ids


def test_a_head_changed_after_binding_drafts_through_its_modules_again():
    """The fused step reads copies: once training (any in-place change) alters the weights, the drafter goes back
    to the modules, so its drafts are the changed head's."""
    needs_kernel()
    target = tiny()
    drafter = forced(target, half_head(32))
    h = torch.randn(1, 32)
    with torch.inference_mode():
        assert torch.allclose(drafter.advance(h, [3], None)[0], drafter.step(h, [3], None), atol=1e-5)
    with torch.no_grad():
        drafter.head.blocks[0].down.weight.mul_(3.0)
    assert not drafter._fused.fresh()
    with torch.inference_mode():
        assert torch.equal(drafter.advance(h, [3], None)[0], drafter.step(h, [3], None))


def test_the_fused_step_is_refused_where_it_cannot_run(monkeypatch):
    lm = torch.zeros(8, 16)
    assert "attention" in FusedHeadStep.unavailable(MTPHead(16, context_attention=True), lm)
    assert "float32" in FusedHeadStep.unavailable(MTPHead(16), lm.half())
    assert "float16 values" in FusedHeadStep.unavailable(MTPHead(16), lm)  # a head trained in float32
    monkeypatch.setenv("MTPLAB_KERNELS", "off")
    assert FusedHeadStep.unavailable(half_head(16), lm) == "MTPLAB_KERNELS=off"
    target = tiny()
    drafter = MTPDrafter(half_head(32))
    drafter.bind(target)
    assert drafter._fused is None


def test_bind_uses_the_fused_step_only_where_it_was_measured_faster():
    """The choice is the cached measurement's (kernels.timed_choice): faster -> fused, else the modules."""
    needs_kernel()
    target = mtplab.tiny_random_target(hidden_size=32, seed=5)
    head = half_head(32, seed=7)
    drafter = MTPDrafter(head)
    drafter.bind(target)  # measures and caches
    data = kernels.load_measurements()
    key = next(k for k in data["choices"] if k.startswith("mtp-step|") and "'hidden_size': 32" in k)
    for fused, modules, want in ((1.0, 2.0, True), (2.0, 1.0, False), (0.99, 1.0, False)):
        data["choices"][key] = {"modules": modules, "fused": fused}
        kernels.save_measurements(data)
        mtplab.drafters.mtp._FUSED_STEPS.clear()
        drafter = MTPDrafter(head)
        drafter.bind(target)
        assert (drafter._fused is not None) == want, (fused, modules)


def test_timed_choice_measures_once_and_keeps_the_reference_unless_beaten():
    calls = []
    runs = {"ref": lambda: calls.append("ref"), "other": lambda: calls.append("other")}
    got = kernels.timed_choice("test-choice|a", runs, reps=3)
    assert calls.count("ref") == calls.count("other") == 4  # a warm-up round, then 3 interleaved
    assert got in runs
    calls.clear()
    kernels.timed_choice("test-choice|a", runs, reps=3)
    assert calls == []  # cached
    data = kernels.load_measurements()
    data["choices"]["test-choice|b"] = {"ref": 1.0, "other": 0.5}
    data["choices"]["test-choice|c"] = {"ref": 1.0, "other": 0.99}
    kernels.save_measurements(data)
    assert kernels.timed_choice("test-choice|b", runs) == "other"
    assert kernels.timed_choice("test-choice|c", runs) == "ref"
    assert json.loads(kernels.cache_file().read_text())["choices"]["test-choice|a"].keys() == runs.keys()


@pytest.mark.slow
def test_the_shipped_drafter_through_the_fused_step_equals_generate(bundled):
    needs_kernel()
    drafter = mtplab.load_drafter("mtp", bundled)
    drafter._fused = FusedHeadStep(drafter.head, bundled.model.get_output_embeddings().weight, drafter.vocab_ids)
    prompt = "Explain why the sky is blue in two sentences."
    ids = bundled.encode(prompt)
    with torch.inference_mode():
        want = bundled.model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
    for gamma in (1, 3, 7):
        trace = SpeculativeDecoder(bundled, drafter, num_draft_tokens=gamma, schedule="constant").generate(ids, 40)
        assert trace.token_ids == want, gamma
        assert sum(r.num_accepted for r in trace.rounds) > 5
