"""Before a workshop session: what this machine has, and whether other notebook kernels hold memory and CPU.

Each notebook loads the float32 target into its own kernel (about 1 GB at its peak). Binder gives a session 2 GB and
most workshop machines 2 CPU cores: two open kernels can run out of memory, and two busy ones slow each other far
more than twice, which makes every speed figure meaningless. :func:`preflight` says so when it sees them.
"""
from __future__ import annotations

import os

from .kernels import cpu_model


def other_kernels() -> list:
    """Jupyter kernels running besides this process: ``[{"pid", "rss_mb"}]`` (psutil, which ipykernel requires)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.info["pid"] != os.getpid() and "ipykernel_launcher" in cmd:
                found.append(dict(pid=proc.info["pid"], rss_mb=proc.info["memory_info"].rss / 2**20))
        except (psutil.Error, TypeError, AttributeError):
            continue
    return found


def preflight(kernel_mb: float = 1100) -> str:
    """A few lines for the start of a session: CPU, cores, free memory, other kernels, and what to do about them.
    ``kernel_mb``: what one notebook's kernel needs at its peak (the measured peaks are in notebook 00)."""
    import psutil

    free_mb = psutil.virtual_memory().available / 2**20
    others = other_kernels()
    lines = [f"CPU: {cpu_model()}, {os.cpu_count()} cores; memory available: {free_mb:,.0f} MB"]
    if others:
        held = sum(k["rss_mb"] for k in others)
        lines.append(f"{len(others)} other notebook kernel(s) running, holding {held:,.0f} MB "
                     f"(pids {', '.join(str(k['pid']) for k in others)}): shut them down (Kernel → Shut Down Kernel, "
                     "or the Running panel) before the next notebook — they take memory, and on a few cores a busy "
                     "one slows this one down and spoils its timings.")
    else:
        lines.append("no other notebook kernel is running: good, timings here are this kernel's alone.")
    if free_mb < kernel_mb:
        lines.append(f"Only {free_mb:,.0f} MB free, and a notebook's kernel needs about {kernel_mb:,.0f} MB at its "
                     "peak: close other kernels or programs first.")
    return "\n".join(lines)
