"""Adapter for the MTP layers a checkpoint ships with its target (DeepSeek-V3, GLM-4.5, MiMo, Mellum, ...: any
config with ``num_mtp_layers``).

It runs transformers' own ``MtpModel`` (``transformers.modeling_layers``) as transformers' ``MTPCandidateGenerator``
does (``model.generate(..., use_mtp=True)``). MTP layer j is one decoder layer of the target's kind with its own KV
cache; at every position t it combines a hidden state and the embedding of a later token, and drafts one token::

    layer 0:  [RMSNorm(embedding of x_{t+1}), RMSNorm(target's hidden state h_t)] ─► Linear ─► decoder layer ─► s0_t
              target's LM head · s0_t ─► q(x_{t+2}) ─► draft 1
    layer 1:  [RMSNorm(embedding of draft 1), RMSNorm(s0_t)] ─► Linear ─► decoder layer ─► s1_t ─► draft 2, and so on

So a round drafts at most ``num_mtp_layers`` tokens. Each round first feeds the layers every position the target made
final since the last round (their caches must cover the whole sequence). Layer j's newest cache rows were computed
from drafts 1..j; when fewer than ``num_mtp_layers - 1`` drafts were accepted those rows are wrong, so (exactly like
transformers) the caches are cut back by ``num_mtp_layers`` rows and those positions are computed again.

Like transformers, the first round after the prompt drafts nothing (transformers needs one target pass first).
"""
from __future__ import annotations

import torch

from ..sampling import choose, probs
from .base import Draft, Drafter


class BuiltinMTPDrafter(Drafter):
    """Drafts with the target checkpoint's own MTP layers.

    ``mtp_model``: a transformers ``MtpModel`` made for the target; by default it is loaded from the target's checkpoint
    folder or hub id (``MtpModel.from_pretrained(target.model)``) when the drafter is bound.
    """

    uses_target_hidden = True
    needs_target_cache = True

    def __init__(self, mtp_model=None, name: str = "builtin-mtp"):
        self.mtp = mtp_model
        self.name = name
        self.target = None
        self.cache = None

    @classmethod
    def from_target(cls, target, **kwargs) -> "BuiltinMTPDrafter":
        """Load the MTP layers stored in ``target``'s checkpoint now (rather than when a decoder binds it)."""
        drafter = cls(**kwargs)
        drafter.bind(target)
        return drafter

    def bind(self, target) -> None:
        from transformers.modeling_layers import MtpModel

        config = target.model.config
        if getattr(config.get_text_config(), "num_mtp_layers", None) is None:
            raise ValueError(f"the target {target.name} ({type(target.model).__name__}) has no MTP layers: its config "
                             "has no num_mtp_layers")
        if self.mtp is None:  # as MTPCandidateGenerator: the MTP layers go where the target's last layer is
            device = next(target.model.get_decoder().layers[-1].parameters()).device
            self.mtp = MtpModel.from_pretrained(target.model, device_map={"": device})
        self.mtp.eval()
        self.mtp_config = config.get_mtp_config()
        self.target = target

    @property
    def num_layers(self) -> int:
        return len(self.mtp.layers)

    def reset(self, prompt_ids, target_hidden=None) -> None:
        from transformers.cache_utils import MtpCache

        self.cache = MtpCache(config=self.mtp_config)
        self.cache.activate_past_recording()
        self.first_round = True
        self.unseen = []  # target hidden states of final positions the MTP layers have not been fed yet
        self.history = None  # every final target hidden state (needed to recompute rows when num_layers > 1)
        self.last_accepted = 0

    def observe(self, target_hidden, target_cache) -> None:
        if target_hidden is not None:
            self.unseen.append(target_hidden)
            self.last_accepted = len(target_hidden) - 1  # after a verify pass: the drafts it accepted

    def propose(self, ids, k, cfg, generator, target_hidden=None) -> Draft:
        if self.first_round:  # as transformers: the first round is a plain target step
            self.first_round = False
            return Draft([], None)
        hidden = torch.cat(self.unseen)
        self.unseen = []
        if self.num_layers > 1:
            self.history = hidden if self.history is None else torch.cat([self.history, hidden])
            if self.cache.get_seq_length() > 0 and self.last_accepted < self.num_layers - 1:
                self.cache.crop(-self.num_layers)  # rows computed from rejected drafts: redo them
                hidden = self.history[-(len(hidden) + self.num_layers):]
        # position t's row pairs the hidden state h_t with the token at t + 1, at position t + 1
        m = len(hidden)
        device = hidden.device
        tokens = torch.tensor([ids[-m:]], device=device)
        positions = torch.arange(len(ids) - m, len(ids), device=device)[None]
        states = hidden[None]
        drafted, qs = [], []
        for layer in range(self.num_layers):
            states = self.mtp.forward_layer(layer, states, positions, self.cache, input_ids=tokens)
            logits = self.logits(states[:, -1:])[0, -1]
            q = probs(logits, cfg)
            token = choose(logits, q, cfg, generator)
            drafted.append(token)
            qs.append(q)
            # the next layer sees every row shifted by one token: the newest token is the one just drafted
            tokens = torch.cat([tokens[:, 1:], torch.tensor([[token]], device=device)], dim=1)
            positions = positions + 1
        return Draft(drafted[:k], torch.stack(qs[:k]) if k else None, start_position=len(ids) - 2)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Draft logits from MTP states: the target's LM head applied as ``MtpModel.forward`` applies it (states
        divided by the config's ``logits_mup_width_multiplier`` first, logits cut to ``unpadded_vocab_size``), written
        with public API only (transformers' own helper for this is private)."""
        config = self.mtp.config
        multiplier = getattr(config, "logits_mup_width_multiplier", None)
        if multiplier is not None:
            states = states / multiplier
        logits = self.target.model.get_output_embeddings()(states)
        vocab = getattr(config, "unpadded_vocab_size", None)
        if vocab is not None and vocab < logits.shape[-1]:
            logits = logits[..., :vocab]
        return logits

    @property
    def cache_len(self) -> int:
        return 0 if self.cache is None else self.cache.get_seq_length()
