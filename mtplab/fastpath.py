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

**Fused layers.** Even lean, a layer is ~25 small PyTorch ops; on the bundled target their dispatch cost 8-10 ms
of a step whose products take ~23 ms. :func:`_fused_layers` computes the same layer in two C calls
(``mtplab/csrc/few_rows.c``, compiled once per machine): norm, q/k/v products and rotary, writing the new keys and
values into mtplab's KV cache buffers; then attention over the cache, output product, norm and MLP. Every product
is mtplab's few-row kernel, which reads each weight once for all rows and sums every output in the same order
however many rows a pass has: a row of a verify pass gets exactly what a one-token step gets. Same formulas,
different float rounding (logits within 1e-4 of transformers'). Used for passes of 1..16 tokens where
:mod:`mtplab.kernels` measured it faster on this machine (or inside :func:`fused_forward`), and only when a pass
can: no autograd, mtplab's own KV cache, no hooks on the linears, bias-free float32 weights, SiLU.

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
from torch import nn

from . import kernels

ROPE_TYPES = ("default", "llama3", "linear")  # inv_freq fixed at load time: the rotary module's forward is all of it


_OFF: "weakref.WeakSet" = weakref.WeakSet()  # models inside a transformers_forward() block
_FUSED: "weakref.WeakSet" = weakref.WeakSet()  # models inside a fused_forward() block


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


@contextmanager
def fused_forward(model):
    """Inside this block every pass of ``model`` over 1..16 tokens takes the fused C layers (where a pass can:
    no autograd, mtplab's KV cache, no hooks), whatever the measurements chose; a model that can never take them
    is refused with the reason. ``mtplab bench --costs`` and the tests time and check them this way."""
    why = fused_unsupported(model)
    if why is not None:
        raise ValueError(f"{type(model).__name__} cannot take the fused C layers: {why}")
    fresh = model not in _FUSED
    _FUSED.add(model)
    try:
        yield
    finally:
        if fresh:
            _FUSED.discard(model)


def fused_unsupported(model) -> str | None:
    """Why ``model`` can never take the fused C layers (None: it can, pass by pass; see :func:`_fused_args`)."""
    why = unsupported(model) or kernels.unavailable("stream")
    if why is None:
        with torch.no_grad():
            args = _fused_args(model)
        why = args if isinstance(args, str) else None
    return why


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
    decoder = model.model
    n, past = len(ids), cache.get_seq_length()
    x = decoder.embed_tokens(torch.tensor(ids, dtype=torch.long, device=model.device))  # [n, hidden]: no batch axis
    args = None
    if n <= kernels.MAX_ROWS and (model in _FUSED or kernels.fuses(model, n)):
        args = _fused_args(model, cache)  # (or why this pass cannot take the fused layers: then it takes _layers)
    fused = isinstance(args, list)
    if positions is None:
        positions = torch.arange(past, past + n, device=x.device)[None]
        if n > 1 and not fused:  # row i sees the context and the chain up to itself (the C layers know that)
            sees = torch.ones(n, past + n, dtype=torch.bool, device=x.device).tril(past)[None, None]
    cos, sin = decoder.rotary_emb(x, positions)
    cos, sin = cos[0], sin[0]  # [n, head_dim], broadcast over heads
    wanted = list(hidden) if isinstance(hidden, (list, tuple)) else []
    grabbed = {}
    if fused:
        x = _fused_layers(decoder, x, cache, cos, sin, sees, wanted, grabbed, args)
    else:
        x = _layers(decoder, x, cache, cos, sin, sees, wanted, grabbed)
    if len(decoder.layers) in wanted:  # the last layer's output, before the final norm
        grabbed[len(decoder.layers)] = x
    normed = _norm(decoder.norm, x)
    if fused:  # the LM head by the same C kernel: every row of the pass as a one-token step has it
        out = kernels.KERNELS["stream"].run((normed if logits else normed[-1:]).contiguous(), model.lm_head.weight,
                                            None, None)
    else:
        out = model.lm_head(normed if logits else normed[-1:])
    if wanted:
        return out, torch.cat([grabbed[i] for i in wanted], dim=-1)
    return out, (normed if hidden else None)


def _layers(decoder, x, cache, cos, sin, sees, wanted, grabbed):
    """The decoder layers in PyTorch ops, as transformers' LlamaDecoderLayer computes them."""
    from transformers.models.llama.modeling_llama import rotate_half

    n = x.shape[0]
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
    return x


_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _plain_linear(m) -> bool:
    w = m._parameters["weight"]
    return (type(m) in (nn.Linear, kernels.TunedLinear) and m._parameters["bias"] is None and not m._forward_hooks
            and not m._forward_pre_hooks and w.dtype == torch.float32 and w.device.type == "cpu"
            and w.is_contiguous())


def _fused_args(model, cache=None) -> list | str:
    """Per layer, the weights the two C calls read (their addresses); or why this pass cannot take them (checked
    at every pass, a dictionary walk: hooks, a module swapped by the user or autograd send it to :func:`_layers`)."""
    from torch.nn.modules import module as torch_module

    from .models import GrowingLayer

    decoder = model.model
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return "global forward hooks are registered"
    if torch.is_grad_enabled():
        return "autograd is on (the C layers have no backward)"
    if decoder.config.hidden_act not in ("silu", "swish"):
        return f"hidden_act {decoder.config.hidden_act!r} (the C layers compute SiLU)"
    if cache is not None and (getattr(cache, "offloading", False) or len(cache.layers) != len(decoder.layers)
                              or any(type(c) is not GrowingLayer for c in cache.layers)):
        return "a KV cache other than mtplab.models.new_cache's"
    if not _plain_linear(model.lm_head):
        return "lm_head is not a bias-free float32 CPU nn.Linear without hooks"
    out = []
    for layer in decoder.layers:
        attn, mlp = layer._modules["self_attn"]._modules, layer._modules["mlp"]._modules
        ptrs = []
        for name in _LINEARS:
            m = (attn if name in attn else mlp)[name]
            if not _plain_linear(m):
                return f"{name} is not a bias-free float32 CPU nn.Linear without hooks"
            ptrs.append(m._parameters["weight"].data_ptr())
        norms = [layer._modules[k] for k in ("input_layernorm", "post_attention_layernorm")]
        if any(nm._parameters["weight"].dtype != torch.float32 for nm in norms):
            return "a norm weight other than float32"
        out.append((ptrs, [nm._parameters["weight"].data_ptr() for nm in norms],
                    [nm.variance_epsilon for nm in norms]))
    return out


def _fused_layers(decoder, x, cache, cos, sin, sees, wanted, grabbed, args):
    """The same layers in two C calls each (``mtplab/csrc/few_rows.c``): norm, q/k/v products and rotary, writing
    keys and values into the cache's buffers, in one; attention, output product, norm and MLP in the other.
    ``sees``: None for a chain (causal), else the boolean mask ``[1, 1, n, past + n]``; ``args``: from
    :func:`_fused_args`."""
    lib, threads = kernels._LIB, torch.get_num_threads()
    n, H = x.shape
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    mask = None if sees is None else sees[0, 0].contiguous()
    cfg, attn = decoder.config, decoder.layers[0].self_attn
    Hq, Hkv, D, scale = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim, attn.scaling
    inter = decoder.layers[0].mlp.gate_proj.weight.shape[0]
    q, like = x.new_empty(n, Hq * D), x.new_empty(1, Hkv, n, D)  # `like`: the shape of one pass's keys
    for i, (layer_cache, ((wq, wk, wv, wo, wg, wu, wd), (ln1, ln2), (eps1, eps2))) in enumerate(zip(cache.layers, args)):
        if i in wanted:
            grabbed[i] = x.clone()  # x is updated in place below
        past = layer_cache.extend(like, like)
        keys, values = layer_cache.keys, layer_cache.values
        lib.mtplab_attn_in(x.data_ptr(), n, H, ln1, eps1, wq, wk, wv, Hq, Hkv, D, cos.data_ptr(), sin.data_ptr(),
                           q.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.stride(1), past, threads)
        lib.mtplab_attn_out(x.data_ptr(), n, H, q.data_ptr(), keys.data_ptr(), values.data_ptr(), past + n,
                            keys.stride(1), Hq, Hkv, D, scale, 0 if mask is None else mask.data_ptr(), wo, ln2, eps2,
                            wg, wu, wd, inter, threads)
    return x


