"""Pure tensor math of speculative decoding — no models in here.

Every formula lives here exactly once:

* ``probs(logits, cfg)``: logits -> probabilities, with temperature, top-k and top-p applied
  identically to the target (p) and the drafter (q);
* ``choose(probs_or_logits, cfg, generator)``: pick the next token (argmax when greedy);
* ``accept_prob(p, q)``: the speculative accept test ``min(1, p/q)``;
* ``residual(p, q)``: the distribution a rejected position is resampled from, ``norm(max(0, p - q))``;
* ``verify(...)``: Leviathan et al. (2023) Algorithm 1 over a whole drafted block, including the bonus token.

Greedy decoding (``temperature == 0``) replaces the probabilistic test by an exact-match test against the
target's argmax. The probabilities that are still reported in greedy mode are the untempered softmax
(temperature 1), so that views can show how confident each model was.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch



@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen. ``temperature == 0`` means greedy; ``top_k == 0`` and ``top_p == 1`` disable them."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_sampling(temperature, top_k, top_p) -> None:
    """Raise a ``ValueError``/``TypeError`` naming the bad argument, its value and the allowed range."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise TypeError(f"top_p must be a number in (0, 1] (1 disables it), got {top_p!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p!r}")


def probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Turn logits ``[..., V]`` into probabilities, applying temperature, top-k and top-p (float32)."""
    logits = logits.float()
    if cfg.greedy:
        return torch.softmax(logits, dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        # As transformers' TopPLogitsWarper: drop the low tail whose total mass is <= 1 - top_p,
        # always keeping the most likely token.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        tail = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1) <= (1 - cfg.top_p)
        tail[..., -1] = False
        logits = logits.masked_fill(tail.scatter(-1, order, tail), float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(p: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from a probability vector ``[V]`` (weights: need not sum to 1): one uniform draw u, then
    :func:`inverse_cdf`. ``torch.multinomial`` draws one exponential per entry instead (the Gumbel trick): 1.42 ms
    on a 49,152-token row against 0.10 ms this way (AMD EPYC family 25 model 1, torch 2.13, one run); a sampled
    round draws once per drafted token: it was a quarter of EAGLE-3's drafting time at T = 0.7 (same CPU)."""
    return inverse_cdf(p, float(torch.rand((), generator=generator, dtype=torch.float64)))


def inverse_cdf(p: torch.Tensor, u: float) -> int:
    """The token whose interval of [0, 1) holds ``u`` when the interval is cut in order into pieces of length
    ``p / p.sum()`` (float64): the first index whose cumulative sum exceeds ``u · total``. A token of probability
    0 owns an empty piece, so it is never chosen, also at u = 0 and where ``u · total`` rounds up to the total."""
    cdf = p.detach().double().cumsum(-1)
    i = int(torch.searchsorted(cdf, u * float(cdf[-1]), right=True))
    return i if i < len(cdf) else int(torch.nonzero(p)[-1])


def argmax(row: torch.Tensor) -> int:
    """``int(torch.argmax(row))`` for one row (the first index of the largest value, as torch documents): on a CPU
    float32 row through NumPy, whose vectorised argmax took 5 µs on a 49,152-token row where torch's took 100 µs
    (Intel Xeon, torch 2.13), and a greedy round takes several."""
    if row.device.type == "cpu" and row.dtype == torch.float32 and row.dim() == 1 and not row.requires_grad:
        return int(row.contiguous().numpy().argmax())
    return int(torch.argmax(row))


def top(rows: torch.Tensor, k: int) -> tuple:
    """``torch.topk(rows, k)`` along the last axis of one long row or a few, exact: the k largest values of a row lie
    in the k blocks (of 128) with the largest maxima, so only those are sorted (40 µs instead of 165 µs on a
    49,152-token row; all the rows of a round in one call)."""
    block = 128
    n = rows.shape[-1]
    if rows.dim() not in (1, 2) or n % block or n < 8 * block * k:
        return torch.topk(rows, min(k, n))
    blocks = rows.reshape(-1, n // block, block)  # [R, blocks, block]
    chosen = blocks.amax(-1).topk(k).indices  # [R, k]
    vals, idx = blocks.gather(1, chosen[..., None].expand(-1, -1, block)).reshape(len(blocks), -1).topk(k)
    ids = chosen.gather(1, idx // block) * block + idx % block
    return (vals[0], ids[0]) if rows.dim() == 1 else (vals, ids)


def choose(logits: torch.Tensor, p: torch.Tensor, cfg: SamplingConfig, generator) -> int:
    """Next token from one position: argmax of the logits when greedy, else a draw from ``p``."""
    return argmax(logits) if cfg.greedy else sample(p, generator)


def accept_prob(p_x: float, q_x: float) -> float:
    """Probability of keeping a drafted token x: ``min(1, p(x) / q(x))``."""
    return 1.0 if q_x <= 0 else min(1.0, p_x / q_x)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The resampling distribution after a rejection: ``norm(max(0, p - q))``."""
    r = torch.clamp(p - q, min=0)
    total = r.sum()
    # Only possible when p == q, and then a rejection has probability 0; fall back to p.
    return p if total <= 0 else r / total


def one_hot(token: int, like: torch.Tensor) -> torch.Tensor:
    q = torch.zeros_like(like)
    q[token] = 1.0
    return q


@dataclass
class Verdict:
    """Outcome of verifying one drafted block."""

    num_accepted: int
    token: int  # the token the target emits after the accepted prefix
    kind: str  # "bonus" (all drafts accepted), "correction" (after a rejection) or "plain" (nothing drafted)
    accept_probs: list  # per drafted position: min(1, p/q), or 1/0 for greedy exact match
    draws: list  # per examined position: the uniform draw u (None when greedy)
    residual: torch.Tensor | None = None  # norm(max(0, p-q)) at the rejected position, if any


def verify(
    draft: list[int],
    p: torch.Tensor,
    q: torch.Tensor | None,
    target_logits: torch.Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | None,
) -> Verdict:
    """Accept or reject a drafted block with one pass worth of target probabilities.

    ``draft``: the k drafted token ids; ``p``: target probabilities ``[k+1, V]`` (position i scores the token
    after the i-th input of the verify pass, so ``p[k]`` gives the bonus token); ``q``: drafter probabilities
    ``[k, V]``, or ``None`` for a deterministic drafter (one-hot q); ``target_logits`` ``[k+1, V]`` for the
    greedy argmax.
    """
    k = len(draft)
    accept_probs, draws = [], []
    for i, x in enumerate(draft):
        if cfg.greedy:
            best = argmax(target_logits[i])
            ok = x == best
            accept_probs.append(1.0 if ok else 0.0)
            draws.append(None)
            if not ok:
                return Verdict(i, best, "correction", accept_probs, draws)
            continue
        q_i = one_hot(x, p[i]) if q is None else q[i]
        a = accept_prob(float(p[i, x]), float(q_i[x]))
        u = float(torch.rand((), generator=generator))
        accept_probs.append(a)
        draws.append(u)
        if u >= a:  # reject: resample from the residual
            r = residual(p[i], q_i)
            return Verdict(i, sample(r, generator), "correction", accept_probs, draws, r)
    token = choose(target_logits[k], p[k], cfg, generator)
    return Verdict(k, token, "bonus" if k else "plain", accept_probs, draws)
