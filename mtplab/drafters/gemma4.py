"""Adapter for Gemma 4's MTP drafters: the ``google/gemma-4-*-it-assistant`` checkpoints (``Gemma4AssistantForCausalLM``)

It drives the assistant as transformers' ``SinglePositionMultiTokenCandidateGenerator`` does
(``model.generate(..., assistant_model=assistant)``)::

    target's embedding of the newest token x ─┐
                                              ├─ concat ─► assistant ─► logits → q(next token)
    target's last hidden state h (before x) ──┘     │         └──────► its own state h' (target width)
                                                    │
                 its attention layers have no K/V projections: their queries read the TARGET's KV cache
                 (of its last sliding- and full-attention layer before its own KV-shared layers, if any)

    step j+1: h ← h', x ← the token just drafted. The position id stays at x's position for the whole draft.

The assistant keeps no cache of its own, so rollback is free; it needs no prefill either. Like transformers, the first
round after the prompt drafts nothing (transformers needs one target pass before the assistant has inputs).

One deliberate difference: after a partial acceptance transformers slices the verify pass's KV states to the sequence
length, which keeps one row too many (the KV of the first rejected draft, at the position being drafted from). This
adapter reads the target's rolled-back cache instead, so the assistant sees exactly the accepted tokens.
"""
from __future__ import annotations

import torch

from ..sampling import choose, probs
from .base import Draft, Drafter

ASSISTANT_CLASSES = ("Gemma4AssistantForCausalLM", "Gemma4UnifiedAssistantForCausalLM")


def kv_source_layers(text_config) -> dict:
    """For each attention type, the target layer whose KV cache the assistant reads: the last layer of that type
    before the target's KV-shared layers (transformers' ``kv_sharing_modes == "store"``), or the last of that type in
    a target without KV sharing."""
    first_shared = text_config.num_hidden_layers - (text_config.num_kv_shared_layers or 0)
    types = text_config.layer_types[:first_shared]
    return {t: max(i for i, u in enumerate(types) if u == t) for t in set(types)}


class Gemma4AssistantDrafter(Drafter):
    """Drafts with a Gemma 4 assistant (``assistant``: a loaded ``Gemma4AssistantForCausalLM``, or a hub id / folder).

    Mirrors transformers' ``SinglePositionMultiTokenCandidateGenerator``; q is the assistant's softmax under the run's
    sampling settings, so verification stays lossless when sampling.
    """

    uses_target_hidden = True
    needs_target_cache = True

    def __init__(self, assistant, name: str | None = None):
        if isinstance(assistant, str):
            assistant = self.load(assistant)
        if type(assistant).__name__ not in ASSISTANT_CLASSES:
            raise TypeError(f"assistant must be one of {ASSISTANT_CLASSES}, got {type(assistant).__name__}")
        self.assistant = assistant.eval()
        source = assistant.config.name_or_path
        self.name = name or (f"gemma4-assistant({source})" if source else "gemma4-assistant")
        self.target = None

    @staticmethod
    def load(name_or_path, **kwargs):
        """``AutoModelForCausalLM.from_pretrained`` for an assistant checkpoint. (transformers 5.23.0 cannot build
        one: its ``Gemma4TextConfig.kv_sharing_modes`` raises when every layer reuses KV states, as in every assistant;
        pyproject.toml excludes that release.)"""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs).eval()

    def bind(self, target) -> None:
        text = target.model.config.get_text_config()
        vocab = self.assistant.config.get_text_config().vocab_size
        if vocab != target.vocab_size:
            raise ValueError(f"the assistant drafts over {vocab} tokens but the target {target.name} has "
                             f"{target.vocab_size}: it was made for another target")
        width = self.assistant.config.backbone_hidden_size
        if width != text.hidden_size:
            raise ValueError(f"the assistant was made for a target of hidden size {width}, but {target.name} has "
                             f"hidden size {text.hidden_size}")
        self.embed = target.model.get_input_embeddings()  # Gemma's scaled embedding, as transformers passes it
        self.kv_layers = kv_source_layers(text)
        self.target = target

    def reset(self, prompt_ids, target_hidden=None) -> None:
        self.first_round = True
        self.target_cache = None

    def observe(self, target_hidden, target_cache) -> None:
        self.target_cache = target_cache

    def propose(self, ids, k, cfg, generator, target_hidden=None) -> Draft:
        if self.first_round:  # as transformers: the first round is a plain target step
            self.first_round = False
            return Draft([], None)
        if target_hidden is None:
            raise ValueError("Gemma4AssistantDrafter needs the target's last hidden state (the decoder passes it)")
        layers = self.target_cache.layers  # rolled back: the keys and values of every token but the newest
        shared_kv = {t: (layers[i].keys, layers[i].values) for t, i in self.kv_layers.items()}
        device = target_hidden.device
        position = torch.tensor([[len(ids) - 1]], device=device)  # the newest token's position, for every step
        mask = torch.ones(1, len(ids), dtype=torch.long, device=device)  # no padding (generate's mask)
        h, token = target_hidden.view(1, 1, -1), ids[-1]
        tokens, qs = [], []
        for _ in range(k):
            x = torch.cat([self.embed(torch.tensor([[token]], device=device)), h], dim=-1)
            out = self.assistant(inputs_embeds=x, position_ids=position, attention_mask=mask, shared_kv_states=shared_kv)
            logits = out.logits[0, -1]
            q = probs(logits, cfg)
            token = choose(logits, q, cfg, generator)
            tokens.append(token)
            qs.append(q)
            h = out.last_hidden_state
        return Draft(tokens, torch.stack(qs) if qs else None, start_position=len(ids) - 2)
