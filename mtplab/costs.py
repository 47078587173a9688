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

import hashlib
import statistics
import time
from contextlib import contextmanager

import torch

from . import kernels
from .models import Target, kernel_pass

ROWS = range(1, kernels.MAX_ROWS + 1)  # pass sizes measured: 1..16 tokens, i.e. γ = 0..15
CALIBRATION_PROMPT = "Write a short story about a robot who learns to paint."


def model_key(target: Target) -> str:
    """One key per target architecture, weights' size and kernel mode (the plan changes the curve)."""
    model = target.model
    shapes = sorted({kernels.shape_key(m) for m in kernels.tunable(model)})
    raw = f"{target.name}|{kernels.parameter_bytes(model)}|{shapes}|{kernels.mode()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@contextmanager
def _plain(model):
    """Run ``model`` without its kernel plan inside this block (F.linear everywhere): the 'before tuning' curve."""
    plan = kernels._PLANS.pop(model, None)
    try:
        yield
    finally:
        if plan is not None:
            kernels._PLANS[model] = plan


def measure_passes(target: Target, rows=ROWS, reps: int = 3, compare: bool = False, progress: bool = True) -> dict:
    """Median seconds of a target pass over n tokens (after a 64-token context), for each n in ``rows``:
    ``{"tuned": {n: s}}``, plus ``"plain"`` (no kernel plan) with ``compare=True``. Interleaved: every repetition
    runs every size and variant once, so slow moments of the machine hit them all alike."""
    from tqdm.auto import tqdm

    variants = ["tuned", "plain"] if compare else ["tuned"]
    run = kernel_pass(target.model)
    run(1)  # warm up (builds the context)
    times = {(v, n): [] for v in variants for n in rows}
    bar = tqdm(total=reps * len(rows) * len(variants), desc="Measuring target passes", unit="pass",
               disable=not progress)
    with torch.inference_mode():
        for _ in range(reps):
            for n in rows:
                for v in variants:
                    with _plain(target.model) if v == "plain" else _nothing():
                        t0 = time.perf_counter()
                        run(n)
                        times[v, n].append(time.perf_counter() - t0)
                    bar.update()
    bar.close()
    return {v: {n: statistics.median(times[v, n]) for n in rows} for v in variants}


@contextmanager
def _nothing():
    yield


def as_verify_cost(seconds: dict) -> dict:
    """Pass seconds by token count -> v by γ (a pass over γ+1 tokens / a one-token pass)."""
    return {n - 1: s / seconds[1] for n, s in sorted(seconds.items())}


def verify_curve(target: Target, refresh: bool = False, progress: bool = True) -> dict:
    """``{γ: v(γ)}`` for γ = 0..15 on this machine with the kernels in use (measured once, then cached)."""
    key = model_key(target)
    data = kernels.load_measurements()
    if refresh or key not in data["passes"]:
        seconds = measure_passes(target, progress=progress)["tuned"]
        data = kernels.load_measurements()
        data["passes"][key] = {"name": target.name, "seconds": {str(n): s for n, s in seconds.items()}}
        kernels.save_measurements(data)
    seconds = {int(n): s for n, s in data["passes"][key]["seconds"].items()}
    return as_verify_cost(seconds)


def draft_cost(drafter, target: Target, refresh: bool = False) -> float:
    """c: the drafter's seconds per drafted token / the seconds of a one-token target step, measured in a short real
    decode (γ = 4, greedy) and cached per drafter and target on this machine. Each round's step time comes from its
    own verify pass (verify seconds / v of its size), so a slow moment of the machine hits both sides alike."""
    if drafter is None:
        return 0.0
    key = f"{model_key(target)}|{type(drafter).__name__}|{drafter.name}|{_fingerprint(drafter)}"
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
