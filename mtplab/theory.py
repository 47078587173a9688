"""Leviathan et al. (2023), "Fast Inference from Transformers via Speculative Decoding", as formulas.

Symbols: α = probability that a drafted token is accepted (assumed i.i.d. per position), γ = draft length,
c = cost of one drafter step relative to one target step.

* expected tokens per round (mean acceptance length):  E(α, γ) = (1 − α^(γ+1)) / (1 − α)
* expected walltime improvement factor:                 E(α, γ) / (γ·c + v(γ))

Leviathan's model takes v(γ) = 1: verifying γ+1 tokens costs one target step. On a CPU it does not (here a
5-token verify costs about 1.5–2× a 1-token step), so every walltime function also takes a measured verify-cost
curve ``verify_cost`` (γ -> cost of one pass over γ+1 tokens, in target steps). :func:`assumption` names
which model a result used.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

VerifyCost = Callable[[int], float] | Mapping[int, float] | None


def _check(alpha: float, gamma: int | None = None, c: float | None = None) -> None:
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 0):
        raise ValueError(f"gamma must be an integer >= 0, got {gamma!r}")
    if c is not None and not c >= 0:
        raise ValueError(f"c (draft cost ratio) must be >= 0, got {c!r}")


def expected_tokens_per_round(alpha: float, gamma: int) -> float:
    """E = (1 − α^(γ+1)) / (1 − α): tokens one target pass yields, bonus/correction token included."""
    _check(alpha, gamma)
    if alpha == 1:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def verify_cost_of(verify_cost: VerifyCost, gamma: int) -> float:
    """Cost of verifying γ drafted tokens (a pass over γ+1 tokens) in units of one 1-token target step."""
    if verify_cost is None:
        return 1.0
    if callable(verify_cost):
        return float(verify_cost(gamma))
    if gamma in verify_cost:
        return float(verify_cost[gamma])
    # piecewise-linear interpolation / flat extrapolation over a measured table
    xs = sorted(verify_cost)
    if gamma <= xs[0]:
        return float(verify_cost[xs[0]])
    if gamma >= xs[-1]:
        return float(verify_cost[xs[-1]])
    lo = max(x for x in xs if x < gamma)
    hi = min(x for x in xs if x > gamma)
    w = (gamma - lo) / (hi - lo)
    return float(verify_cost[lo] * (1 - w) + verify_cost[hi] * w)


def assumption(verify_cost: VerifyCost) -> str:
    return "Leviathan: verify costs one target step" if verify_cost is None else "measured verify-cost curve v(γ)"


def walltime_factor(alpha: float, gamma: int, c: float, verify_cost: VerifyCost = None) -> float:
    """Expected speedup over plain decoding: E(α, γ) / (γ·c + v(γ)); with v = 1 this is Leviathan's formula."""
    _check(alpha, gamma, c)
    return expected_tokens_per_round(alpha, gamma) / (gamma * c + verify_cost_of(verify_cost, gamma))


def best_gamma(alpha: float, c: float, verify_cost: VerifyCost = None, max_gamma: int = 16) -> int:
    """The draft length in 1..max_gamma with the highest expected walltime factor."""
    return max(range(1, max_gamma + 1), key=lambda g: walltime_factor(alpha, g, c, verify_cost))


def expected_tokens_per_round_by_position(rates: Sequence[float]) -> float:
    """Tokens one round yields when drafted position i is accepted with conditional probability ``rates[i]`` (given
    that every earlier position was): 1 + a₁ + a₁a₂ + … (with every aᵢ = α this is E(α, γ))."""
    total, reach = 1.0, 1.0
    for a in rates:
        if not 0 <= a <= 1:
            raise ValueError(f"acceptance rates must be in [0, 1], got {a!r}")
        reach *= a
        total += reach
    return total


def best_draft_length(rates: Sequence[float], c: float, verify_cost: VerifyCost = None, extra_nodes: float = 0.0,
                      allow_plain: bool = True) -> tuple:
    """``(γ, expected walltime factor)`` for the γ in 0..len(rates) that maximises tokens per unit time,
    E(rates[:γ]) / (γ·c + v(γ + extra_nodes)): γ = 0 is a plain step (factor 1), chosen when no draft pays
    (``allow_plain=False``: the best γ ≥ 1). ``extra_nodes``: tree nodes a verify pass reads beyond the γ of the
    main draft."""
    _check(0.0, None, c)
    best = (0, 1.0) if allow_plain or not rates else (0, float("-inf"))
    for g in range(1, len(rates) + 1):
        width = g + extra_nodes
        lo = int(width)
        cost = verify_cost_of(verify_cost, lo) if width == lo else (
            verify_cost_of(verify_cost, lo) * (lo + 1 - width) + verify_cost_of(verify_cost, lo + 1) * (width - lo))
        factor = expected_tokens_per_round_by_position(rates[:g]) / (g * c + cost)
        if factor > best[1]:
            best = (g, factor)
    return best


def alpha_from_acceptance_length(mean_length: float, gamma: int) -> float:
    """Invert E(α, γ) for α by bisection (E is increasing in α)."""
    if not 1 <= mean_length <= gamma + 1:
        raise ValueError(f"mean acceptance length must be in [1, {gamma + 1}] for gamma={gamma}, got {mean_length!r}")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens_per_round(mid, gamma) < mean_length else (lo, mid)
    return (lo + hi) / 2


def estimate_alpha(rounds: Sequence[tuple]) -> float:
    """Maximum-likelihood α from observed ``(accepted, drafted)`` pairs under the i.i.d. model: every accepted
    token is a success, every round that stopped at a rejection is one failure."""
    successes = sum(a for a, d in rounds)
    failures = sum(1 for a, d in rounds if a < d)
    return successes / (successes + failures) if successes + failures else 0.0


@dataclass
class SimulatedRound:
    accepted: int  # drafted tokens accepted (0..γ)
    gamma: int

    @property
    def tokens(self) -> int:  # accepted + the target's own token (correction or bonus)
        return self.accepted + 1

    @property
    def outcomes(self) -> list:
        """Per drafted position: "accepted", "rejected" or "skipped" (after the first rejection)."""
        return (["accepted"] * self.accepted + (["rejected"] if self.accepted < self.gamma else [])
                + ["skipped"] * max(0, self.gamma - self.accepted - 1))


@dataclass
class Simulation:
    alpha: float
    gamma: int
    c: float
    rounds: list
    verify_cost: float = 1.0

    @property
    def tokens_per_round(self) -> float:
        return sum(r.tokens for r in self.rounds) / len(self.rounds)

    @property
    def walltime_factor(self) -> float:
        """Simulated tokens per unit time (target steps) relative to plain decoding's 1 token per step."""
        return self.tokens_per_round / (self.gamma * self.c + self.verify_cost)


def simulate(alpha: float, gamma: int, c: float, num_rounds: int = 100, seed: int = 0,
             verify_cost: VerifyCost = None) -> Simulation:
    """Draw rounds where each drafted token is accepted independently with probability α."""
    _check(alpha, gamma, c)
    if num_rounds < 1:
        raise ValueError(f"num_rounds must be >= 1, got {num_rounds!r}")
    rng = random.Random(seed)
    rounds = []
    for _ in range(num_rounds):
        n = 0
        while n < gamma and rng.random() < alpha:
            n += 1
        rounds.append(SimulatedRound(n, gamma))
    return Simulation(alpha, gamma, c, rounds, verify_cost_of(verify_cost, gamma))
