"""A lean forward pass for Llama-architecture targets: transformers' own modules, in transformers' order, without
its per-call machinery.

A one-token step of a small model on a CPU reads every weight once; the matrix products doing that run close to the
memory roofline. The rest of a step is Python and small ops: transformers' forward adds keyword plumbing,
decorators, the attention-interface lookup, mask building and output records in every layer. On the bundled 135M
target (Intel Xeon, 2 cores) about a quarter of a step was outside the products; this path saved 3-9 ms of a
38-50 ms step (README, "Speed on the machine at hand"). :func:`forward` walks the same modules with the same formulas
(each projection, activation and the rotary embedding is the model's own module; a float32 RMSNorm is torch's fused
``rms_norm``, the same arithmetic in one op instead of six; the rotation is applied to queries and keys together;
the attention is the SDPA call transformers makes; keys and values go into the same cache through ``cache.update``),
so caches, rollback, drafters and hidden-state reads work unchanged, and the logits equal transformers' bit for bit
(tests/test_fastpath.py). Hooks on the linear layers run; hooks on norms, whole layers and attention modules do not.

:func:`unsupported` says why a model does not take this path (then :func:`mtplab.models.forward` calls the model as
transformers ships it): another architecture, a rotary embedding that changes with the input length, an attention
implementation other than SDPA/eager, training mode, ``MTPLAB_KERNELS=off`` (transformers exactly as it ships) or a
:func:`transformers_forward` block.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from . import kernels

ROPE_TYPES = ("default", "llama3", "linear")  # inv_freq fixed at load time: the rotary module's forward is all of it


_OFF: "weakref.WeakSet" = weakref.WeakSet()  # models inside a transformers_forward() block


@contextmanager
def transformers_forward(model):
    """Inside this block mtplab calls ``model`` as transformers ships it (``mtplab bench --costs`` times both)."""
    fresh = model not in _OFF
    _OFF.add(model)
    try:
        yield
    finally:
        if fresh:
            _OFF.discard(model)


def unsupported(model) -> str | None:
    """Why ``model`` cannot take the lean path (None: it can)."""
    from transformers.models.llama.modeling_llama import (LlamaDecoderLayer, LlamaForCausalLM, LlamaModel,
                                                            LlamaRMSNorm)

    if kernels.mode() == "off":
        return "MTPLAB_KERNELS=off: transformers' forward as it ships"
    if model in _OFF:
        return "inside transformers_forward()"
    if type(model) is not LlamaForCausalLM or type(model.model) is not LlamaModel:
        return f"{type(model).__name__} is not transformers' LlamaForCausalLM"
    if any(type(layer) is not LlamaDecoderLayer or type(layer.input_layernorm) is not LlamaRMSNorm
           or type(layer.post_attention_layernorm) is not LlamaRMSNorm for layer in model.model.layers):
        return "a decoder layer other than transformers' LlamaDecoderLayer with LlamaRMSNorm"
    rope = (getattr(model.config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in ROPE_TYPES:
        return f"rope_type {rope!r} (the lean path takes {ROPE_TYPES})"
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        return f"{impl!r} attention"
    if model.training:
        return "the model is in training mode"
    return None


def _norm(norm, x):
    """``norm(x)`` for a ``LlamaRMSNorm``: one fused op where that is the same arithmetic (float32; equal bit for
    bit, tests/test_fastpath.py), else the module's own six."""
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm(x)


def forward(model, ids: list, cache, hidden=False, logits: bool = True, positions=None, sees=None):
    """``model(input_ids=[ids], cache=cache, use_cache=True)`` for a Llama model, the lean way; returns
    ``(logits [n, V] (the last row only when ``logits`` is False), hidden states or None)`` as
    :func:`mtplab.models.forward` does. ``positions`` ``[1, n]`` and ``sees`` (boolean ``[1, 1, n, past + n]``: True
    where a row may attend) replace the chain's positions and causal mask (token trees)."""
    from transformers.models.llama.modeling_llama import rotate_half

    decoder = model.model
    n, past = len(ids), cache.get_seq_length()
    x = decoder.embed_tokens(torch.tensor(ids, dtype=torch.long, device=model.device))  # [n, hidden]: no batch axis
    if positions is None:
        positions = torch.arange(past, past + n, device=x.device)[None]
        if n > 1:  # row i sees the context and the chain up to itself
            sees = torch.ones(n, past + n, dtype=torch.bool, device=x.device).tril(past)[None, None]
    cos, sin = decoder.rotary_emb(x, positions)
    cos, sin = cos[0], sin[0]  # [n, head_dim], broadcast over heads
    wanted = list(hidden) if isinstance(hidden, (list, tuple)) else []
    grabbed = {}
    for i, layer in enumerate(decoder.layers):
        if i in wanted:
            grabbed[i] = x
        attn, mlp = layer.self_attn, layer.mlp
        h = _norm(layer.input_layernorm, x)
        q = attn.q_proj(h).view(n, -1, attn.head_dim)
        k = attn.k_proj(h).view(n, -1, attn.head_dim)
        v = attn.v_proj(h).view(n, -1, attn.head_dim).transpose(0, 1)
        qk = torch.cat((q, k), dim=1).transpose(0, 1)  # apply_rotary_pos_emb's formula, on queries and keys at once
        qk = qk * cos + rotate_half(qk) * sin
        q, k = qk.split((q.shape[1], k.shape[1]), dim=0)
        k, v = cache.update(k[None], v[None], i)
        o = F.scaled_dot_product_attention(q[None], k, v, attn_mask=sees, scale=attn.scaling,
                                           enable_gqa=attn.num_key_value_groups > 1)
        x = x + attn.o_proj(o[0].transpose(0, 1).reshape(n, -1))
        h = _norm(layer.post_attention_layernorm, x)
        x = x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
    if len(decoder.layers) in wanted:  # the last layer's output, before the final norm
        grabbed[len(decoder.layers)] = x
    normed = decoder.norm(x)
    out = model.lm_head(normed if logits else normed[-1:])
    if wanted:
        return out, torch.cat([grabbed[i] for i in wanted], dim=-1)
    return out, (normed if hidden else None)
