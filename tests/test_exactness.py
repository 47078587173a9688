"""The exactness picture (mtplab.widgets.exactness): kept + resampled mass is p, and rounds through mtplab's own
verify emit tokens with the target's distribution, whatever the drafter proposes."""
import pytest
import torch
from scipy.stats import chisquare

from mtplab.widgets.exactness import exactness_figure, exactness_parts, simulate_first_tokens
from mtplab.widgets.style import named_traces

P = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.02, 0.0])
BAD_Q = torch.tensor([0.02, 0.03, 0.05, 0.10, 0.12, 0.30, 0.0, 0.38])  # p upside down, and mass where p has none


@pytest.mark.parametrize("q", [BAD_Q, P, torch.full((8,), 1 / 8), torch.softmax(torch.randn(8, generator=torch.Generator().manual_seed(1)), 0)])
def test_kept_and_resampled_mass_add_up_to_p(q):
    accepted, resampled = exactness_parts(P.double(), q.double())
    torch.testing.assert_close(accepted + resampled, P.double(), rtol=0, atol=1e-7)  # float32 inputs: sums are 1 to ~1e-8
    assert torch.equal(accepted, torch.minimum(P, q).double()) and (resampled >= 0).all()
    if torch.equal(q, P):
        assert resampled.abs().max() < 1e-7  # a perfect drafter is never rejected


def test_rounds_through_verify_follow_p_not_q():
    counts, rejected = simulate_first_tokens(P, BAD_Q, draws=4000, seed=0)
    keep = P > 0
    assert counts[~keep].sum() == 0  # never a token the target cannot emit, though the drafter proposes it most
    assert chisquare(counts[keep].numpy(), (P[keep] * 4000).numpy()).pvalue > 1e-3
    reject_rate = 1 - float(torch.minimum(P, BAD_Q).sum())  # 0.72 of the drafts are rejected
    assert abs(rejected / 4000 - reject_rate) < 0.03


def test_the_figure_shows_the_parts_and_the_draws():
    fig = exactness_figure(P, BAD_Q, lambda i: f"t{i}", draws=500, top=5)
    traces = named_traces(fig)
    kept, resampled = traces["kept draft: min(p, q)"], traces["resampled: rejected mass × residual"]
    assert list(kept.x) == ["'t0'", "'t7'", "'t5'", "'t1'", "'t2'"]  # the 5 tokens most likely under p or q
    stacked = [a + b for a, b in zip(kept.y, resampled.y)]
    assert stacked == pytest.approx([0.40, 0.0, 0.03, 0.25, 0.15]) and list(resampled.base) == list(kept.y)
    assert list(traces["p (target)"].y) == pytest.approx([0.40, 0.0, 0.03, 0.25, 0.15])
    assert sum(traces["emitted share"].y) <= 1 and traces["emitted share"].y[1] == 0
    assert "500 rounds through mtplab's verify" in fig.layout.annotations[1].text
