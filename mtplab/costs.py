"""What speculation costs on the machine at hand, measured there: the verify curve v, a drafter's cost c and the
memory roofline of a decode step.

- ``v(γ)``: the time of one target pass over γ+1 tokens (a verify of γ drafted tokens) in units of a one-token
  step. Leviathan's formulas assume v = 1; on a CPU it grows with γ, by how much depends on the CPU and on the
  kernels mtplab chose for it (:mod:`mtplab.kernels`).
- ``c``: the time a drafter takes per drafted token, in the same unit (:func:`draft_cost_ratio`; measured for
  ``schedule="auto"`` in a short real decode by :func:`mtplab.decoder.draft_cost`).
- the roofline: a decode step reads every weight once, so it cannot beat ``parameter bytes / memory bandwidth``.

Everything is measured interleaved in one run, reported as ratios, and cached with the kernel measurements of this
machine (CPU model, torch version, threads), so the draft-length policy ``schedule="auto"`` and the views read the
same numbers every time.
"""
from __future__ import annotations

import statistics
import time

import torch

from . import kernels
from .theory import estimate_alpha
from .models import Target, kernel_pass

def pass_seconds(target: Target, refresh: bool = False, progress: bool = True, reps: int = 5) -> dict:
    """Seconds of a target pass over n = 1..16 tokens on this machine: ``{"plain": {n: s}}`` (F.linear) and, where
    the target has a kernel plan, ``"tuned"`` and (where it can take them) ``"fused"`` (the fused C layers):
    measured interleaved once, then cached; see :func:`mtplab.kernels.check_whole_passes`."""
    return kernels.check_whole_passes(target.model, kernel_pass(target.model), refresh=refresh, progress=progress,
                                      reps=reps)


def verify_curve(target: Target, refresh: bool = False, progress: bool = True) -> dict:
    """``{γ: v(γ)}`` for γ = 0..15: a pass over γ+1 tokens with the kernels mtplab uses for it, in units of a
    one-token step (measured once per machine, then cached)."""
    seconds = pass_seconds(target, refresh, progress)
    plan = kernels.plan_of(target.model)
    used = {n: seconds[plan.used(n)][n] if plan is not None and plan.used(n) in seconds else seconds["plain"][n]
            for n in seconds["plain"]}
    return as_verify_cost(used)


def as_verify_cost(seconds: dict) -> dict:
    """Pass seconds by token count -> v by γ (a pass over γ+1 tokens / a one-token pass), made non-decreasing in
    γ first (a longer pass never costs less; adjacent measurements that say otherwise are noise, pooled to their
    mean)."""
    ns = sorted(seconds)
    fit = _non_decreasing([seconds[n] for n in ns])
    return {n - 1: s / fit[0] for n, s in zip(ns, fit)}


def _non_decreasing(values: list) -> list:
    """The least-squares non-decreasing fit (pool adjacent violators)."""
    blocks = []  # [sum, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    return [s / c for s, c in blocks for _ in range(c)]


def step_seconds(plain_rounds) -> float:
    """Seconds of one plain decoding step: the mean round of a plain run (each emits one token; prefill excluded)."""
    return sum(r.seconds for r in plain_rounds) / len(plain_rounds) if plain_rounds else 0.0


def draft_cost_ratio(rounds, step: float) -> float:
    """c, the one place its formula is written: the drafter's seconds per drafted token / ``step``, the seconds of
    a one-token target step (0 when nothing was drafted)."""
    drafted = sum(r.num_drafted for r in rounds)
    return sum(r.draft_seconds for r in rounds) / drafted / step if drafted and step else 0.0


def draft_cost_from_rounds(rounds, verify_cost: dict) -> float:
    """c from a speculative run alone: the median over rounds that drafted of :func:`draft_cost_ratio` against that
    round's own one-token step time (its verify seconds / v of its pass size)."""
    ratios = [draft_cost_ratio([rnd], rnd.verify_seconds / verify_cost.get(rnd.verify_tokens - 1,
                                                                             verify_cost[max(verify_cost)]))
              for rnd in rounds if rnd.num_drafted and rnd.verify_seconds > 0]
    return statistics.median(ratios) if ratios else 0.0


def cost_model(spec, plain) -> dict:
    """What theory needs, measured in a speculative trace and its plain baseline: α (the i.i.d. estimate), c
    (against the plain run's step) and the verify cost v of each γ the run used (verify seconds / plain step)."""
    step = step_seconds(plain.rounds)
    by_k = {}
    for r in spec.rounds:
        by_k.setdefault(r.num_drafted, []).append(r.verify_seconds)
    return dict(
        alpha=estimate_alpha([(r.num_accepted, r.num_drafted) for r in spec.rounds if r.num_drafted]),
        c=draft_cost_ratio(spec.rounds, step),
        verify_cost={k: sum(v) / len(v) / step for k, v in sorted(by_k.items()) if k and step},
        plain_step_seconds=step,
    )


def memory_bandwidth(size_mb: int = 256, reps: int = 5) -> float:
    """Bytes per second this machine reads from memory with all threads (a sum over a buffer larger than caches
    usually are; cached)."""
    data = kernels.load_measurements()
    if "bandwidth" not in data:
        a = torch.ones(size_mb * 2**20 // 4)
        a.sum()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a.sum()
            times.append(time.perf_counter() - t0)
        data = kernels.load_measurements()
        data["bandwidth"] = a.numel() * 4 / statistics.median(times)
        kernels.save_measurements(data)
    return data["bandwidth"]


def roofline_seconds(target: Target) -> float:
    """The fastest a one-token step can be: every weight read once at the measured memory bandwidth."""
    return kernels.parameter_bytes(target.model) / memory_bandwidth()
