"""The one small interface every drafter implements.

A decode run calls ``reset`` once with the prompt, then each round ``propose`` (draft up to k tokens with their
draft probabilities q) and, after the target verified them, ``rollback`` (forget everything past the accepted
prefix). Drafters that read the target's last hidden state (MTP drafters) set ``uses_target_hidden`` and receive
the hidden state of the position that produced the newest token. Drafters that read more of the target (the adapters
for real MTP drafters need every final hidden state, or the target's KV cache) also get ``observe`` after each target
pass, as transformers hands its candidate generators the target's model outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling import SamplingConfig


@dataclass
class Draft:
    tokens: list  # drafted token ids, at most the k asked for (may be empty)
    q: torch.Tensor | None  # [len(tokens), V] draft probabilities under the run's sampling; None = deterministic
    start_position: int | None = None  # MTP drafters: target position whose hidden state seeded the draft
    # other guesses for the same positions, each a token list that continues ``ids`` like ``tokens`` does: with
    # greedy decoding the decoder verifies all of them in one pass as a token tree (see mtplab.tree)
    branches: list | None = None


class Drafter:
    name = "drafter"
    uses_target_hidden = False
    # with uses_target_hidden: None reads the last hidden state (after the final norm); a list of layer ids reads the
    # hidden states entering those layers, concatenated (id = number of layers: the last layer's output), as EAGLE-3
    hidden_layers = None
    needs_target_cache = False  # True for drafters whose ``observe`` reads the target's KV cache

    def bind(self, target) -> None:
        """Attach to a target once (check vocabularies, share modules). Called by the decoder."""
        self.target = target

    def reset(self, prompt_ids: list, target_hidden: torch.Tensor | None = None) -> None:
        """Start a new sequence; ``prompt_ids[-1]`` is the token the first round starts from."""

    def propose(self, ids: list, k: int, cfg: SamplingConfig, generator: torch.Generator,
                target_hidden: torch.Tensor | None = None) -> Draft:
        """Draft up to ``k`` tokens that follow ``ids`` (all tokens so far)."""
        raise NotImplementedError

    def rollback(self, num_valid: int) -> None:
        """The first ``num_valid`` tokens of the sequence are final; drop any state past them."""

    def observe(self, target_hidden: torch.Tensor | None, target_cache) -> None:
        """After each target pass (the prompt's prefill, then every verify once rolled back): the target's last hidden
        states of the positions that pass made final (``[m, H]``, or ``[m, len(hidden_layers) * H]``; ``None``
        unless ``uses_target_hidden``) and the
        target's KV cache, which holds every token but the newest. Most drafters ignore it."""

    @property
    def hidden_request(self):
        """What the decoder asks the target's passes for: ``False`` (nothing), ``True`` (the last hidden states) or
        the layer ids of :attr:`hidden_layers`."""
        return (self.hidden_layers or True) if self.uses_target_hidden else False

    @property
    def cache_len(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
