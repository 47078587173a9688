"""Few-token matrix products on the CPU — what makes a verify pass cheap.

Speculative decoding pays off because a target pass over k+1 tokens costs about as much as a pass over one: the
weights are read from memory once either way. On this kind of CPU (MKL through ``torch.nn.functional.linear``)
that is not what happens for small token counts: a pass over 2–5 tokens took 1.5–2× a one-token pass, because
the GEMM kernel chosen for a handful of rows re-reads the weights. Computing the same product as
``(W @ x.T).T`` — one pass over W per call, whatever the number of rows — brought a 5-token verify back to about
1.1× a one-token step (measured on the bundled SmolLM2-135M, 2 threads).

:func:`install` gives each ``nn.Linear`` of a model a forward that uses that product for CPU inputs of at most
``MAX_ROWS`` tokens *while mtplab decodes* (inside :func:`enabled`); everywhere else (prefill, training,
``model.generate`` called directly) the module runs transformers' usual ``F.linear``. The two agree to float
rounding (≈1e-5 on the logits). Set ``MTPLAB_FAST_LINEAR=0`` to turn it off.
"""
from __future__ import annotations

import contextvars
import os
import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F

MAX_ROWS = 16
_ACTIVE = contextvars.ContextVar("mtplab_fast_linear", default=False)


def _few_token_linear(self, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if _ACTIVE.get() and rows <= MAX_ROWS and x.device.type == "cpu" and x.dtype == self.weight.dtype:
        y = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).T).T.contiguous()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])
    return F.linear(x, self.weight, self.bias)


def install(model: torch.nn.Module) -> torch.nn.Module:
    """Give every plain ``nn.Linear`` of ``model`` the few-token CPU path (idempotent; no-op when disabled)."""
    if os.environ.get("MTPLAB_FAST_LINEAR", "1") == "0":
        return model
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = types.MethodType(_few_token_linear, module)
    return model


@contextmanager
def enabled():
    """Use the few-token path for installed modules within this block (this thread / context only)."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
