"""What speculation costs on the machine at hand, measured there: the verify curve v, a drafter's cost c and the
memory roofline of a decode step.

- ``v(γ)``: the time of one target pass over γ+1 tokens (a verify of γ drafted tokens) in units of a one-token
  step. Leviathan's formulas assume v = 1; on a CPU it grows with γ, by how much depends on the CPU and on the
  kernels mtplab chose for it (:mod:`mtplab.kernels`).
- ``c``: the time a drafter takes per drafted token, in the same unit, measured in a short real decode.
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
from .models import Target, kernel_pass

CALIBRATION_PROMPT = "Write a short story about a robot who learns to paint."


def pass_seconds(target: Target, refresh: bool = False, progress: bool = True, reps: int = 3) -> dict:
    """Seconds of a target pass over n = 1..16 tokens on this machine: ``{"plain": {n: s}}`` (F.linear) and, where
    the target has a kernel plan, ``"tuned"`` (measured interleaved once, then cached; see
    :func:`mtplab.kernels.check_whole_passes`)."""
    return kernels.check_whole_passes(target.model, kernel_pass(target.model), refresh=refresh, progress=progress,
                                      reps=reps)


def verify_curve(target: Target, refresh: bool = False, progress: bool = True) -> dict:
    """``{γ: v(γ)}`` for γ = 0..15: a pass over γ+1 tokens with the kernels mtplab uses for it, in units of a
    one-token step (measured once per machine, then cached)."""
    seconds = pass_seconds(target, refresh, progress)
    plan = kernels.plan_of(target.model)
    used = {n: seconds["tuned"][n] if plan is not None and "tuned" in seconds and plan.engaged(n) else seconds["plain"][n]
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


def draft_cost(drafter, target: Target, refresh: bool = False) -> float:
    """c: the drafter's seconds per drafted token / the seconds of a one-token target step, measured in a short real
    decode (γ = 4, greedy) and cached per drafter and target on this machine. Each round's step time comes from its
    own verify pass (verify seconds / v of its size), so a slow moment of the machine hits both sides alike. (A
    drafter with a cache of its own fills it when first asked to draft: that catch-up is part of its cost.)"""
    if drafter is None:
        return 0.0
    key = f"{kernels.model_key(target.model)}|{type(drafter).__name__}|{drafter.name}|{_fingerprint(drafter)}"
    data = kernels.load_measurements()
    cached = data.setdefault("drafters", {}).get(key)
    if cached is not None and not refresh:
        return cached["c"]
    from .decoder import SpeculativeDecoder

    v = verify_curve(target)
    dec = SpeculativeDecoder(target, drafter, num_draft_tokens=4, schedule="constant", record=False)
    prompt = CALIBRATION_PROMPT if target.tokenizer is not None else [(5 + 7 * i) % target.vocab_size for i in range(24)]
    dec.generate(prompt, max_new_tokens=16, seed=0)  # warm the drafter up (caches, lazy buffers)
    c = draft_cost_from_rounds(dec.generate(prompt, max_new_tokens=32, seed=0).rounds, v)
    data = kernels.load_measurements()
    data.setdefault("drafters", {})[key] = {"drafter": drafter.name, "target": target.name, "c": c}
    kernels.save_measurements(data)
    return c


def draft_cost_from_rounds(rounds, verify_cost: dict) -> float:
    """c from recorded rounds: the median over rounds that drafted of (draft seconds per drafted token) / (that
    round's own one-token step time, its verify seconds / v of its pass size)."""
    ratios = []
    for rnd in rounds:
        if rnd.num_drafted and rnd.verify_seconds > 0:
            step = rnd.verify_seconds / verify_cost.get(rnd.verify_tokens - 1, verify_cost[max(verify_cost)])
            ratios.append(rnd.draft_seconds / rnd.num_drafted / step)
    return statistics.median(ratios) if ratios else 0.0


def _fingerprint(drafter) -> str:
    """Parameter count of whatever network the drafter runs (two MTP heads under one name stay apart)."""
    total = 0
    for attr in ("head", "model", "assistant", "mtp"):
        net = getattr(drafter, attr, None)
        if isinstance(net, torch.nn.Module):
            total += sum(p.numel() for p in net.parameters())
    return str(total)


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


def report(target: Target, drafters=("mtp", "prompt-lookup"), layers: int | None = None, reps: int = 5) -> str:
    """``mtplab bench --costs``: this machine's cost curve as text (every number measured now, interleaved)."""
    from . import theory
    from .drafters import registry

    plan = kernels.plan_of(target.model)
    passes = pass_seconds(target, refresh=True, reps=reps)
    step = passes["plain"][1]
    lines = [f"machine: {kernels.cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
             f"target: {target.name}, {kernels.parameter_bytes(target.model) / 1e6:.0f} MB of weights",
             "kernel plan (rows: kernel):" if plan else f"kernel plan: none (MTPLAB_KERNELS={kernels.mode()}, or "
             "a model small enough to stay in the CPU cache)"]
    if plan:
        lines += ["  " + line for line in plan.describe().splitlines()]
    rows = list(passes["plain"])
    lines.append(f"target pass over n tokens, in one-token F.linear steps (median of {reps}, interleaved):")
    lines.append("  n          " + " ".join(f"{n:>5}" for n in rows))
    for name, label in (("plain", "F.linear"), ("tuned", "plan")):
        if name in passes:
            lines.append(f"  {label:<10} " + " ".join(f"{passes[name][n] / step:5.2f}" for n in rows))
    if plan:
        lines.append("  used       " + " ".join(f"{'plan' if plan.engaged(n) else 'F.lin':>5}" for n in rows))
    v = verify_curve(target)
    used_step = step * v[0] if not plan or not plan.engaged(1) else passes["tuned"][1]
    roof = roofline_seconds(target)
    lines.append(f"plain decoding: {1 / used_step:.1f} tokens/s ({1e3 * used_step:.1f} ms a step); fp32 memory "
                 f"roofline {1e3 * roof:.1f} ms ({kernels.parameter_bytes(target.model) / 1e6:.0f} MB at "
                 f"{memory_bandwidth() / 1e9:.1f} GB/s): a step takes {used_step / roof:.2f}x the roofline")
    lines.append("draft cost c (seconds per drafted token / one-token step) and the γ auto drafts at acceptance α:")
    for name in drafters:
        if name == "none" or name not in registry.names(target):
            continue
        c = draft_cost(registry.make(name, target, layers), target, refresh=True)
        picks = "  ".join(f"α={a}: γ={theory.best_draft_length([a] * 8, c, v)[0]}" for a in (0.3, 0.5, 0.7, 0.9))
        lines.append(f"  {name:<14} c = {c:.3f}   {picks}")
    return "\n".join(lines)
