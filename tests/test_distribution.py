"""Speculative sampling must follow the target's distribution exactly.

Exact check: on a tiny model with an 8-token vocabulary, enumerate every draft the drafter can make, weight it by
its draft probability, and add up the acceptance / residual-resampling outcomes using mtplab's own formulas
(``sampling.probs``, ``accept_prob``, ``residual``). The result must equal the target's distribution of the
first emitted token and of the first two emitted tokens. Then a seeded chi-square test runs the real decoder.
"""

import pytest
import torch
from scipy.stats import chisquare

import mtplab
from mtplab import sampling
from mtplab.sampling import SamplingConfig

from conftest import tiny

V = 8
CTX = [1, 2, 3, 1, 2]
CONFIGS = [SamplingConfig(0.5), SamplingConfig(1.0), SamplingConfig(1.0, top_k=4), SamplingConfig(0.5, top_p=0.8),
           SamplingConfig(1.0, top_k=5, top_p=0.7)]


@pytest.fixture(scope="module")
def pair():
    return tiny(vocab_size=V, seed=0), tiny(vocab_size=V, seed=1)


def dist(model, ids, cfg):
    with torch.inference_mode():
        return sampling.probs(model.model(torch.tensor([ids])).logits[0, -1], cfg).double()


def first_token_dist(target, q_of, ctx, cfg):
    """Exact distribution of the first token a speculative round emits, drafting one token."""
    p = dist(target, ctx, cfg)
    q = q_of(ctx)
    out = torch.zeros(V, dtype=torch.float64)
    for x in range(V):
        if q[x] == 0:
            continue
        a = sampling.accept_prob(float(p[x]), float(q[x]))
        out[x] += q[x] * a
        out += q[x] * (1 - a) * sampling.residual(p, q)
    return out


def two_token_dist(target, q_of, ctx, cfg, q_next=None):
    """Exact joint distribution of the first two emitted tokens with a 2-token draft (and, after an early
    rejection, the next round's first token). ``q_next(ctx, x1)``: the drafter's distribution for its second
    token after drafting x1 (default: ``q_of(ctx + [x1])``; drafters with their own state pass their own)."""
    q_next = q_next or (lambda c, x: q_of(c + [x]))
    out = torch.zeros(V, V, dtype=torch.float64)
    p1, q1 = dist(target, ctx, cfg), q_of(ctx)
    for x1 in range(V):
        if q1[x1] == 0:
            continue
        a1 = sampling.accept_prob(float(p1[x1]), float(q1[x1]))
        # rejected at position 1: y1 ~ residual, then y2 is the next round's first token
        r1 = sampling.residual(p1, q1)
        for y1 in range(V):
            if r1[y1] > 0:
                out[y1] += q1[x1] * (1 - a1) * r1[y1] * first_token_dist(target, q_of, ctx + [y1], cfg)
        # accepted x1: the second drafted token x2 decides y2 in this round
        p2, q2 = dist(target, ctx + [x1], cfg), q_next(ctx, x1)
        for x2 in range(V):
            if q2[x2] == 0:
                continue
            a2 = sampling.accept_prob(float(p2[x2]), float(q2[x2]))
            out[x1, x2] += q1[x1] * a1 * q2[x2] * a2
            out[x1] += q1[x1] * a1 * q2[x2] * (1 - a2) * sampling.residual(p2, q2)
    return out


def target_joint(target, ctx, cfg):
    p1 = dist(target, ctx, cfg)
    return torch.stack([p1[y] * dist(target, ctx + [y], cfg) for y in range(V)])


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_exact_distribution_draft_model(pair, cfg):
    target, draft = pair
    q_of = lambda ids: dist(draft, ids, cfg)
    assert torch.allclose(first_token_dist(target, q_of, CTX, cfg), dist(target, CTX, cfg), atol=1e-9)
    assert torch.allclose(two_token_dist(target, q_of, CTX, cfg), target_joint(target, CTX, cfg), atol=1e-9)


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=str)
def test_exact_distribution_prompt_lookup(pair, cfg):
    """A deterministic drafter has one-hot q: the drafted token x is kept with probability p(x)."""
    target, _ = pair

    def q_of(ids):
        guess = mtplab.drafters.prompt_lookup.lookup(ids, 1, 3)
        q = torch.zeros(V, dtype=torch.float64)
        q[guess[0] if guess else 0] = 1.0
        return q

    assert torch.allclose(first_token_dist(target, q_of, CTX, cfg), dist(target, CTX, cfg), atol=1e-9)
    assert torch.allclose(two_token_dist(target, q_of, CTX, cfg), target_joint(target, CTX, cfg), atol=1e-9)


@pytest.mark.parametrize("drafter_kind,cfg", [("draft-model", SamplingConfig(1.0)),
                                              ("draft-model", SamplingConfig(0.5, top_k=5, top_p=0.9)),
                                              ("prompt-lookup", SamplingConfig(1.0))])
def test_chi_square_on_real_decoder_samples(pair, drafter_kind, cfg):
    """The real decoder, seeded: the first two emitted tokens follow the target's joint distribution."""
    target, draft = pair
    drafter = mtplab.DraftModelDrafter(draft.model) if drafter_kind == "draft-model" else mtplab.PromptLookupDrafter()
    dec = mtplab.SpeculativeDecoder(target, drafter, num_draft_tokens=3, schedule="constant", temperature=cfg.temperature,
                                    top_k=cfg.top_k, top_p=cfg.top_p, record=False)
    n = 1000
    counts = torch.zeros(V * V)
    for seed in range(n):
        y = dec.generate(CTX, max_new_tokens=2, seed=seed).token_ids
        counts[y[0] * V + y[1]] += 1
    expected = target_joint(target, CTX, cfg).flatten() * n
    keep = expected >= 5  # pool the rare cells so the chi-square approximation holds
    obs = torch.cat([counts[keep], counts[~keep].sum().unsqueeze(0)]).numpy()
    exp = torch.cat([expected[keep], expected[~keep].sum().unsqueeze(0)]).numpy()
    if exp[-1] == 0:
        assert obs[-1] == 0
        obs, exp = obs[:-1], exp[:-1]
    stat, pvalue = chisquare(obs, exp * obs.sum() / exp.sum())
    assert pvalue > 1e-3, f"speculative samples do not follow the target (chi2={stat:.1f}, p={pvalue:.2g})"


def test_verify_itself_samples_the_target_distribution():
    """High-power check of ``sampling.verify``'s own random path (draws, thresholds, residual sampling): draft two
    tokens from q with a fixed p/q table, run verify, and compare the first two emitted tokens with p."""
    g = torch.Generator().manual_seed(0)
    v = 5
    p1, q1 = torch.softmax(torch.randn(v, generator=g) * 2, 0), torch.softmax(torch.randn(v, generator=g) * 2, 0)
    p2, q2 = torch.softmax(torch.randn(v, v, generator=g) * 2, 1), torch.softmax(torch.randn(v, v, generator=g) * 2, 1)
    p3 = torch.softmax(torch.randn(v, v, v, generator=g), 2)
    cfg = SamplingConfig(1.0)
    counts = torch.zeros(v, v)
    n = 40000
    for _ in range(n):
        x1 = sampling.sample(q1, g)
        x2 = sampling.sample(q2[x1], g)
        p = torch.stack([p1, p2[x1], p3[x1, x2]])
        res = sampling.verify([x1, x2], p, torch.stack([q1, q2[x1]]), p.log(), cfg, g)
        y = [x1, x2][: res.num_accepted] + [res.token]
        if len(y) == 1:  # the next round would start at y1: its first token follows p2[y1] (checked above)
            y.append(sampling.sample(p2[y[0]], g))
        counts[y[0], y[1]] += 1
    expected = (p1[:, None] * p2).flatten() * n
    stat, pvalue = chisquare(counts.flatten().numpy(), expected.numpy() * n / expected.sum().item())
    assert pvalue > 1e-3, f"verify's samples do not follow p (chi2={stat:.1f}, p={pvalue:.2g})"


@pytest.mark.parametrize("cfg", [SamplingConfig(1.0, top_k=3), SamplingConfig(0.7, top_p=0.6),
                                 SamplingConfig(1.3, top_k=4, top_p=0.8)])
def test_draft_model_q_is_its_distribution_under_the_runs_sampling(pair, cfg):
    """Each drafted token's q row is exactly the draft model's next-token distribution after the tokens before it,
    filtered by the run's temperature, top-k and top-p (so min(1, p/q) uses the q the token was drawn from)."""
    from mtplab.models import forward, new_cache

    _, draft = pair
    drafter = mtplab.DraftModelDrafter(draft.model)
    drafter.bind(pair[0])
    drafter.reset(CTX, None)
    with torch.inference_mode():
        got = drafter.propose(CTX, 4, cfg, torch.Generator().manual_seed(1))
        for i, token in enumerate(got.tokens):
            logits, _ = forward(draft.model, CTX + got.tokens[:i], new_cache(draft.model))
            want = sampling.probs(logits[-1], cfg)
            assert torch.allclose(got.q[i], want, atol=1e-6)
            assert want[token] > 0 and (want == 0).any()  # drawn from the filtered support, which is a strict subset
