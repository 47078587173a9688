"""mtplab's own multi-token-prediction (MTP) drafter: a small head that drafts from the target's last hidden state.

The same idea as Gemma 4's MTP "assistant" drafters and DeepSeek-V3's MTP modules, at the scale of a 135M target::

      target's last hidden state h_t ──► RMSNorm ─┐
                                                  ├─ concat ─► Linear(2H→H) ─► [residual SwiGLU MLP] × L ─► RMSNorm ─► s
    embedding of the next token x_{t+1} ► RMSNorm ┘                                                            │
          (the target's own, frozen)                                                                           ▼
                                                           draft logits = target's LM head (frozen) · s  ──►  q(x_{t+2})
                                                                                                               │
        step j+1: h ← s (the head's own output state), x ← the token just drafted ◄──────────────────────────-─┘

One target forward gives h_t; the head then drafts k tokens one after another, feeding its own state back, at the
cost of one small MLP plus one LM-head product per token. The LM head can be restricted to the most frequent
``draft_vocab_size`` tokens (like Gemma 4's sparse head): q is then zero elsewhere, which verification handles
exactly (those tokens come back through the residual). The head keeps no KV cache, so rollback is free.

Its probabilities q feed the same lossless verification as every drafter: greedy output is identical to the
target's, sampled output follows the target's distribution.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..sampling import choose, probs
from .base import Draft, Drafter

CONFIG_NAME = "mtp_config.json"
WEIGHTS_NAME = "mtp_head.safetensors"


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class SwiGLU(nn.Module):
    def __init__(self, size: int, inner: int):
        super().__init__()
        self.norm = RMSNorm(size)
        self.gate = nn.Linear(size, inner, bias=False)
        self.up = nn.Linear(size, inner, bias=False)
        self.down = nn.Linear(inner, size, bias=False)

    def forward(self, x):
        y = self.norm(x)
        return x + self.down(nn.functional.silu(self.gate(y)) * self.up(y))


class MTPHead(nn.Module):
    """``(h, e) -> s``: the trainable part of the drafter (the embedding and LM head stay the target's)."""

    def __init__(self, hidden_size: int, num_layers: int = 2, intermediate_size: int | None = None):
        super().__init__()
        self.config = dict(hidden_size=hidden_size, num_layers=num_layers,
                           intermediate_size=intermediate_size or 2 * hidden_size)
        self.norm_h = RMSNorm(hidden_size)
        self.norm_e = RMSNorm(hidden_size)
        self.proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.blocks = nn.ModuleList(SwiGLU(hidden_size, self.config["intermediate_size"]) for _ in range(num_layers))
        self.norm_out = RMSNorm(hidden_size)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        x = self.proj(torch.cat([self.norm_h(h), self.norm_e(e)], dim=-1))
        for block in self.blocks:
            x = block(x)
        return self.norm_out(x)


class MTPDrafter(Drafter):
    """Drafts k tokens from the target's last hidden state with an :class:`MTPHead`.

    ``vocab_ids``: the token ids the draft head may propose (``None``: the whole vocabulary).
    """

    uses_target_hidden = True

    def __init__(self, head: MTPHead, vocab_ids: torch.Tensor | None = None, name: str = "mtp"):
        self.head = head.eval()
        self.vocab_ids = None if vocab_ids is None else torch.as_tensor(vocab_ids, dtype=torch.long)
        self.name = name
        self.target = None

    def bind(self, target) -> None:
        hidden = target.model.get_input_embeddings().weight.shape[1]
        if hidden != self.head.config["hidden_size"]:
            raise ValueError(f"this MTP head was made for hidden size {self.head.config['hidden_size']}, but the "
                             f"target {target.name} has hidden size {hidden}")
        if self.vocab_ids is not None and int(self.vocab_ids.max()) >= target.vocab_size:
            raise ValueError(f"this MTP head drafts token ids up to {int(self.vocab_ids.max())}, beyond the "
                             f"target {target.name}'s vocabulary of {target.vocab_size}")
        self.target = target
        self.embed = target.model.get_input_embeddings()
        head_w = target.model.get_output_embeddings().weight
        # the (restricted) LM head, laid out for the few-row product: [H, V'] so that s @ W is one pass over W
        w = head_w if self.vocab_ids is None else head_w[self.vocab_ids]
        self._lm_head_t = w.detach().t().contiguous()
        self.head.to(device=head_w.device, dtype=head_w.dtype)

    def logits(self, s: torch.Tensor) -> torch.Tensor:
        """Draft logits over the full vocabulary (``-inf`` outside the draft vocabulary)."""
        small = s @ self._lm_head_t
        if self.vocab_ids is None:
            return small
        full = torch.full((*s.shape[:-1], self.target.vocab_size), float("-inf"), dtype=small.dtype, device=small.device)
        full[..., self.vocab_ids] = small
        return full

    def propose(self, ids, k, cfg, generator, target_hidden=None) -> Draft:
        if target_hidden is None:
            raise ValueError("MTPDrafter needs the target's last hidden state (the decoder passes it)")
        h, token = target_hidden, ids[-1]
        tokens, qs = [], []
        for _ in range(k):
            h = self.head(h, self.embed(torch.tensor(token, device=h.device)))
            logits = self.logits(h)
            q = probs(logits, cfg)
            token = choose(logits, q, cfg, generator)
            tokens.append(token)
            qs.append(q)
        return Draft(tokens, torch.stack(qs) if qs else None, start_position=len(ids) - 2)

    # --- saving and loading ---------------------------------------------------------------------------------
    def save(self, path, **meta) -> Path:
        """Write ``mtp_head.safetensors`` + ``mtp_config.json`` into the folder ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        if self.vocab_ids is not None:
            tensors["vocab_ids"] = self.vocab_ids.cpu()
        save_file(tensors, path / WEIGHTS_NAME)
        config = dict(self.head.config, name=self.name,
                      draft_vocab_size=None if self.vocab_ids is None else len(self.vocab_ids), **meta)
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=1))
        return path

    @classmethod
    def load(cls, path) -> "MTPDrafter":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_NAME).exists() or not (path / WEIGHTS_NAME).exists():
            raise ValueError(f"{path} is not an MTP drafter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        config = json.loads((path / CONFIG_NAME).read_text())
        tensors = load_file(path / WEIGHTS_NAME)
        vocab_ids = tensors.pop("vocab_ids", None)
        head = MTPHead(config["hidden_size"], config["num_layers"], config["intermediate_size"])
        try:
            head.load_state_dict(tensors)
        except RuntimeError as e:
            raise ValueError(f"the weights in {path} do not fit the head its config describes: {e}") from None
        drafter = cls(head, vocab_ids, name=config.get("name", "mtp"))
        drafter.meta = config
        return drafter
