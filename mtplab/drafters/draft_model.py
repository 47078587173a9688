"""A separate (smaller) causal LM with its own KV cache drafts k tokens autoregressively; and the layer-skip
self-drafter, which is the same thing built from the target's own first layers, final norm and LM head."""
from __future__ import annotations

import torch

from ..models import (Target, check_compatible, crop_cache, forward, load_model, new_cache, prepare_kernels,
                      truncated_copy)
from ..sampling import choose, probs
from .base import Draft, Drafter


class DraftModelDrafter(Drafter):
    """``model``: a transformers causal LM, a :class:`Target`, or a hub id / local folder to load."""

    def __init__(self, model, tokenizer=None, name: str | None = None):
        if isinstance(model, Target):
            model, tokenizer = model.model, tokenizer or model.tokenizer
        elif isinstance(model, str):
            from transformers import AutoTokenizer

            name = name or model
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            model = load_model(model)
        self.model = model.eval()
        self.kernel_plan = prepare_kernels(self.model)
        self.tokenizer = tokenizer
        self.name = name or f"draft-model({getattr(model.config, 'name_or_path', '') or type(model).__name__})"
        self.cache = None

    def bind(self, target) -> None:
        check_compatible(target, self.model, self.tokenizer)
        self.target = target

    def reset(self, prompt_ids, target_hidden=None) -> None:
        self.cache = new_cache(self.model)  # filled when first asked to draft (auto may never ask)

    def propose(self, ids, k, cfg, generator, target_hidden=None) -> Draft:
        feed = ids[self.cache.get_seq_length():]  # the tokens not yet in our cache (the prompt, on the first call)
        tokens, qs = [], []
        for _ in range(k):
            logits, _ = forward(self.model, feed, self.cache, logits=False)  # the last row's logits only
            q = probs(logits[-1], cfg)
            token = choose(logits[-1], q, cfg, generator)
            tokens.append(token)
            qs.append(q)
            feed = [token]
        return Draft(tokens, torch.stack(qs) if qs else None)

    def rollback(self, num_valid) -> None:
        crop_cache(self.cache, num_valid)

    @property
    def cache_len(self) -> int:
        return 0 if self.cache is None else self.cache.get_seq_length()


class LayerSkipDrafter(DraftModelDrafter):
    """Early-exit self-drafting: the target's first ``exit_layer`` layers + its final norm and LM head.

    The layers are the target's own modules (no extra weights); the drafter keeps its own KV cache.
    """

    def __init__(self, target: Target, exit_layer: int = 6):
        super().__init__(truncated_copy(target, exit_layer, share_weights=True), target.tokenizer,
                         name=f"layer-skip@{exit_layer}")
        self.exit_layer = exit_layer
        self._source = target

    def bind(self, target) -> None:
        if target is not self._source:
            raise ValueError("a LayerSkipDrafter drafts with its own target's layers: bind it to that target")
        super().bind(target)
