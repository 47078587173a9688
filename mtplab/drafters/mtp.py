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
exactly (those tokens come back through the residual). The head keeps no KV cache, so rollback is free. On a CPU
the step runs as one C call from float16 weights where that was measured faster (:class:`FusedHeadStep`).

Optionally (``context_attention=True``) the head also reads the context, as Gemma 4's assistant reads the target's
KV cache: one attention block after the first projection, whose memory holds, for every position j the target has
already read, a key from [h_j; embedding of x_j] and a value from [h_j; embedding of x_{j+1}] (the token that
followed there, so attending to j can copy it), with two learned priors: a bonus where x_j equals the token the head
is reading (an induction / n-gram match) and a penalty growing with distance. Its output projection starts at
zero, so a fresh block changes nothing until trained. The drafter collects the h_j the decoder hands it after
every target pass (``observe``); rollback drops the rows past the accepted prefix.

With greedy decoding the drafter can also offer a few other branches (``tree_width``, ``tree_copy``): the head's
runner-up first tokens, continued, and a copy of what followed the last token before. The decoder verifies them all
in one target pass as a token tree (``mtplab.tree``); the shipped settings are ``load_drafter("mtp-tree")``.

Its probabilities q feed the same lossless verification as every drafter: greedy output is identical to the
target's, sampled output follows the target's distribution.
"""
from __future__ import annotations

import json
import math
import weakref
from pathlib import Path

import torch
from torch import nn

from ..sampling import probs
from .base import Draft, Drafter
from .prompt_lookup import check_context_ngram, copy_or_choose, lookup

CONFIG_NAME = "mtp_config.json"
WEIGHTS_NAME = "mtp_head.safetensors"


NORM_EPS = 1e-5  # the heads' RMSNorm epsilon (torch's default, eps=None, would be the dtype's machine epsilon)


def RMSNorm(size: int) -> nn.RMSNorm:
    """``torch.nn.RMSNorm`` as the heads use it: a learned ``weight`` (the only state-dict entry, as saved heads
    have), epsilon :data:`NORM_EPS`. (Until 0.1 a hand-written module computed ``weight * x * rsqrt(...)``; torch
    multiplies by ``weight`` last, which differs in the last bit of float32 results, not in any greedy draft of the
    shipped head; in float16 torch's also no longer overflows for large inputs.)"""
    return nn.RMSNorm(size, eps=NORM_EPS)


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


class ContextAttention(nn.Module):
    """Attention from the head's state over the context the target has read (see the module docstring).

    ``memory(h, e_tok, e_next)`` turns the target's hidden states ``[..., m, H]`` and the embeddings of each
    position's token and of the token after it into keys and values ``[..., heads, m, d]``; ``forward(x, K, V, match,
    distance, mask)`` adds the attention output to the states ``x`` ``[..., n, H]``; ``match``, ``distance`` and
    ``mask`` are ``[..., n, m]`` (token equality, positions back from the draft's seed, which memory rows to see).
    """

    def __init__(self, hidden_size: int, heads: int = 4, head_dim: int = 64):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm_x, self.norm_h, self.norm_e = RMSNorm(hidden_size), RMSNorm(hidden_size), RMSNorm(hidden_size)
        self.q = nn.Linear(hidden_size, heads * head_dim, bias=False)
        self.k = nn.Linear(2 * hidden_size, heads * head_dim, bias=False)
        self.v = nn.Linear(2 * hidden_size, heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, hidden_size, bias=False)
        nn.init.zeros_(self.o.weight)  # a new block starts as the identity
        self.prior = nn.Parameter(torch.tensor([[2.0, 0.3]]).repeat(heads, 1))  # per head: match bonus, distance slope

    def _split(self, x):  # [..., n, heads * d] -> [..., heads, n, d]
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(-2, -3)

    def memory(self, h, e_tok, e_next):
        h = self.norm_h(h)
        return (self._split(self.k(torch.cat([h, self.norm_e(e_tok)], -1))),
                self._split(self.v(torch.cat([h, self.norm_e(e_next)], -1))))

    def forward(self, x, K, V, match, distance, mask):
        q = self._split(self.q(self.norm_x(x)))
        bonus, slope = self.prior[:, 0, None, None], self.prior[:, 1, None, None]
        scores = (q @ K.transpose(-1, -2) / math.sqrt(self.head_dim) + bonus * match.unsqueeze(-3)
                  - slope * torch.log1p(distance).unsqueeze(-3))
        scores = scores.masked_fill(~mask.unsqueeze(-3), float("-inf"))
        out = (torch.softmax(scores, dim=-1) @ V).transpose(-2, -3).flatten(-2)
        return x + self.o(out)


class MTPHead(nn.Module):
    """``(h, e) -> s``: the trainable part of the drafter (the embedding and LM head stay the target's).

    ``context_attention``: add a :class:`ContextAttention` block; ``forward`` then takes ``context``, the arguments
    of that block after ``x`` (``None``, e.g. with an empty memory, skips it).
    """

    def __init__(self, hidden_size: int, num_layers: int = 2, intermediate_size: int | None = None,
                 context_attention: bool = False):
        super().__init__()
        self.config = dict(hidden_size=hidden_size, num_layers=num_layers,
                           intermediate_size=intermediate_size or 2 * hidden_size,
                           context_attention=bool(context_attention))
        self.norm_h = RMSNorm(hidden_size)
        self.norm_e = RMSNorm(hidden_size)
        self.proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.attn = ContextAttention(hidden_size) if context_attention else None
        self.blocks = nn.ModuleList(SwiGLU(hidden_size, self.config["intermediate_size"]) for _ in range(num_layers))
        self.norm_out = RMSNorm(hidden_size)

    def forward(self, h: torch.Tensor, e: torch.Tensor, context=None) -> torch.Tensor:
        x = self.proj(torch.cat([self.norm_h(h), self.norm_e(e)], dim=-1))
        if self.attn is not None and context is not None:
            x = self.attn(x, *context)
        for block in self.blocks:
            x = block(x)
        return self.norm_out(x)


def save_folder(path, head: nn.Module, vocab_ids, name: str, dtype: torch.dtype | None = None, **meta) -> Path:
    """A drafter folder, for every kind of head: ``mtp_head.safetensors`` (the head's weights, in ``dtype`` if given,
    and the draft vocabulary) and ``mtp_config.json`` (the head's ``config``, the name, the draft vocabulary size and
    ``meta``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype or v.dtype).cpu().contiguous() for k, v in head.state_dict().items()}
    if vocab_ids is not None:
        tensors["vocab_ids"] = vocab_ids.cpu()
    save_file(tensors, path / WEIGHTS_NAME)
    config = dict(head.config, name=name, draft_vocab_size=None if vocab_ids is None else len(vocab_ids), **meta)
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    return path


_RESTRICTED = {}  # id(an LM head weight) -> (a weak reference to it, {draft vocabulary: restricted copy})


def restricted_lm_head(target, vocab_ids: torch.Tensor | None) -> torch.Tensor:
    """The target's LM head restricted to the draft vocabulary (``None``: all of it), laid out for the few-row
    product: ``[H, V']``, so that ``s @ W`` is one pass over W. Made once per target weight and draft vocabulary
    ("mtp", "mtp-tree" and "mtp-head" side by side hold one copy), dropped with the target."""
    head_w = target.model.get_output_embeddings().weight
    entry = _RESTRICTED.get(id(head_w))
    if entry is None or entry[0]() is not head_w:
        entry = _RESTRICTED[id(head_w)] = (weakref.ref(head_w, lambda _, key=id(head_w): _RESTRICTED.pop(key, None)), {})
    vocab = None if vocab_ids is None else tuple(vocab_ids.tolist())
    if vocab not in entry[1]:
        w = head_w if vocab_ids is None else head_w[vocab_ids.to(head_w.device)]
        entry[1][vocab] = w.detach().t().contiguous()
    return entry[1][vocab]


class FusedHeadStep:
    """:class:`MTPHead`'s step and the draft logits in one C call (``mtplab_mtp_step`` in ``mtplab/csrc/few_rows.c``)
    from float16 copies: of the head's weights (which ship in float16, so these are the same values) and of the
    draft vocabulary's rows of the target's LM head (rounded to float16), with float32 arithmetic. Half the bytes
    and none of the ~40 small ops of the module path; the drafts' q differ from it by float16 rounding of the LM
    head, which verification does not care about (it is exact for any q). For a head without the context block whose
    weights are float16 values (one saved in float16 and loaded); :meth:`fresh` says whether the weights are still
    the ones copied (training changes them)."""

    def __init__(self, head: MTPHead, lm_head_weight: torch.Tensor, vocab_ids: torch.Tensor | None):
        blocks = head.blocks
        self.head, self.lm_weight = head, weakref.ref(lm_head_weight)
        self.sizes = (head.config["hidden_size"], head.config["intermediate_size"], len(blocks))
        half = lambda ts: torch.stack([t.detach() for t in ts]).half().contiguous()
        self.wp = head.proj.weight.detach().half().contiguous()
        self.wg, self.wu, self.wd = (half([getattr(b, name).weight for b in blocks]) for name in ("gate", "up", "down"))
        rows = lm_head_weight if vocab_ids is None else lm_head_weight[vocab_ids]
        self.wlm = rows.detach().half().contiguous()
        self.norms = torch.stack([n.weight.detach() for n in (head.norm_h, head.norm_e, *(b.norm for b in blocks),
                                                              head.norm_out)]).float().contiguous()
        self.versions = self._versions()

    @staticmethod
    def unavailable(head: MTPHead, lm_head_weight: torch.Tensor) -> str | None:
        """Why a head cannot take this step (``None``: it can)."""
        from .. import kernels

        why = kernels.half_unavailable()  # the step is compiled with the float16 product, or not at all
        if why is not None:
            return why
        if head.attn is not None:
            return "the head reads the context (an attention block)"
        if lm_head_weight.device.type != "cpu" or lm_head_weight.dtype != torch.float32:
            return "the target's LM head is not float32 on the CPU"
        for name, p in head.named_parameters():
            if p.device.type != "cpu" or p.dtype != torch.float32 or not torch.equal(p.detach().half().float(), p.detach()):
                return f"the head's {name} is not float32 holding float16 values (save it in float16 and load it)"
        return None

    def _versions(self):
        lm = self.lm_weight()
        return [p._version for p in self.head.parameters()] + [None if lm is None else lm._version]

    def fresh(self) -> bool:
        """Whether the head's and the LM head's weights are still the ones copied (training changes them)."""
        return self._versions() == self.versions

    def __call__(self, h: torch.Tensor, e: torch.Tensor):
        """``(s, logits)`` on the draft vocabulary for states ``h`` and token embeddings ``e`` ``[n, H]``."""
        from .. import kernels

        H, I, blocks = self.sizes
        h, e = h.float().contiguous(), e.float().contiguous()
        n = h.shape[0]
        s, logits = torch.empty(n, H), torch.empty(n, self.wlm.shape[0])
        kernels._LIB.mtplab_mtp_step(h.data_ptr(), e.data_ptr(), n, H, I, blocks, self.wlm.shape[0],
                                     self.norms.data_ptr(), NORM_EPS, self.wp.data_ptr(), self.wg.data_ptr(),
                                     self.wu.data_ptr(), self.wd.data_ptr(), self.wlm.data_ptr(), s.data_ptr(),
                                     logits.data_ptr(), torch.get_num_threads())
        return s, logits


# head -> {(id of the LM head weight, draft vocabulary): (a weak reference to that weight, the FusedHeadStep to use,
# or None where the modules were measured faster)}
_FUSED_STEPS = weakref.WeakKeyDictionary()


def full_vocab_logits(small: torch.Tensor, vocab_ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Logits on the draft vocabulary spread over the full vocabulary, ``-inf`` elsewhere (q is zero there)."""
    if vocab_ids is None:
        return small
    full = torch.full((*small.shape[:-1], vocab_size), float("-inf"), dtype=small.dtype, device=small.device)
    full[..., vocab_ids.to(small.device)] = small
    return full


class MTPDrafter(Drafter):
    """Drafts k tokens from the target's last hidden state with an :class:`MTPHead`.

    ``vocab_ids``: the token ids the draft head may propose (``None``: the whole vocabulary).
    ``context_ngram``: copy a token from the context when the last n tokens occurred there before (``None``: never).
    ``tree_width`` / ``tree_branch_len`` / ``tree_copy``: with greedy decoding, also offer branches for a token tree
    (``mtplab.tree``): one for each of the head's top ``tree_width`` first tokens besides the main draft's, continued
    like the main draft up to ``tree_branch_len`` tokens, and (``tree_copy``) what followed the latest earlier
    occurrence of the last token.
    """

    uses_target_hidden = True

    def __init__(self, head: MTPHead, vocab_ids: torch.Tensor | None = None, name: str = "mtp",
                 context_ngram: int | None = None, tree_width: int = 1, tree_copy: bool = False,
                 tree_branch_len: int = 2):
        if isinstance(tree_width, bool) or not isinstance(tree_width, int) or not 1 <= tree_width <= 8:
            raise ValueError(f"tree_width must be an integer in [1, 8] (1: no tree), got {tree_width!r}")
        if isinstance(tree_branch_len, bool) or not isinstance(tree_branch_len, int) or tree_branch_len < 1:
            raise ValueError(f"tree_branch_len must be an integer >= 1, got {tree_branch_len!r}")
        self.tree_width, self.tree_copy = tree_width, bool(tree_copy)
        self.tree_branch_len = tree_branch_len
        self.context_ngram = check_context_ngram(context_ngram)
        self.head = head.eval()
        self.vocab_ids = None if vocab_ids is None else torch.as_tensor(vocab_ids, dtype=torch.long)
        self.name = name
        self.target, self._fused = None, None
        self.reset([])

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
        self._lm_head_t = restricted_lm_head(target, self.vocab_ids)
        self.head.to(device=self._lm_head_t.device, dtype=self._lm_head_t.dtype)
        self._fused = self._fused_step(target)

    def _fused_step(self, target) -> FusedHeadStep | None:
        """The :class:`FusedHeadStep` for this head and target, if it can run and was measured faster here than
        the modules (once per machine and head shape; one per head and target, shared by drafters of one head)."""
        from .. import kernels
        from ..models import kernel_pass

        lm_weight = target.model.get_output_embeddings().weight
        if FusedHeadStep.unavailable(self.head, lm_weight) is not None:
            return None
        vocab = None if self.vocab_ids is None else tuple(self.vocab_ids.tolist())
        steps = _FUSED_STEPS.setdefault(self.head, {})
        made = steps.get((id(lm_weight), vocab))
        if made is None or made[0]() is not lm_weight:
            fused, target_pass = FusedHeadStep(self.head, lm_weight, self.vocab_ids), kernel_pass(target.model)
            h, e, V = torch.zeros(1, lm_weight.shape[1]), self.embed(torch.tensor([1])).detach(), target.vocab_size
            runs = {"modules": lambda: self.logits(self.step(h, [1], None)),  # a drafting step each way
                    "fused": lambda: full_vocab_logits(fused(h, e)[1], self.vocab_ids, V)}
            key = f"mtp-step|{kernels.model_key(target.model)}|{self.head.config}|{len(vocab or ())}"
            faster = kernels.timed_choice(key, runs, sweep=lambda: target_pass(1)) == "fused"
            made = steps[id(lm_weight), vocab] = (weakref.ref(lm_weight), fused if faster else None)
        return made[1]

    def logits(self, s: torch.Tensor) -> torch.Tensor:
        """Draft logits over the full vocabulary (``-inf`` outside the draft vocabulary)."""
        return full_vocab_logits(s @ self._lm_head_t, self.vocab_ids, self.target.vocab_size)

    # --- the context the attention block reads: the target's hidden states of every final position ------------
    def reset(self, prompt_ids, target_hidden=None) -> None:
        self._rows, self._K, self._V = [], None, None

    def observe(self, target_hidden, target_cache) -> None:
        if self.head.attn is not None and target_hidden is not None:
            self._rows.extend(target_hidden)

    def rollback(self, num_valid: int) -> None:
        del self._rows[max(0, num_valid - 1):]  # rows exist for positions 0 .. num_valid - 2 at most
        if self._K is not None and self._K.shape[-2] > len(self._rows):
            self._K, self._V = self._K[..., : len(self._rows), :], self._V[..., : len(self._rows), :]

    def context(self, ids):
        """Keys, values and the token ids of the memory (positions ``0 .. len(ids) - 2``), or ``None``."""
        if self.head.attn is None or len(ids) < 2:
            return None
        m = len(ids) - 1
        if len(self._rows) != m:
            raise ValueError(f"this MTP drafter reads the context: it needs the target's hidden states of all "
                             f"{m} earlier positions (the decoder hands them over via observe), it has {len(self._rows)}")
        done = 0 if self._K is None else self._K.shape[-2]
        if done < m:  # keys and values of the rows added since the last draft
            device = self._rows[0].device
            tok = torch.tensor(ids[done:m + 1], device=device)
            K, V = self.head.attn.memory(torch.stack(self._rows[done:m]), self.embed(tok[:-1]), self.embed(tok[1:]))
            self._K = K if self._K is None else torch.cat([self._K, K], dim=-2)
            self._V = V if self._V is None else torch.cat([self._V, V], dim=-2)
        return self._K, self._V, torch.tensor(ids[:m], device=self._K.device)

    def step(self, h, tokens: list, context) -> torch.Tensor:
        """One drafting step for B drafts at once: the head's next states from states ``h`` ``[B, H]`` and the
        embeddings of ``tokens`` (B token ids)."""
        tokens = torch.tensor(tokens, device=h.device)
        ctx = None
        if context is not None:
            K, V, memory_ids = context
            m = memory_ids.shape[0]
            match = (memory_ids[None] == tokens[:, None]).to(h.dtype)  # [B, m]: an induction / n-gram match
            distance = torch.arange(m - 1, -1, -1, device=h.device, dtype=h.dtype)[None]  # seed position m-1 minus j
            ctx = (K, V, match, distance, torch.ones(1, m, dtype=torch.bool, device=h.device))
        return self.head(h, self.embed(tokens), ctx)

    def advance(self, h, tokens: list, context):
        """:meth:`step` and :meth:`logits` together: through the :class:`FusedHeadStep` where bind chose it (and
        the weights are still those it copied, and no gradient is wanted), else through the modules."""
        fused = self._fused
        if fused is not None and context is None and not torch.is_grad_enabled() and fused.fresh():
            s, small = fused(h, self.embed(torch.tensor(tokens)))
            return s, full_vocab_logits(small, self.vocab_ids, self.target.vocab_size)
        s = self.step(h, tokens, context)
        return s, self.logits(s)

    def propose(self, ids, k, cfg, generator, target_hidden=None) -> Draft:
        if target_hidden is None:
            raise ValueError("MTPDrafter needs the target's last hidden state (the decoder passes it)")
        context = self.context(ids)
        tree = cfg.greedy and (self.tree_width > 1 or self.tree_copy)
        seqs, states, qs, ended = [list(ids)], target_hidden[None], [], []  # seqs[0]: ids + the main draft
        for i in range(k):
            states, logits = self.advance(states, [seq[-1] for seq in seqs], context)  # all live drafts at once
            for b, seq in enumerate(seqs):
                token, q = copy_or_choose(seq, logits[b], probs(logits[b], cfg), self.context_ngram, cfg, generator)
                seq.append(token)
                if b == 0:
                    qs.append(q)
            if tree and i == 0 and self.tree_width > 1:  # the head's other top first tokens start branches
                for t in logits[0].topk(self.tree_width).indices.tolist():  # from the same state
                    if t != seqs[0][-1]:
                        seqs.append(list(ids) + [t])
                        states = torch.cat([states, states[:1]])
            live = [b == 0 or len(seq) - len(ids) < min(k, self.tree_branch_len) for b, seq in enumerate(seqs)]
            ended += [seq for seq, keep in zip(seqs, live) if not keep]
            seqs, states = [seq for seq, keep in zip(seqs, live) if keep], states[torch.tensor(live)]
        draft = Draft(seqs[0][len(ids):], torch.stack(qs) if qs else None, start_position=len(ids) - 2)
        if tree and k > 0:
            draft.branches = [seq[len(ids):] for seq in ended + seqs[1:]]
            copied = lookup(ids, k, 3, 1) if self.tree_copy else []
            if copied:  # what followed the latest earlier occurrence of the last token
                draft.branches.append(copied)
        return draft

    # --- saving and loading ---------------------------------------------------------------------------------
    def save(self, path, dtype: torch.dtype | None = None, **meta) -> Path:
        """Write ``mtp_head.safetensors`` + ``mtp_config.json`` into the folder ``path`` (weights in ``dtype`` if
        given, e.g. ``torch.float16`` to halve the file; loading casts them to the target's dtype)."""
        return save_folder(path, self.head, self.vocab_ids, self.name, dtype, **{"context_ngram": self.context_ngram,
                                                                                **meta})

    @classmethod
    def load(cls, path) -> "MTPDrafter":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_NAME).exists() or not (path / WEIGHTS_NAME).exists():
            raise ValueError(f"{path} is not an MTP drafter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        config = json.loads((path / CONFIG_NAME).read_text())
        tensors = load_file(path / WEIGHTS_NAME)
        if config.get("kind") == "eagle3":  # the context-reading EAGLE-3 head keeps the same folder layout
            from .eagle import Eagle3Drafter

            return Eagle3Drafter.from_folder(path, config, tensors)
        vocab_ids = tensors.pop("vocab_ids", None)
        key = (str(path.resolve()), (path / WEIGHTS_NAME).stat().st_mtime_ns)
        head = _LOADED_HEADS.get(key)
        if head is None:
            head = MTPHead(config["hidden_size"], config["num_layers"], config["intermediate_size"],
                           config.get("context_attention", False))
            try:
                head.load_state_dict(tensors)
            except RuntimeError as e:
                raise ValueError(f"the weights in {path} do not fit the head its config describes: {e}") from None
            _LOADED_HEADS[key] = head
        drafter = cls(head, vocab_ids, name=config.get("name", "mtp"), context_ngram=config.get("context_ngram"))
        drafter.meta = config
        return drafter


# Drafters loaded from the same saved folder share one head (read-only weights): "mtp", "mtp-tree" and "mtp-head"
# side by side (the bench, notebook 04) hold it once. Kept while any drafter uses it; a re-saved folder loads anew.
_LOADED_HEADS = weakref.WeakValueDictionary()

# target name -> {kind: folder in mtplab/data}: "mtp", the default; "eagle3", the context-reading EAGLE-3 drafter,
# trained on the CPU a session at a time (each run goes on from the shipped weights: README, model cards)
SHIPPED = {"SmolLM2-135M-Instruct": {"mtp": "mtp-smollm2-135m", "eagle3": "eagle3-smollm2-135m"}}
# "mtp-tree": the shipped drafter, verified as a token tree when greedy (settings chosen on the dev prompts)
TREE = dict(tree_width=2, tree_branch_len=2, tree_copy=True)


def shipped_path(target_name: str = "SmolLM2-135M-Instruct", kind: str = "mtp") -> Path:
    """The folder of the drafter of ``kind`` (``"mtp"`` or ``"eagle3"``) shipped in the package for ``target_name``."""
    from importlib import resources

    if target_name not in SHIPPED:
        raise ValueError(f"mtplab ships an MTP drafter only for {sorted(SHIPPED)}, not for {target_name!r}: train "
                         "one with `mtplab train-drafter` or mtplab.train.train_on_sequences")
    return Path(str(resources.files("mtplab").joinpath("data", SHIPPED[target_name][kind])))


def load_drafter(name_or_path="mtp", target=None, context_ngram="saved", tree: dict | None = None) -> MTPDrafter:
    """An MTP drafter: ``"mtp"`` is the one shipped for the bundled target (or for ``target``, if mtplab ships one
    for it); ``"mtp-tree"`` is the same drafter offering a token tree in greedy decoding (besides its draft, the
    head's second-best first token continued one more step, and a copy of what followed the last token before);
    ``"eagle3"`` is the shipped EAGLE-3 drafter (an :class:`~mtplab.drafters.eagle.Eagle3Drafter`); any other value
    is a folder written by :meth:`MTPDrafter.save` / :func:`mtplab.train.train_on_sequences`.

    ``context_ngram``: ``"saved"`` keeps the saved setting (the shipped drafter copies a token from the context when
    the last 3 tokens occurred there before; a trained one saved by the trainer drafts with its head alone);
    ``None`` drafts with the head alone; 1-3 sets the n-gram size (an EAGLE-3 drafter's folder too).
    ``tree``: ``dict(tree_width=..., tree_branch_len=..., tree_copy=...)`` for tree drafting (see :class:`MTPDrafter`).
    """
    if name_or_path in ("mtp", "mtp-tree", "eagle3"):
        if name_or_path == "mtp-tree":
            tree = TREE if tree is None else tree
        path = shipped_path("SmolLM2-135M-Instruct" if target is None else target.name,
                            "eagle3" if name_or_path == "eagle3" else "mtp")
    else:
        path = Path(name_or_path)
    drafter = MTPDrafter.load(path)
    if not isinstance(drafter, MTPDrafter):  # an EAGLE-3 head: it drafts a chain (the n-gram copy applies)
        if tree:
            raise ValueError(f"{path} holds an EAGLE-3 drafter, which drafts a chain: tree does not apply "
                             f"(got {tree!r})")
        if context_ngram != "saved":
            meta = drafter.meta
            drafter = type(drafter)(drafter.head, drafter.vocab_ids, drafter.name, check_context_ngram(context_ngram))
            drafter.meta = meta
    elif context_ngram != "saved" or tree:
        name = drafter.name
        if context_ngram is None and name == "mtp":
            name = "mtp-head"
        elif tree and name == "mtp":
            name = "mtp-tree"
        ngram = drafter.context_ngram if context_ngram == "saved" else context_ngram
        meta, drafter = drafter.meta, MTPDrafter(drafter.head, drafter.vocab_ids, name, ngram, **(tree or {}))
        drafter.meta = meta
    if target is not None:
        drafter.bind(target)
    return drafter
