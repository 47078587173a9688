import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from mtplab import sampling
from mtplab.sampling import SamplingConfig


@pytest.mark.parametrize("t,k,p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (0.5, 0, 0.8), (1.3, 10, 0.9)])
def test_probs_match_transformers_warpers(t, k, p):
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    ref = TemperatureLogitsWarper(t)(None, logits.clone())
    if k:
        ref = TopKLogitsWarper(k)(None, ref)
    if p < 1:
        ref = TopPLogitsWarper(p)(None, ref)
    expected = torch.softmax(ref, dim=-1)
    got = sampling.probs(logits, SamplingConfig(t, k, p))
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(3))


def test_greedy_probs_are_plain_softmax():
    logits = torch.tensor([1.0, 3.0, 2.0])
    assert torch.allclose(sampling.probs(logits, SamplingConfig(0.0)), torch.softmax(logits, -1))


def test_accept_prob_and_residual():
    assert sampling.accept_prob(0.2, 0.4) == pytest.approx(0.5)
    assert sampling.accept_prob(0.6, 0.4) == 1.0
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.6, 0.2])
    assert torch.allclose(sampling.residual(p, q), torch.tensor([1.0, 0.0, 0.0]))
    q2 = torch.tensor([0.1, 0.1, 0.8])
    assert torch.allclose(sampling.residual(p, q2), torch.tensor([0.4, 0.2, 0.0]) / 0.6)
    assert torch.equal(sampling.residual(p, p), p)  # p == q: never rejected; falls back to p


def test_verify_greedy_exact_match_and_bonus():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    cfg = SamplingConfig(0.0)
    p = sampling.probs(logits, cfg)
    v = sampling.verify([1, 0], p, None, logits, cfg, None)
    assert (v.num_accepted, v.token, v.kind, v.accept_probs) == (2, 2, "bonus", [1.0, 1.0])
    v = sampling.verify([1, 2], p, None, logits, cfg, None)
    assert (v.num_accepted, v.token, v.kind, v.accept_probs) == (1, 0, "correction", [1.0, 0.0])
    v = sampling.verify([], p[:1], None, logits[:1], cfg, None)
    assert (v.num_accepted, v.token, v.kind) == (0, 1, "plain")


def test_verify_sampling_uses_u_against_min_1_p_over_q():
    cfg = SamplingConfig(1.0)
    p = torch.tensor([[0.1, 0.9], [0.5, 0.5]])
    q = torch.tensor([[0.5, 0.5]])
    g = torch.Generator().manual_seed(0)
    u = float(torch.rand((), generator=torch.Generator().manual_seed(0)))  # the draw verify will make first
    v = sampling.verify([0], p, q, torch.log(p), cfg, g)
    assert v.draws[0] == pytest.approx(u) and v.accept_probs[0] == pytest.approx(0.2)
    if u < 0.2:
        assert v.num_accepted == 1
    else:  # rejected: the residual norm(max(0, p - q)) is all on token 1
        assert (v.num_accepted, v.token, v.kind) == (0, 1, "correction")
        assert torch.allclose(v.residual, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("kw,msg", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(temperature=float("nan")), "temperature"),
])
def test_bad_sampling_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingConfig(**kw)


def test_fast_argmax_and_top_equal_torchs():
    """sampling.argmax (NumPy) and sampling.top (block maxima first) are shortcuts for torch.argmax and
    torch.topk on long rows: same indices and values, ties broken towards the first index as torch does."""
    from mtplab.sampling import argmax, top

    g = torch.Generator().manual_seed(0)
    for n in (49152, 8192, 1000, 7):
        for _ in range(5):
            row = torch.randn(n, generator=g)
            assert argmax(row) == int(torch.argmax(row))
            vals, idx = top(row, 5)
            want = torch.topk(row, min(5, n))
            assert torch.equal(vals, want.values) and torch.equal(idx, want.indices)
    row = torch.zeros(49152)
    row[[40000, 70, 49151]] = 3.0  # a tie: the first index wins
    assert argmax(row) == 70 == int(torch.argmax(row))
    row[[5, 12000, 30000, 49150]] = torch.tensor([1.0, 2.0, 2.5, 0.5])
    vals, idx = top(row, 5)
    assert vals.tolist() == [3.0, 3.0, 3.0, 2.5, 2.0] and sorted(idx[:3].tolist()) == [70, 40000, 49151]
    assert idx[3:].tolist() == [30000, 12000]
    for n in (49152, 8192, 7):  # a few rows at once: each row as torch.topk gives it
        rows = torch.randn(4, n, generator=g)
        vals, idx = top(rows, 5)
        want = torch.topk(rows, min(5, n))
        assert torch.equal(vals, want.values) and torch.equal(idx, want.indices)


def test_sample_is_the_inverse_cdf_of_p():
    """sampling.sample cuts [0, 1) into pieces of length p (in token order) and returns the piece one uniform draw
    falls in: N evenly spaced draws land in each token's piece N·p times (±1), tokens of probability 0 never, also at
    u = 0 and where u · total rounds up to the total; weights that do not sum to 1 are normalised."""
    from mtplab.sampling import inverse_cdf, sample

    g = torch.Generator().manual_seed(3)
    for n, zeros in ((7, [0, 2, 6]), (49152, None)):
        w = torch.rand(n, generator=g) * 2  # sums to about n, not 1
        w[zeros if zeros else torch.rand(n, generator=g) < 0.8] = 0.0  # the leading and the trailing one among them
        if zeros is None:
            w[[0, -1]] = 0.0
        N = 20000
        counts = torch.bincount(torch.tensor([inverse_cdf(w, (j + 0.5) / N) for j in range(N)]), minlength=n)
        assert (counts - N * w / w.sum()).abs().max() <= 1.0
        assert counts[w == 0].sum() == 0
        nonzero = torch.nonzero(w).flatten()
        assert inverse_cdf(w, 0.0) == nonzero[0] and inverse_cdf(w, 1.0 - 1e-17) == nonzero[-1] == inverse_cdf(w, 1.0)
    tiny = torch.tensor([1.0, 1e-9])  # float64 sums: a token after 10⁹ times its mass keeps its piece of [0, 1)
    assert inverse_cdf(tiny, 1 - 0.5e-9) == 1 and inverse_cdf(tiny, 1 - 2e-9) == 0
    seen = {sample(w, torch.Generator().manual_seed(s)) for s in range(50)}
    assert seen <= set(nonzero.tolist()) and len(seen) > 40  # draws from the generator, inside the support
    assert sample(w, torch.Generator().manual_seed(7)) == sample(w, torch.Generator().manual_seed(7))
