"""Why speculative sampling is exact, as a picture: for one position's target distribution p and draft distribution q,

* **the sum** — a token x is emitted either because the drafter proposed it and it was kept (probability
  min(p(x), q(x))), or because some draft was rejected (total mass 1 − Σ min(p, q)) and x was resampled from the
  residual norm(max(0, p − q)). The two parts add up to p(x) for every x (:func:`exactness_parts`);
* **the draws** — many one-token rounds run through mtplab's own verification (:func:`mtplab.sampling.verify`), with
  the share of each emitted token next to p (:func:`simulate_first_tokens`). However bad the drafter, the histogram
  follows p; only the number of rejections changes.
"""
from __future__ import annotations

import torch

from ..palette import COLORS
from ..sampling import SamplingConfig, residual, sample, verify


def exactness_parts(p: torch.Tensor, q: torch.Tensor) -> tuple:
    """``(accepted, resampled)``: per token, the probability that it is emitted as a kept draft, ``min(p, q)``, and
    as a resampled token after a rejection, ``(1 − Σ min(p, q)) · residual``. ``accepted + resampled == p``."""
    accepted = torch.minimum(p, q)
    return accepted, (1 - accepted.sum()).clamp_min(0) * residual(p, q)  # rejected mass: never below 0 in float


def simulate_first_tokens(p: torch.Tensor, q: torch.Tensor, draws: int = 5000, seed: int = 0) -> tuple:
    """Run ``draws`` one-token rounds through :func:`mtplab.sampling.verify`: draft x ~ q, keep it or resample.
    Returns ``(counts [V], rejections)``: how often each token was the round's first emitted token."""
    gen = torch.Generator().manual_seed(seed)
    rows, counts, rejected = torch.stack([p, p]), torch.zeros(p.shape[-1]), 0
    for _ in range(draws):
        x = sample(q, gen)
        v = verify([x], rows, q[None], rows, SamplingConfig(1.0), gen)  # the decoder's own accept / resample step
        counts[x if v.num_accepted else v.token] += 1
        rejected += v.num_accepted == 0
    return counts, rejected


def exactness_figure(p: torch.Tensor, q: torch.Tensor, token_text, draws: int = 5000, top: int = 8, seed: int = 0,
                     title: str = ""):
    """Two panels for the ``top`` tokens most likely under p or q: the accepted and resampled parts stacked up to
    p (q drawn beside them), and the share of ``draws`` simulated rounds that emitted each token, against p."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    p, q = p.double(), q.double()
    accepted, resampled = exactness_parts(p, q)
    counts, rejected = simulate_first_tokens(p.float(), q.float(), draws, seed)
    ids = torch.topk(torch.maximum(p, q), top).indices.tolist()
    labels = [repr(token_text(i)) for i in ids]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(
        "p = kept drafts + resampled after a rejection", f"{draws} rounds through mtplab's verify ({rejected} rejected)"))
    bar = lambda name, y, color, **kw: go.Bar(name=name, x=labels, y=[float(y[i]) for i in ids], marker_color=color, **kw)
    fig.add_trace(bar("kept draft: min(p, q)", accepted, COLORS["accepted"], offsetgroup="p"), 1, 1)
    fig.add_trace(bar("resampled: rejected mass × residual", resampled, COLORS["correction"], offsetgroup="p",
                      base=[float(accepted[i]) for i in ids]), 1, 1)
    fig.add_trace(bar("q (drafter)", q, COLORS["drafter"], offsetgroup="q", opacity=0.35), 1, 1)
    fig.add_trace(bar("emitted share", counts / draws, COLORS["measured"], opacity=0.6), 1, 2)
    fig.add_trace(go.Scatter(name="p (target)", x=labels, y=[float(p[i]) for i in ids], mode="markers",
                             marker=dict(color=COLORS["target"], symbol="line-ew-open", size=26, line=dict(width=3))), 1, 2)
    fig.update_layout(title=title or None, height=360, margin=dict(t=60, b=40, l=40, r=10), barmode="group",
                      legend=dict(orientation="h", y=-0.25), template="plotly_white")
    fig.update_yaxes(title_text="probability", row=1, col=1)
    return fig
