"""A context-reading MTP drafter in the EAGLE-3 family, laid out key for key like vllm-project/speculators'
``Eagle3DraftModel`` (Llama layer), so that ``mtplab export-drafter --format speculators`` is a copy, not a
conversion, and ``vllm serve`` can run it::

    target's hidden states entering layers low, mid, high (e.g. 2, 15, 27 of 30), at position j
              │  concat [3H]
              ▼
             fc  ──► f_j  (fused feature, [H])            embedding of x_{j+1} (the target's own, frozen)
                        │                                                 │
                        └────── hidden_norm ───┐   ┌── input_layernorm ───┘
                                               ▼   ▼
                       one decoder layer: attention over every earlier position's [e; f] (its own KV cache,
                       rolled back with the target's), then a SwiGLU MLP; residual from f
                                               │
                                               ▼ g_j ──► norm ──► target's LM head on the draft vocabulary ──► q(x_{j+2})
                                               │
        next draft step: f ← g_j (its own output state, fed back), x ← the token it just drafted, position j + 1

The first round reads every position of the prompt (one pass over all of them, filling the drafter's cache); each
later round reads the positions the target accepted since, then drafts k tokens one at a time. Draft steps add
rows to the drafter's cache; ``rollback`` drops them, because the next round re-reads those positions with the
target's real features. Training runs the same layer in "training-time test" form (:meth:`Eagle3Head.unrolled`):
step s at every position attends to the real features before it plus its own fed-back states of steps 1..s,
exactly the rows the drafter's cache holds when it drafts.

Its probabilities q feed the same lossless verification as every drafter.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from ..sampling import probs
from .base import Draft, Drafter
from .prompt_lookup import check_context_ngram, copy_or_choose

KIND = "eagle3"


def default_target_layers(num_layers: int) -> list:
    """EAGLE-3's (and vLLM's, speculators') low / middle / high layers: ``[2, L // 2, L - 3]``; for targets of
    fewer than 7 layers, where those collide, up to three layers from 1 on."""
    if num_layers >= 7:
        return [2, num_layers // 2, num_layers - 3]
    return list(range(1, num_layers + 1))[:3] if num_layers > 1 else [0]


def layer_config(target_config, intermediate_size: int | None = None) -> LlamaConfig:
    """The config of the drafter's one decoder layer: the target's attention shape, norm epsilon and RoPE, as
    speculators builds its ``transformer_layer_config`` from the verifier's config."""
    c = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    heads = c.num_attention_heads
    return LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=intermediate_size or c.intermediate_size, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, rope_parameters=dict(c.rope_parameters),
        hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
    )


class Eagle3Attention(nn.Module):
    """Causal self-attention over ``[embedding; feature]`` rows (q/k/v read 2H), computed as transformers' eager
    attention does (scores in the input dtype, softmax in float32), so that it equals speculators' layer."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = nn.Linear(2 * h, self.heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * h, self.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, h, bias=False)

    def qkv(self, x, cos, sin):
        """Queries ``[B, heads, n, d]`` and keys, values ``[B, kv_heads, n, d]`` of rows ``x`` ``[B, n, 2H]``."""
        split = lambda t, n: t.unflatten(-1, (n, self.head_dim)).transpose(1, 2)
        q, k = apply_rotary_pos_emb(split(self.q_proj(x), self.heads), split(self.k_proj(x), self.kv_heads), cos, sin)
        return q, k, split(self.v_proj(x), self.kv_heads)

    def attend(self, q, keys, values, mask, own=()):
        """``softmax(q kᵀ / √d + mask) v`` over ``keys``/``values`` ``[B, kv_heads, m, d]`` (shared by
        ``heads / kv_heads`` query heads); ``mask`` ``[n, m]`` or ``[B, n, m]`` (True: may look).

        ``own``: more ``(keys, values)`` pairs ``[B, kv_heads, n, d]`` whose row t only query t sees (training-time
        test's own rows of earlier steps: speculators' mask, the causal block followed by one diagonal block per
        step). They join the same softmax as one score per query each, instead of ``n x n`` blocks masked but for
        their diagonals (a quarter to a third of an EAGLE-3 training step on a CPU went to those masked scores)."""
        group = self.heads // self.kv_heads
        rep = lambda t: t.repeat_interleave(group, 1)  # noqa: E731
        scale = self.head_dim ** -0.5
        scores = q @ rep(keys).transpose(-1, -2) * scale
        scores = scores.masked_fill(~(mask if mask.dim() == 2 else mask[:, None]), float("-inf"))
        scores = torch.cat([scores, *((q * rep(k)).sum(-1, keepdim=True) * scale for k, _ in own)], dim=-1)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        m = keys.shape[-2]
        out = weights[..., :m] @ rep(values)
        for i, (_, v) in enumerate(own):
            out = out + weights[..., m + i, None] * rep(v)
        return out

    def out(self, attended):
        return self.o_proj(attended.transpose(1, 2).flatten(-2))


class Eagle3Layer(nn.Module):
    """speculators' ``LlamaDecoderEagle3FirstLayer``: norms the embedding and the feature apart, attends over both,
    keeps the feature as the residual, then the target-shaped SwiGLU MLP."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def rows(self, embeds, features):
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(features)], dim=-1)

    def finish(self, features, attended):
        x = features + self.self_attn.out(attended)
        return x + self.mlp(self.post_attention_layernorm(x))


class Eagle3Head(nn.Module):
    """The trainable network: ``fc`` (3H → H), one :class:`Eagle3Layer` and the final ``norm``. The embedding and
    the LM head stay the target's (frozen).

    :meth:`step` runs the layer over new rows with a KV cache (drafting); :meth:`unrolled` runs ``steps``
    training-time-test steps over whole sequences at once (training, and the check against speculators)."""

    def __init__(self, config: LlamaConfig, target_layers):
        super().__init__()
        self.layer_config = config
        self.target_layers = [int(i) for i in target_layers]
        self.config = dict(kind=KIND, target_layers=self.target_layers, **{
            k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                            "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size",
                                            "max_position_embeddings")}, rope_parameters=dict(config.rope_parameters))
        h = config.hidden_size
        self.fc = nn.Linear(len(self.target_layers) * h, h, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(config)])
        self.norm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    @classmethod
    def for_target(cls, target_config, target_layers=None, intermediate_size: int | None = None) -> "Eagle3Head":
        c = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        layers = default_target_layers(c.num_hidden_layers) if target_layers is None else list(target_layers)
        if not layers or min(layers) < 0 or max(layers) > c.num_hidden_layers or len(set(layers)) != len(layers):
            raise ValueError(f"target_layers must be distinct layer ids in [0, {c.num_hidden_layers}] (the target has "
                             f"{c.num_hidden_layers} layers; id i reads the hidden state entering layer i), got {layers}")
        return cls(layer_config(c, intermediate_size), layers)

    @classmethod
    def from_config(cls, config: dict) -> "Eagle3Head":
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rms_norm_eps", "max_position_embeddings", "rope_parameters")
        c = LlamaConfig(num_hidden_layers=1, hidden_act="silu", attention_bias=False, mlp_bias=False,
                        tie_word_embeddings=False, **{k: config[k] for k in keys})
        return cls(c, config["target_layers"])

    def step(self, embeds, features, positions, cache=None):
        """The layer over new rows of one sequence (``embeds``, ``features`` ``[n, H]``, ``positions`` ``[n]``), each
        seeing the ``cache`` (keys, values of earlier rows) and the new rows before it. Returns the output states
        ``[n, H]`` (pre-norm: what the next draft step reads) and the cache with the new rows appended."""
        layer = self.layers[0]
        x = layer.rows(embeds, features)[None]
        q, k, v = layer.self_attn.qkv(x, *self.rotary_emb(x, positions[None]))
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=-2), torch.cat([cache[1], v], dim=-2)
        n, m = q.shape[-2], k.shape[-2]
        mask = torch.ones(n, m, dtype=torch.bool, device=x.device).tril(m - n)
        return layer.finish(features, layer.self_attn.attend(q, k, v, mask))[0], (k, v)

    def unrolled(self, aux, embeds, steps: int, positions=None, seeds=None) -> list:
        """Training-time test: ``steps`` draft steps at every position of ``B`` sequences at once.

        ``aux``: the target's hidden states at :attr:`target_layers`, concatenated ``[B, n, 3H]``; ``embeds[s]``:
        ``[B, n, H]``, the embeddings step ``s`` reads at each position (step 0: of the token after that position).
        Step 0 attends causally over the real features; step s > 0 at position t reads its own state of step s - 1
        and attends to the real rows ≤ t plus its own rows of steps 1..s at t, as the drafting cache holds them.
        Returns the output states of every step (``[B, n, H]`` each, pre-norm).

        ``seeds`` ``[B, W]``: only the drafts from these positions (``[B, W, H]`` each): every position's real row
        is still a key, but queries, the MLP and the later steps run only at the seeds (a long prompt's positions
        draft nothing the loss reads)."""
        layer, attn = self.layers[0], self.layers[0].self_attn
        n = aux.shape[1]
        positions = torch.arange(n, device=aux.device)[None] if positions is None else positions
        if seeds is None:
            at, mask = (lambda t: t), torch.ones(n, n, dtype=torch.bool, device=aux.device).tril()
        else:
            rows = torch.arange(seeds.shape[0], device=aux.device)[:, None]
            at = lambda t: t.expand(seeds.shape[0], *t.shape[1:])[rows, seeds]  # noqa: E731 (rows of [B, n, ...])
            mask = torch.arange(n, device=aux.device) <= seeds[..., None]  # seed t sees the real rows <= t
        features, out, own = self.fc(aux), [], []
        for s in range(steps):
            x = layer.rows(at(embeds[s]) if s else embeds[s], features)
            q, k, v = attn.qkv(x, *self.rotary_emb(x, (at(positions) if s else positions) + s))
            if s == 0:
                real = (k, v)
                q, features = at(q.transpose(1, 2)).transpose(1, 2), at(features)  # the seeds' rows only
            else:  # step s's own rows follow the real ones: real rows <= t, then position t's row of each step
                own.append((k, v))
            features = layer.finish(features, attn.attend(q, *real, mask, own))
            out.append(features)
        return out


class Eagle3Drafter(Drafter):
    """Drafts k tokens with an :class:`Eagle3Head`, reading the target's hidden states at ``head.target_layers``
    for every position (the decoder hands them over via ``observe``) and keeping its own KV cache.

    ``vocab_ids``: the token ids the draft head may propose (``None``: the whole vocabulary).
    ``context_ngram``: copy a token from the context when the last n tokens occurred there before, as the shipped
    ``mtp`` drafter does (``None``: the head alone)."""

    uses_target_hidden = True

    def __init__(self, head: Eagle3Head, vocab_ids: torch.Tensor | None = None, name: str = KIND,
                 context_ngram: int | None = None):
        self.context_ngram = check_context_ngram(context_ngram)
        self.head = head.eval()
        self.vocab_ids = None if vocab_ids is None else torch.as_tensor(vocab_ids, dtype=torch.long)
        self.name = name
        self.target, self._half = None, None
        self.reset([])

    @property
    def hidden_layers(self) -> list:
        return self.head.target_layers

    def bind(self, target) -> None:
        from .mtp import restricted_lm_head

        config = self.head.config
        t = target.model.config.get_text_config()
        if (config["hidden_size"], config["vocab_size"]) != (t.hidden_size, target.vocab_size):
            raise ValueError(f"this EAGLE-3 drafter was made for hidden size {config['hidden_size']} and a vocabulary "
                             f"of {config['vocab_size']}, but the target {target.name} has hidden size {t.hidden_size} "
                             f"and a vocabulary of {target.vocab_size}")
        if max(self.head.target_layers) > t.num_hidden_layers:
            raise ValueError(f"this EAGLE-3 drafter reads target layers {self.head.target_layers}, but the target "
                             f"{target.name} has {t.num_hidden_layers} layers")
        self.target = target
        self.embed = target.model.get_input_embeddings()
        self._lm_head_t = restricted_lm_head(target, self.vocab_ids)
        self.head.to(device=self._lm_head_t.device, dtype=self._lm_head_t.dtype)
        self._half = self._half_copies(target)

    def _half_copies(self, target):
        """Float16 copies of the head's weights (which ship in float16: the same values) and of the draft
        vocabulary's rows of the LM head (rounded to float16; verification is exact for any q), read by mtplab's C
        product (:func:`mtplab.kernels.half_linear`): half the bytes of a draft step. Used where a drafting step
        was measured faster this way than by the modules (once per machine and head shape), else ``None``.
        On an Intel(R) Xeon(R) Processor (2 cores) the draft cost c went from 0.096 to 0.068 of a target step (A/B
        in one run; ``decoder.draft_cost`` later: 0.066, the MTP head's fused step 0.049 in the same run)."""
        from .. import kernels
        from ..models import kernel_pass

        half = kernels.HalfCopies.of(self.head, extra=self._lm_head_t.t())
        if isinstance(half, str):
            return None
        e, g, pos = self.embed(torch.tensor([1])).detach(), torch.zeros(1, self._lm_head_t.shape[0]), torch.tensor([0])
        step = lambda: self.head.step(e, g, pos)[0]  # noqa: E731 (a drafting step's layer)

        def with_half():
            with half.use():
                self._logits(step(), half.extra)

        target_pass = kernel_pass(target.model)
        key = f"eagle3-step|{kernels.model_key(target.model)}|{self.head.config}|{self._lm_head_t.shape[1]}"
        faster = kernels.timed_choice(key, {"modules": lambda: self._logits(step(), None), "half": with_half},
                                      sweep=lambda: target_pass(1))
        return half if faster == "half" else None

    def _fresh_half(self):
        """The float16 copies, while the head's weights are still the ones copied (else ``None``: the modules)."""
        return self._half if self._half is not None and self._half.fresh() else None

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        """Draft logits over the full vocabulary (``-inf`` outside the draft vocabulary) from output states."""
        half = self._fresh_half()
        return self._logits(g, None if half is None else half.extra)

    def _logits(self, g: torch.Tensor, lm16: torch.Tensor | None) -> torch.Tensor:
        """:meth:`logits` with the LM head's float16 copy ``lm16`` for a few rows outside autograd, or ``None``."""
        from .. import kernels
        from .mtp import full_vocab_logits

        s = self.head.norm(g)
        small = (kernels.half_linear(s, lm16) if lm16 is not None and not torch.is_grad_enabled()
                 and s.shape[0] <= kernels.MAX_ROWS else s @ self._lm_head_t)
        return full_vocab_logits(small, self.vocab_ids, self.target.vocab_size)

    # --- the drafter's state: the target's features per position and its own KV cache over them -----------------
    def reset(self, prompt_ids, target_hidden=None) -> None:
        self._features, self._cache, self._read = [], None, 0

    def observe(self, target_hidden, target_cache) -> None:
        if target_hidden is not None:
            self._features.extend(target_hidden)

    def rollback(self, num_valid: int) -> None:
        del self._features[max(0, num_valid - 1):]  # features exist for positions 0 .. num_valid - 2 at most
        self._read = min(self._read, len(self._features))
        if self._cache is not None:  # drop the draft steps' rows (and any position no longer valid)
            self._cache = tuple(t[..., : self._read, :] for t in self._cache)

    @property
    def cache_len(self) -> int:
        return 0 if self._cache is None else self._cache[0].shape[-2]

    def propose(self, ids, k, cfg, generator, target_hidden=None) -> Draft:
        m = len(ids) - 1  # positions 0 .. m-1 have the target's features and the token after them
        if len(self._features) != m:
            raise ValueError(f"this EAGLE-3 drafter reads the context: it needs the target's hidden states of all {m} "
                             f"earlier positions (the decoder hands them over via observe), it has "
                             f"{len(self._features)}")
        half = self._fresh_half()
        with half.use() if half is not None else nullcontext():
            return self._propose(ids, m, k, cfg, generator)

    def _propose(self, ids, m, k, cfg, generator) -> Draft:
        device = self._lm_head_t.device
        seq, qs = list(ids), []  # seq: ids + the draft
        if m > self._read:  # read the positions accepted since the last round
            new = torch.stack(self._features[self._read:m])
            g, self._cache = self.head.step(self.embed(torch.tensor(ids[self._read + 1:m + 1], device=device)),
                                            self.head.fc(new), torch.arange(self._read, m, device=device), self._cache)
            self._g, self._read = g[-1:], m
        g = self._g
        for i in range(k):
            logits = self.logits(g)[0]
            token, q = copy_or_choose(seq, logits, probs(logits, cfg), self.context_ngram, cfg, generator)
            seq.append(token)
            qs.append(q)
            if i + 1 < k:  # the next step reads this draft at position m + i, with its own state fed back
                g, self._cache = self.head.step(self.embed(torch.tensor([token], device=device)), g,
                                                torch.tensor([m + i], device=device), self._cache)
        return Draft(seq[len(ids):], torch.stack(qs) if qs else None, start_position=m - 1)

    # --- saving and loading: the same folder layout as the MTP head (mtp_config.json + mtp_head.safetensors) ----
    def save(self, path, dtype: torch.dtype | None = None, **meta) -> Path:
        from .mtp import save_folder

        return save_folder(path, self.head, self.vocab_ids, self.name, dtype, **{"context_ngram": self.context_ngram,
                                                                                **meta})

    @classmethod
    def from_folder(cls, path, config: dict, tensors: dict) -> "Eagle3Drafter":
        vocab_ids = tensors.pop("vocab_ids", None)
        head = Eagle3Head.from_config(config)
        try:
            head.load_state_dict(tensors)
        except RuntimeError as e:
            raise ValueError(f"the weights in {path} do not fit the EAGLE-3 head its config describes: {e}") from None
        drafter = cls(head, vocab_ids, name=config.get("name", KIND), context_ngram=config.get("context_ngram"))
        drafter.meta = config
        return drafter
