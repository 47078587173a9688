"""Making an MTP drafter for a target by self-distillation: one trainer, :func:`train_on_sequences`.

The data is token sequences, ``(ids, answer_start)`` pairs: the target's own answers to many prompts
(:func:`mtplab.datagen.build_answer_corpus`, the shipped drafter's recipe) or any text, such as the standard
library's documentation in the target's chat format (:func:`docs_sequences`, ``answer_start`` 0 so that the whole
text is learned). Per batch the target reads the sequences teacher-forced; its last hidden states seed the head,
and the head learns to reproduce the target's next-token distribution (on the draft vocabulary) 1 to ``unroll``
steps ahead, feeding its own output state back exactly as it will when drafting.

Validation measures greedy acceptance per draft position on held-out sequences, under two names:
:func:`conditional_acceptance` (position i accepted given positions before it were) and :func:`vllm_acceptance`
(position i accepted / drafts that proposed position i, as vLLM counts it). ``out_dir/checkpoint.pt`` records what
the run was trained on and with, so a re-run resumes it and a run with other data or settings is refused.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from array import array
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from .drafters.eagle import Eagle3Drafter, Eagle3Head
from .drafters.mtp import CONFIG_NAME, MTPDrafter, MTPHead, restricted_lm_head
from .models import chat_ids, last_hidden
from .trace import mean_acceptance_length, per_position_acceptance


STDLIB_MODULES = (
    "abc argparse array asyncio base64 bisect calendar collections contextlib copy csv dataclasses datetime decimal "
    "difflib enum fractions functools glob gzip hashlib heapq html http.client inspect io ipaddress itertools json "
    "logging math operator os pathlib pickle pprint queue random re sched secrets shlex shutil socket sqlite3 "
    "statistics string struct subprocess tempfile textwrap threading time timeit tokenize typing unittest "
    "urllib.parse uuid warnings weakref zipfile zlib"
).split()


def stdlib_module_names() -> list:
    """Every importable, side-effect-free public module of this Python's standard library."""
    import sys

    skip = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "pydoc_data",
            "ensurepip", "venv", "webbrowser", "msilib", "winreg", "winsound", "msvcrt", "nt", "crypt", "nis", "spwd",
            "ossaudiodev", "curses", "readline"}
    names = getattr(sys, "stdlib_module_names", STDLIB_MODULES)
    return [m for m in sorted(names) if not m.startswith("_") and m not in skip]


def stdlib_texts(modules=None) -> list:
    """Docstrings of the Python standard library (PSF licence: redistributable), one text per module, as
    training text that anyone can regenerate from their own Python."""
    import importlib
    import inspect

    texts = []
    for name in modules or stdlib_module_names():
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        parts = [inspect.getdoc(mod) or ""]
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                parts.append(f"{attr}\n{doc}")
        text = "\n\n".join(p for p in parts if p)
        if len(text) > 500:
            texts.append(text)
    return texts


def chat_sequences(target, texts, max_prompt_tokens: int = 200) -> list:
    """Wrap text in the target's chat template as grounded requests ("Summarize / explain this: ...") so the
    drafter sees the chat format it will draft in; the assistant side is the text itself (teacher forcing)."""
    tok = target.tokenizer
    asks = ("Explain this documentation:", "Summarize the following text:", "Rewrite this more simply:")
    out = []
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        prompt = tok.decode(ids[:max_prompt_tokens])
        out.append(chat_ids(tok, f"{asks[i % len(asks)]}\n\n{prompt}", answer=tok.decode(ids)))
    return out


def docs_sequences(target, *, modules=None, max_tokens: int | None = None, per_text: int | None = None,
                   block_size: int = 128) -> list:
    """The standard library's documentation as training sequences: :func:`chat_sequences` of :func:`stdlib_texts`
    (``modules``: default all), each cut to its first ``per_text`` tokens and into blocks of ``block_size`` (a shorter
    tail is dropped), blocks taken in order until ``max_tokens``. Returns ``(block, 0)`` pairs: ``answer_start`` 0, so
    the loss covers the whole text, chat template and request included."""
    out, total = [], 0
    for ids in chat_sequences(target, stdlib_texts(modules)):
        ids = ids[:per_text]
        for i in range(0, len(ids) - block_size + 1, block_size):
            if max_tokens is not None and total >= max_tokens:
                return out
            out.append((ids[i:i + block_size], 0))
            total += block_size
    return out


# --- the trainer -----------------------------------------------------------------------------------------------

def draft_vocabulary(sequences, size: int | None) -> torch.Tensor | None:
    """The draft vocabulary: the ``size`` most frequent tokens the loss covers in ``sequences`` (``(ids, answer_start)``
    pairs: tokens from ``answer_start`` on), sorted; ``None`` for the whole vocabulary. For the target's greedy
    answers these are exactly the tokens it most often predicts."""
    if size is None:
        return None
    counts = torch.bincount(torch.tensor([t for ids, start in sequences for t in ids[start:]], dtype=torch.long))
    size = min(size, int((counts > 0).sum()))
    return torch.sort(torch.topk(counts, size).indices).values


def data_fingerprint(sequences) -> dict:
    """What identifies training data: the number of sequences, their tokens and answer tokens, and a SHA-256 of
    every ``(ids, answer_start)`` pair in order (the order decides the validation split)."""
    h, tokens, answer = hashlib.sha256(), 0, 0
    for ids, start in sequences:
        h.update(array("q", [len(ids), start, *ids]).tobytes())
        tokens += len(ids)
        answer += len(ids) - start
    return dict(sequences=len(sequences), tokens=tokens, answer_tokens=answer, sha256=h.hexdigest())


def conditional_acceptance(matches: torch.Tensor) -> list:
    """Greedy acceptance per draft position, *conditional*: P(position i accepted | positions < i accepted) =
    drafts accepted through position i / drafts accepted through position i-1. ``matches``: ``[positions, drafts]``
    (or more trailing dims), whether each drafted token equals the target's greedy token there."""
    chain = matches.cumprod(0).float().flatten(1).mean(1)  # P(first i+1 positions all accepted)
    prev = torch.cat([torch.ones(1), chain[:-1]])
    return (chain / prev.clamp_min(1e-8)).tolist()


def vllm_acceptance(matches: torch.Tensor) -> list:
    """Greedy acceptance per draft position as vLLM counts it: drafts with position i accepted / drafts that
    proposed position i. Every draft here proposes every position, and position i is accepted only if all earlier
    ones were, so this is P(first i+1 positions all accepted): it never rises with i (the conditional rate may)."""
    return matches.cumprod(0).float().flatten(1).mean(1).tolist()


class _SimulatedRound(NamedTuple):
    num_drafted: int
    num_accepted: int

    @property
    def emitted_ids(self) -> range:  # its count is what trace's metrics read: the accepted drafts and one more
        return range(self.num_accepted + 1)


def decoded_acceptance(matches: torch.Tensor, answer: torch.Tensor, gamma: int) -> list:
    """The rounds greedy speculative decoding at a constant ``gamma`` would run over each sequence's answer, found
    from the training-time matches: ``matches`` ``[steps, B, n]``, whether draft step j+1 from seed position t (the
    target's features at t, the true token t+1) drafts the target's greedy token t+j+2; ``answer`` ``[B, width]``
    marks each sequence's answer, the text decoded (the target's greedy text for greedy data).

    As in the decoder, the first round drafts from the answer's first token on (seed: two before it, the prompt's
    last token pending), a round accepts its leading matches and adds the target's own token, drafts shrink to fit
    the answer, and the next round starts after the tokens added. The last ``steps`` positions have no seeds: rounds
    stop there. Returns ``(num_drafted, num_accepted)`` rounds for :func:`~mtplab.trace.per_position_acceptance`.

    Unlike :func:`vllm_acceptance` over every position, rounds start after a rejection more often than not, at
    harder positions. The CPU-trained EAGLE-3 head (README) on 24 validation answers cut at 64 tokens: these rounds
    0.45 / 0.23 / 0.13 (mean acceptance length 1.80), every position 0.52 / 0.28 / 0.17 (1.97), the real decoder
    on those prompts 0.48 / 0.25 / 0.13 (1.86; its text is the float32 target's, the data's the bfloat16 one's);
    whole answers: 2.01 against 2.24 over every position."""
    steps, _, n = matches.shape
    if not 1 <= gamma <= steps:
        raise ValueError(f"gamma must be in [1, {steps}] (the draft steps trained), got {gamma!r}")
    rounds = []
    for row, marks in zip(matches.permute(1, 2, 0).tolist(), answer.tolist()):
        if True not in marks:
            continue
        start = marks.index(True)
        budget, t = sum(marks), start - 2
        while budget > 0 and 0 <= t < n:
            k = min(gamma, budget - 1)
            accepted = next((j for j, hit in enumerate(row[t][:k]) if not hit), k)
            rounds.append(_SimulatedRound(k, accepted))
            budget, t = budget - accepted - 1, t + accepted + 1
    return rounds


def _pad_batch(batch, pad: int, device):
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    answer = torch.zeros((len(batch), width), dtype=torch.bool)  # position t holds a token to learn
    for i, (seq, start) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        answer[i, start: len(seq)] = True
    return ids.to(device), mask.to(device), answer.to(device)


TEACHER_TOKENS = 512  # rows of the target's logits over its whole vocabulary taken at a time (for their argmax)


@torch.no_grad()
def _teacher(model, ids, mask, hidden=True):
    """What the heads learn from, per position: the target's hidden states (``hidden``: ``True`` for the last ones,
    or layer ids, as the head reads them), its final hidden state (the LM head's input: the teacher's logits on the
    draft vocabulary are ``final @ lm_head_t``, see :func:`_teacher_rows`) and its greedy next token (argmax over the
    whole vocabulary, :data:`TEACHER_TOKENS` rows of logits at a time: all of them at once would be the peak of a
    training step's memory)."""
    with last_hidden(model, hidden) as got, last_hidden(model, True) as last:
        o = model.get_decoder()(input_ids=ids, attention_mask=mask, **{**got.kwargs, **last.kwargs})
    final = last.hidden(o)
    rows, lm_head = final.flatten(0, -2), model.get_output_embeddings()
    top = torch.cat([lm_head(rows[i:i + TEACHER_TOKENS]).argmax(-1) for i in range(0, len(rows), TEACHER_TOKENS)])
    return got.hidden(o).float(), final.float(), top.view(final.shape[:-1])


def _teacher_rows(final, lm_head_t, answer):
    """What the draft loss needs of the target's next-token distribution on the draft vocabulary (``p``: its
    softmax restricted and renormalised, ``softmax(final @ lm_head_t)``): the LM-head row it expects, ``p @ lm_head_tᵀ``
    (the cross-entropy ``-p · log softmax(s @ lm_head_t)`` is ``logsumexp(s @ lm_head_t) - s · (p @ lm_head_tᵀ)``
    since ``p`` sums to 1; its gradient ``(softmax(s @ lm_head_t) - p) @ lm_head_tᵀ`` is ``softmax(...) @
    lm_head_tᵀ - p @ lm_head_tᵀ``), only at the positions whose next token is one to learn (``answer[:, 1:]``):
    ``(pw [N, H], rows [B, L])``, ``rows`` naming each position's row of ``pw`` (-1: not computed)."""
    needed = torch.nn.functional.pad(answer[:, 1:], (0, 1))
    rows = torch.full(needed.shape, -1, dtype=torch.long, device=final.device)
    rows[needed] = torch.arange(int(needed.sum()), device=final.device)
    pw = [final.new_zeros(0, lm_head_t.shape[0], dtype=torch.float32)]
    for piece in final[needed].split(max(1, CE_PIECE // lm_head_t.shape[1])):
        p = torch.softmax((piece @ lm_head_t).float(), dim=-1)
        with torch.autocast(final.device.type, enabled=False):  # float32: the gradient is a difference against it
            pw.append(p @ lm_head_t.T)
    return torch.cat(pw), rows


class TeacherStore:
    """The target's outputs for every sequence (:func:`_teacher`: the hidden states the heads read, the final hidden
    state, the greedy next token), computed once and kept in ``folder`` as memory-mapped ``.npy`` arrays, the hidden
    states in bfloat16 (4.6 KB a token for an EAGLE-3 head of the bundled target). Every batch after that reads them
    instead of running the target: EAGLE-3's "offline" training data, for epochs over answers that took hours to
    generate on a CPU.

    :meth:`fill` writes the sequences in pieces (shortest first, so a piece pads little) and records each piece once it
    is on disk, so an interrupted fill resumes; a folder that holds the outputs for other data, another target or
    other layers, or filled at another precision (``dtype``: the arithmetic of the model that fills it, the target or
    its bfloat16 copy) is refused before anything is read. ``store[i]``: sequence ``i``'s ``[hidden, final, top]``.
    ``index.npy`` names each sequence's rows (a hash of its tokens, first row, end), so that the store of a grown
    corpus copies what an earlier store holds instead of running the target again (:meth:`fill`'s ``reuse``)."""

    def __init__(self, folder, target, sequences, hidden=True, dtype=torch.float32):
        import numpy as np

        self.folder, self.sequences = Path(folder), sequences
        self.meta = dict(model=target.name, hidden=hidden if hidden is True else list(hidden),
                         data=data_fingerprint(sequences), dtype=str(dtype).removeprefix("torch."))
        self.hidden_request = hidden
        self.offsets = np.cumsum([0] + [len(ids) for ids, _ in sequences]).tolist()
        self.keys = [_sequence_key(ids) for ids, _ in sequences]
        meta_path = self.folder / "teacher.json"
        if meta_path.exists():
            saved = json.loads(meta_path.read_text())
            diff = [k for k in self.meta if saved.get(k) != self.meta[k]]
            if diff:
                raise ValueError(f"{self.folder} holds the target's outputs for another run ("
                                 + "; ".join(f"{_describe(k, saved.get(k))}, not {_describe(k, self.meta[k])}"
                                             for k in diff)
                                 + f"): use another folder or delete {self.folder}")
            self.done = saved["done"]
            if not (self.folder / "index.npy").exists():  # a store from before the index: these are its sequences
                self._write_index()
        else:
            self.done = None  # nothing written yet
        self.arrays = None

    def _write_index(self):
        import numpy as np

        np.save(self.folder / "index.npy", np.array([self.keys, self.offsets[:-1], self.offsets[1:]], dtype=np.int64).T)

    def _open(self, widths):
        import numpy as np

        rows, new = self.offsets[-1], self.done is None
        mode = "w+" if new else "r+"
        shapes = dict(hidden=((rows, widths[0]), np.uint16), final=((rows, widths[1]), np.uint16),
                      top=((rows,), np.int32))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.arrays = {k: np.lib.format.open_memmap(self.folder / f"{k}.npy", mode=mode, dtype=dt, shape=shape)
                       for k, (shape, dt) in shapes.items()}
        if new:
            self.done = 0
            self._write_index()
            self._record(widths)

    def _record(self, widths):
        path = self.folder / "teacher.json"
        path.with_suffix(".tmp").write_text(json.dumps(dict(self.meta, done=self.done, widths=list(widths))))
        path.with_suffix(".tmp").replace(path)  # atomic: a cut-off run never leaves half a record

    @property
    def complete(self) -> bool:
        return self.done == len(self.sequences)

    def fill(self, model, *, piece_tokens: int = 4096, pad: int = 0, reuse=(), progress: bool = True, log=print):
        """Run ``model`` (the target, or its bfloat16 copy) over the sequences not yet stored, ``piece_tokens``
        padded tokens at a time, flushing and recording each piece. ``reuse``: folders of other stores (e.g. of the
        corpus before it grew); a sequence one of them holds complete, for the same target, layers and precision, is
        copied from it instead (stores of another target, layers or precision, unfinished or without an index are
        passed over)."""
        from tqdm.auto import tqdm

        if str(model.dtype).removeprefix("torch.") != self.meta["dtype"]:
            raise ValueError(f"the store {self.folder} is for a teacher in {self.meta['dtype']}, not {model.dtype}")
        order = sorted(range(len(self.sequences)), key=lambda i: len(self.sequences[i][0]))
        start = self.done or 0
        if self.done is not None and self.arrays is None:
            self._open(json.loads((self.folder / "teacher.json").read_text())["widths"])
        if self.complete:
            return self
        if start:
            log(f"teacher store {self.folder}: resuming at sequence {start} of {len(order)}")
        found, widths = self._reusable(reuse, {self.keys[k] for k in order[start:]}, log)
        bar = tqdm(total=self.offsets[-1], initial=sum(len(self.sequences[i][0]) for i in order[:start]),
                   desc="target outputs to disk", unit="tok", unit_scale=True, disable=not progress)
        t0, written, copied, said = time.perf_counter(), 0, 0, time.perf_counter()
        i = start
        while i < len(order):
            j, copy_ = i + 1, self.keys[order[i]] in found
            if copy_:  # a run of sequences another store holds: copied, a few hundred a record
                while j < len(order) and self.keys[order[j]] in found and j - i < 256:
                    j += 1
            else:
                while j < len(order) and self.keys[order[j]] not in found and \
                        (j - i + 1) * len(self.sequences[order[j]][0]) <= piece_tokens:
                    j += 1
            idx = order[i:j]
            if copy_:
                if self.arrays is None:
                    self._open(widths)
                for k in idx:
                    arrays, a0 = found[self.keys[k]]
                    a, b = self.offsets[k], self.offsets[k + 1]
                    for name, array_ in self.arrays.items():
                        array_[a:b] = arrays[name][a0:a0 + b - a]
                    copied += b - a
                    bar.update(b - a)
            else:
                ids, mask, _ = _pad_batch([self.sequences[k] for k in idx], pad, model.device)
                hidden, final, top = _teacher(model, ids, mask, self.hidden_request)
                widths = (hidden.shape[-1], final.shape[-1])
                if self.arrays is None:
                    self._open(widths)
                for row, k in enumerate(idx):
                    a, b = self.offsets[k], self.offsets[k + 1]
                    self.arrays["hidden"][a:b] = _bf16_bits(hidden[row, : b - a])
                    self.arrays["final"][a:b] = _bf16_bits(final[row, : b - a])
                    self.arrays["top"][a:b] = top[row, : b - a].cpu().numpy()
                    written += b - a
                    bar.update(b - a)
            for array_ in self.arrays.values():
                array_.flush()
            self.done = i = j
            self._record([array_.shape[1] for array_ in (self.arrays["hidden"], self.arrays["final"])])
            if time.perf_counter() - said > 300:  # a line every 5 minutes for logs without the bar
                said = time.perf_counter()
                log(f"teacher store: {self.done} of {len(order)} sequences, {written / (said - t0):.0f} tokens/s")
        bar.close()
        log(f"teacher store {self.folder}: {written} tokens in {time.perf_counter() - t0:.0f} s"
            + (f", {copied} copied from {', '.join(str(f) for f in reuse)}" if copied else ""))
        return self

    def _reusable(self, folders, wanted: set, log) -> tuple:
        """``{key: (arrays, first row)}`` of the ``wanted`` sequences that the complete stores in ``folders`` hold
        for this target, these layers and this precision (memory-mapped, read-only), and their ``(hidden, final)``
        widths."""
        import numpy as np

        found, widths = {}, None
        for folder in map(Path, folders):
            if folder.resolve() == self.folder.resolve():
                log(f"teacher store {folder}: this store, not reused")
                continue
            try:
                saved = json.loads((folder / "teacher.json").read_text())
                index = np.load(folder / "index.npy")
            except FileNotFoundError:
                log(f"teacher store {folder}: no index (or no store), not reused")
                continue
            why = ("another target or layers" if any(saved.get(k) != self.meta[k] for k in ("model", "hidden")) else
                   f"filled in {saved.get('dtype', 'an unrecorded precision')}, not {self.meta['dtype']}"
                   if saved.get("dtype") != self.meta["dtype"] else
                   "unfinished" if saved["done"] != saved["data"]["sequences"] else None)
            if why:
                log(f"teacher store {folder}: {why}, not reused")
                continue
            arrays = {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in ("hidden", "final", "top")}
            for key, a, _ in index.tolist():
                if key in wanted and key not in found:
                    found[key] = (arrays, a)
            widths = saved["widths"]
        return found, widths

    def __contains__(self, i) -> bool:
        return self.complete

    def __getitem__(self, i) -> list:
        import numpy as np

        a, b = self.offsets[i], self.offsets[i + 1]
        read = lambda k: torch.from_numpy(np.array(self.arrays[k][a:b]))  # noqa: E731
        return [read("hidden").view(torch.bfloat16).float(), read("final").view(torch.bfloat16).float(),
                read("top").long()]


def _sequence_key(ids) -> int:
    """A 64-bit hash of a sequence's tokens: what finds it in another :class:`TeacherStore`."""
    return int.from_bytes(hashlib.blake2b(array("q", ids).tobytes(), digest_size=8).digest(), "little", signed=True)


def _bf16_bits(x):
    """A float tensor as the uint16 bit patterns of its bfloat16 rounding (numpy has no bfloat16)."""
    return x.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().view("uint16")


PRECISIONS = ("auto", "float32", "bfloat16")
_BF16_PAYS: dict = {}  # (device type, width) -> measured: are bfloat16 products clearly faster here?


def bf16_pays(device, width: int) -> bool:
    """Whether bfloat16 matrix products of a ``width``-wide model are clearly (1.5x) faster than float32 on this
    machine: measured once per process, on the CPU only. CPUs with bfloat16 units (AMX, AVX-512 BF16) run them
    2-5x faster; on CPUs without them bfloat16 is slower. GPUs keep float32 (with TF32 where the caller enables it)."""
    device = torch.device(device)
    if device.type != "cpu":
        return False
    key = (device.type, width)
    if key not in _BF16_PAYS:
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(512, width, generator=gen), torch.randn(4 * width, width, generator=gen)
        seconds = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = x.to(dtype), w.to(dtype)
            torch.nn.functional.linear(a, b)  # warm-up
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                torch.nn.functional.linear(a, b)
                runs.append(time.perf_counter() - t0)
            seconds[dtype] = min(runs)
        _BF16_PAYS[key] = seconds[torch.bfloat16] * 1.5 < seconds[torch.float32]
    return _BF16_PAYS[key]


def _draft_head(target, vocab_ids):
    """The target's LM head restricted to the draft vocabulary, transposed (``[hidden, V']``: draft logits = s @ it),
    and the map from token id to draft-vocabulary index (-1 outside it)."""
    lm_head_t = restricted_lm_head(target, vocab_ids).float()  # the drafters' own copy (float for training)
    device = lm_head_t.device
    vocab_map = torch.full((target.vocab_size,), -1, dtype=torch.long, device=device)
    vocab_map[torch.arange(target.vocab_size, device=device) if vocab_ids is None else vocab_ids] = \
        torch.arange(lm_head_t.shape[1], device=device)
    return lm_head_t, vocab_map


def _draft_states(head, embed, hidden, ids, unroll, seeds=None):
    """The head's output state (what the LM head reads) at draft steps 1..``unroll`` from every seed position
    ``t < n = length - unroll``: step j reads the true token t+j (as drafting does once the earlier drafts were
    accepted) and the state fed back from step j-1. An MTP head starts from the target's last hidden state at t; an
    EAGLE-3 head from its fused features, attending to every earlier position (training-time test).

    ``seeds`` ``[B, W]``: only from these positions (:func:`_seeds`), ``[B, W, H]`` a step instead of ``[B, n, H]``."""
    n = ids.shape[1] - unroll
    if isinstance(head, Eagle3Head):
        return [head.norm(s) for s in head.unrolled(hidden[:, :n], [embed(ids[:, j:n + j]) for j in range(1, unroll + 1)],
                                                    unroll, seeds=seeds)]
    seeds = torch.arange(n, device=ids.device).expand(len(ids), n) if seeds is None else seeds
    rows = torch.arange(len(ids), device=ids.device)[:, None]
    s, states = hidden[rows, seeds], []
    if head.attn is not None:  # memory: every position j, value from the token after it; seed t sees j <= t
        L = ids.shape[1] - 1
        K, V = head.attn.memory(hidden[:, :L], embed(ids[:, :L]), embed(ids[:, 1:]))
        pos = torch.arange(L, device=ids.device)
        seen, distance = pos <= seeds[..., None], (seeds[..., None] - pos).clamp_min(0).to(hidden.dtype)
    for j in range(1, unroll + 1):
        context = None
        if head.attn is not None:
            match = (ids[rows, seeds + j][..., None] == ids[:, None, :L]).to(hidden.dtype)
            context = (K, V, match, distance, seen)
        s = head(s, embed(ids[rows, seeds + j]), context)
        states.append(s)
    return states


def _seeds(masks) -> tuple:
    """The seed positions some draft step learns from (``masks``: per step ``[B, n]``, whether the token it drafts
    is one to learn), ascending per row and padded to the row with most (``[B, W]``), and which are real (the
    padding is position 0 and learns nothing). Only these meet the head: stage-B prompts quote
    whole answers, so most positions of a batch are prompt."""
    wanted = torch.stack(masks).any(0)
    width = max(1, int(wanted.sum(1).max()))
    order = torch.sort((~wanted).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    real = wanted.gather(1, order)
    return order.masked_fill(~real, 0), real


class _DraftCrossEntropy(torch.autograd.Function):
    """Per row r of ``s`` ``[R, H]``: the soft cross-entropy of the draft logits ``z = s[r] @ w`` (``w`` ``[H, V]``:
    the target's frozen LM head on the draft vocabulary) against the teacher's distribution ``p``, from the row it
    expects ``pw[rows[r]]`` (``pw = p @ wᵀ``, :func:`_teacher_rows`): ``logsumexp(z) - s[r] · pw[rows[r]]``, and with
    ``greedy`` the draft ``argmax(z)`` (not differentiable; else ``None``). Only ``s`` gets a gradient:
    ``(softmax(s @ w) @ wᵀ - pw[rows]) * grad``.

    Computed a few rows at a time (:data:`CE_PIECE` logits), the backward pass recomputing each piece's logits, so
    that no ``[R, V]`` array is made or kept: autograd's chain (logits, log-softmax, product, sum and their
    gradients) made and kept several per draft step (150 MB each for 16 answers and the bundled target's 8192-token
    draft vocabulary). An EAGLE-3 training step of 16 answers ran 3.7 s this way against 4.5 s (bfloat16, on an
    Intel(R) Xeon(R) Processor with AMX, 2 cores); then only the rows to learn (:func:`_sequence_loss`), each piece
    reading its rows of ``p`` where they lay (gathering ``p[rows]`` whole took 0.12 s a draft step): 2.8 s against
    3.8 s (median of 12 steps, interleaved, same CPU). The teacher's ``p`` only where the next token is one to learn:
    136 against 202 ms a batch of stage-A answers (median of 12, interleaved, same CPU). Reading ``pw`` (``H``
    numbers a row) instead of ``p`` (``V``), with no argmax while training: 5.36 against 5.54 s a step of 16 stage-B
    answers, 4.42 against 4.70 of stage-A (medians of 5, interleaved, same CPU; gradients equal to 7e-4).
    The logits are in the autocast dtype where autocast is on (as ``s @ w`` would be), the softmax in float32."""

    @staticmethod
    def forward(ctx, s, w, pw, rows, greedy=True):
        kind = s.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else s.dtype
        w = w.to(dtype)
        lse = s.new_empty(s.shape[0], dtype=torch.float32)
        top = s.new_empty(s.shape[0], dtype=torch.long) if greedy else None
        for piece in _pieces(s.shape[0], w.shape[1]):
            z = (s[piece].to(dtype) @ w).float()
            lse[piece] = z[:, 0] - torch.log_softmax(z, dim=-1)[:, 0]
            if greedy:
                top[piece] = z.argmax(-1)
        ce = lse - (s.float() * pw[rows]).sum(-1)
        ctx.save_for_backward(s, w, pw, rows)
        if greedy:
            ctx.mark_non_differentiable(top)
        return ce, top

    @staticmethod
    def backward(ctx, grad, _):
        s, w, pw, rows = ctx.saved_tensors
        ds = torch.empty_like(s)
        for piece in _pieces(s.shape[0], w.shape[1]):
            q = torch.softmax((s[piece].to(w.dtype) @ w).float(), dim=-1).mul_(grad[piece, None])
            ds[piece] = ((q.to(w.dtype) @ w.T).float() - grad[piece, None] * pw[rows[piece]]).to(s.dtype)
        return ds, None, None, None, None


CE_PIECE = 1 << 20  # logits in a piece of _DraftCrossEntropy: 4 MB of float32, which the caches hold


def _pieces(num_rows: int, vocab: int) -> list:
    """Slices of ``num_rows`` rows with about :data:`CE_PIECE` logits each."""
    step = max(1, CE_PIECE // vocab)
    return [slice(a, a + step) for a in range(0, num_rows, step)]


def _sequence_loss(head, embed, lm_head_t, vocab_map, hidden, ids, answer, p, top, unroll, weights, greedy=True):
    """Unrolled soft cross-entropy where the predicted token is one to learn (``answer``): step j's state
    (:func:`_draft_states`) predicts token t+j+1 (:class:`_DraftCrossEntropy`). With ``greedy`` (validation) also
    whether each step's greedy draft is the target's greedy token (else ``None``), and which seeds' whole drafts lie
    in the tokens to learn. ``p``: what the loss reads of the teacher's distributions, and their rows
    (:func:`_teacher_rows`)."""
    pw, p_rows = p
    n = ids.shape[1] - unroll
    masks = [torch.nn.functional.pad(answer[:, j + 1: j + 1 + n], (0, max(0, n - answer.shape[1] + j + 1)))
             for j in range(1, unroll + 1)]  # step j from seed t drafts token t+j+1: one to learn?
    seeds, real = _seeds(masks)
    rows = torch.arange(len(ids), device=ids.device)[:, None]
    losses, matches = [], []
    for j, (s, m) in enumerate(zip(_draft_states(head, embed, hidden, ids, unroll, seeds), masks), start=1):
        # only the seeds' rows whose draft is a token to learn meet the LM head (the prompt's and the padding's
        # would cost as much and count for nothing); elsewhere the draft is -2 (no token)
        b, i = (real & m[rows, seeds]).nonzero(as_tuple=True)
        t = seeds[b, i]
        ce, picked = _DraftCrossEntropy.apply(s[b, i], lm_head_t, pw, p_rows[b, t + j], greedy)
        losses.append(ce.sum() / m.sum().clamp_min(1))
        if greedy:
            draft = torch.full_like(top[:, j:n + j], -2)
            draft[b, t] = picked
            matches.append(vocab_map[top[:, j:n + j]] == draft)
    loss = sum(w * l for w, l in zip(weights, losses)) / sum(weights)
    return loss, torch.stack(matches) if greedy else None, masks[0] & masks[-1]


def make_head(spec, target):
    """A fresh head from its spec: ``(num_layers, intermediate_size[, context_attention])`` for an :class:`MTPHead`;
    ``"eagle3"`` or ``dict(kind="eagle3", target_layers=..., intermediate_size=...)`` for an :class:`Eagle3Head`
    (default layers: low / middle / high, as EAGLE-3)."""
    if spec == "eagle3" or (isinstance(spec, dict) and spec.get("kind") == "eagle3"):
        options = {k: v for k, v in (spec.items() if isinstance(spec, dict) else ()) if k != "kind"}
        unknown = set(options) - {"target_layers", "intermediate_size"}
        if unknown:
            raise ValueError(f"an eagle3 head spec takes target_layers and intermediate_size, not {sorted(unknown)}")
        return Eagle3Head.for_target(target.model.config, **options)
    if isinstance(spec, (tuple, list)) and 1 <= len(spec) <= 3:
        return MTPHead(target.model.get_input_embeddings().weight.shape[1], *spec)
    raise ValueError(f"a head spec is (num_layers, intermediate_size[, context_attention]) for an MTP head or "
                     f"'eagle3' / dict(kind='eagle3', ...) for an EAGLE-3 head, got {spec!r}")


def parse_heads(text: str) -> list:
    """Head specs for :func:`make_head` from the command line: comma-separated ``LAYERS[xINTERMEDIATE][+ctx]`` (an MTP
    head; ``+ctx``: with context attention) or ``eagle3`` (an EAGLE-3 head), e.g. ``"2x1536,3x1280+ctx"``."""
    specs = []
    for part in text.split(","):
        part = part.strip()
        if part == "eagle3":
            specs.append("eagle3")
            continue
        body = part.removesuffix("+ctx")
        layers, x, inner = body.partition("x")
        if not layers.isdigit() or int(layers) < 1 or (x and not inner.isdigit()):
            raise ValueError(f"a head is LAYERS[xINTERMEDIATE][+ctx] (e.g. 2x1536) or eagle3, got {part!r}")
        specs.append((int(layers), int(inner) if inner else None, part.endswith("+ctx")))
    return specs


def _drafter(head, vocab_ids):
    return Eagle3Drafter(head, vocab_ids) if isinstance(head, Eagle3Head) else MTPDrafter(head, vocab_ids)


def _describe(key, value) -> str:
    if key == "target":
        return f"target {value['name']} (hidden size {value['hidden_size']}, vocabulary {value['vocab_size']})"
    if key == "heads":
        return "heads " + ",".join(
            f"eagle3(layers {h['target_layers']}, mlp {h['intermediate_size']})" if h.get("kind") == "eagle3"
            else f"{h['num_layers']}x{h['intermediate_size']}" + "+ctx" * h["context_attention"] for h in value)
    if key == "dtype":
        return f"teacher precision {value or 'unrecorded'}"
    if key == "val_data":
        return ("validation on held-out training sequences" if value is None else
                f"validation on {value['sequences']} given sequences (sha256 {value['sha256'][:12]})")
    if key == "data":
        return (f"data of {value['sequences']} sequences, {value['tokens']} tokens, {value['answer_tokens']} trained on "
                f"(sha256 {value['sha256'][:12]})")
    return f"{key} {value}"


def _check_same_run(ckpt: Path, saved: dict | None, run: dict) -> None:
    """Refuse a checkpoint of another run (other data, target, heads or settings) before loading any of it."""
    how = (f"To resume it, call again with the same data and settings; to train a new drafter, use another output "
           f"folder (--out) or delete {ckpt}.")
    if saved is None:
        raise ValueError(f"{ckpt} was written by an older mtplab trainer and does not record what it was trained on, "
                         f"so it cannot be resumed safely. Use another output folder (--out) or delete {ckpt}.")
    diff = [k for k in dict.fromkeys([*run, *saved]) if saved.get(k) != run.get(k)]
    if diff:
        raise ValueError(f"{ckpt} belongs to another run: it was trained with "
                         + "; ".join(f"{_describe(k, saved.get(k))}, not {_describe(k, run.get(k))}"
                                     for k in diff)
                         + f". {how}")


def train_on_sequences(target, sequences, out_dir, *, heads=((2, None),), draft_vocab_size: int | None = 8192,
                       unroll: int = 4, steps: int = 2000, batch_size: int = 16, lr: float = 2e-3,
                       val_size: int = 64, val_sequences: list | None = None, log_every: int = 100,
                       checkpoint_every: int = 200,
                       time_budget: float | None = None, restart: bool = False,
                       cache_teacher: bool | str | Path = False, reuse_teacher=(), init_from: str | Path | None = None,
                       precision: str = "float32", seed: int = 0, progress: bool = True, log=print) -> list:
    """Train one or more MTP heads on ``sequences`` (``(ids, answer_start)`` pairs: the loss covers the tokens from
    ``answer_start`` on), running the target over each batch for its hidden states and distributions.

    ``heads``: one spec per head (:func:`make_head`: ``(num_layers, intermediate_size[, context_attention])`` for an
    :class:`MTPHead`, ``"eagle3"`` for an :class:`~mtplab.drafters.eagle.Eagle3Head`); all see the same batches (one
    target pass), so they must read the same hidden states. ``draft_vocab_size``: the draft vocabulary (:func:`draft_vocabulary` of the
    training split; ``None``: the whole vocabulary). ``unroll``: steps ahead trained with the head's own fed-back
    state. ``val_size`` sequences (at most a tenth) are held out, chosen by ``seed``, unless ``val_sequences`` are
    given: sequences to validate on instead (e.g. the target's answers to the dev prompts,
    :func:`mtplab.datagen.dev_answers`), and every one of ``sequences`` is trained on. Held out at random, a
    validation answer can answer a training prompt too (the corpus answers each prompt greedily and sampled) or be
    quoted in one (stage B asks about stage A's answers), so its acceptance partly measures memorisation: on the CPU
    corpus it rose to 2.30 while the bench stayed near 1.6. Every ``log_every`` steps the validation sequences'
    loss, greedy acceptance per position over every position (:func:`conditional_acceptance`,
    :func:`vllm_acceptance`) and the rounds the decoder would run at γ = 3 (``"decoded"``: mean acceptance length and
    per position, :func:`decoded_acceptance`: what the bench measures, lower) go to the history and ``log``. Every
    ``checkpoint_every`` steps ``out_dir/checkpoint.pt`` is written and each head is saved to ``out_dir/head{i}``
    (safetensors + JSON; :func:`mtplab.load_drafter` reads it).

    A re-run in ``out_dir`` resumes the run where its checkpoint left it, with the same batches and schedule, so it
    ends where the run would have ended uninterrupted (unless ``time_budget`` refits the schedule); a checkpoint of
    other data, another target, other heads or another ``draft_vocab_size`` / ``unroll`` / ``seed`` / ``val_size`` /
    ``val_sequences`` is refused with a ``ValueError``. ``batch_size``, ``lr``, ``steps`` and ``time_budget`` may
    change on resume: a new ``steps`` makes the run end at that many steps in all; a new ``batch_size`` applies to
    the batches drawn after the resume (the up to :data:`GROUP` - 1 already drawn into the checkpoint keep the old
    size). Batches are drawn :data:`GROUP` at a time, of like length (:func:`_length_grouped`).
    ``time_budget`` (seconds): shorten the run to fit, measured over its first 20 steps (the schedule adapts).
    ``init_from``: another run's folder: a new run in ``out_dir`` starts from its checkpoint (the heads' weights and
    optimizer, its draft vocabulary and history) with a fresh schedule of ``steps``, on these ``sequences``: to go on
    training a drafter once its data has grown (the target and the heads must be the same; ignored once ``out_dir``
    has a checkpoint of its own, which resumes). Or a saved drafter's folder (a run's ``head0``, a shipped drafter):
    its head and draft vocabulary with a fresh optimizer, to go on training where the run that made it is gone.
    ``restart``: continue from the checkpoint's weights and optimizer with a fresh schedule (warm-up, cosine) of
    ``steps`` — a warm restart, as used for the shipped drafter; the history's step count goes on.
    ``cache_teacher``: ``True``: keep the target's outputs for each sequence in memory after its first batch instead
    of recomputing them (tokens x (hidden states read + hidden size) x 4 bytes), for small data; a folder: a
    :class:`TeacherStore` there, filled (or resumed) before the first step, so that no step runs the target (its
    hidden states rounded to bfloat16), for large data on a CPU. ``reuse_teacher``: folders of earlier stores (of the
    corpus before it grew) whose sequences the fill copies instead of running the target (:meth:`TeacherStore.fill`).
    ``precision``: ``"float32"`` (default), ``"bfloat16"`` (the teacher pass by a bfloat16 copy of the target, the
    heads' forward under ``torch.autocast``; the heads' weights, optimizer and saved drafters stay float32/float16
    and drafting is unchanged) or
    ``"auto"``: bfloat16 where :func:`bf16_pays` measures it clearly faster (on an AMX Xeon the teacher pass ran
    1.8x and the head step 1.6x faster), else float32. It may differ between a run and its resumption.
    Returns the drafters.
    """
    from tqdm.auto import tqdm

    n_train = len(sequences)
    if val_sequences is None and n_train < 2:
        raise ValueError(f"train_on_sequences needs at least 2 sequences (some are held out), got {n_train}")
    if val_sequences is not None and (not n_train or not val_sequences):
        raise ValueError(f"train_on_sequences needs sequences to train on and val_sequences to validate on, got "
                         f"{n_train} and {len(val_sequences)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    out_dir = Path(out_dir)
    model = target.model
    device = model.device
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_train, generator=gen).tolist()
    if val_sequences is None:
        val_size = max(1, min(val_size, n_train // 10))
        val, train = order[:val_size], order[val_size:]  # indices into ``sequences``
    else:  # validate on the given sequences, appended after the training ones
        sequences, val_size = list(sequences) + list(val_sequences), len(val_sequences)
        val, train = list(range(n_train, len(sequences))), order
    vocab_ids = draft_vocabulary([sequences[i] for i in train], draft_vocab_size)
    hidden_size = model.get_input_embeddings().weight.shape[1]
    torch.manual_seed(seed)
    nets = [make_head(spec, target).to(device) for spec in heads]
    reads = {tuple(h.target_layers) if isinstance(h, Eagle3Head) else "last" for h in nets}
    if len(reads) > 1:  # one target pass per batch serves every head: they must read the same hidden states
        raise ValueError(f"heads trained side by side must read the same target hidden states, got {heads!r}: train "
                         "MTP heads and EAGLE-3 heads (or EAGLE-3 heads over other layers) in separate runs")
    hidden_request = True if reads == {"last"} else list(next(iter(reads)))
    opts = [torch.optim.AdamW(h.parameters(), lr=lr, weight_decay=0.0) for h in nets]
    run = dict(target=dict(name=target.name, hidden_size=hidden_size, vocab_size=target.vocab_size),
               heads=[dict(h.config) for h in nets], draft_vocab_size=draft_vocab_size, unroll=unroll,
               data=data_fingerprint(sequences[:n_train]), seed=seed, val_size=val_size)
    if val_sequences is not None:  # (absent otherwise, so that earlier runs' checkpoints resume)
        run["val_data"] = data_fingerprint(sequences[n_train:])
    start, earlier, history, total, pending = 0, 0, [], steps, []
    lengths = [len(ids) for ids, _ in sequences]
    ckpt = out_dir / "checkpoint.pt"
    source = ckpt if ckpt.exists() or init_from is None else Path(init_from) / "checkpoint.pt"
    if source != ckpt and not source.exists() and (Path(init_from) / CONFIG_NAME).exists():
        vocab_ids, earlier, history = _start_from_drafter(Path(init_from), nets, run, log)
        source = ckpt  # (absent: a new run)
    if source != ckpt and not source.exists():
        raise ValueError(f"init_from must be the folder of an earlier training run (holding checkpoint.pt) or of a "
                         f"saved drafter (holding {CONFIG_NAME}), got {str(init_from)!r}")
    if source.exists():
        state = torch.load(source, weights_only=True, map_location=device)
        if source == ckpt:
            _check_same_run(ckpt, state.get("run"), run)
        else:  # another run's heads, on other data: the same target and heads, all else may differ
            saved = state.get("run") or dict(target=None, heads=None)
            diff = [k for k in ("target", "heads") if saved[k] != run[k]]
            if diff:
                raise ValueError(f"init_from: {source} trained " + "; ".join(
                    f"{_describe(k, saved[k]) if saved[k] else 'unrecorded ' + k}, not {_describe(k, run[k])}"
                    for k in diff) + ": start from a run of the same target and heads")
        for h, o, hs, os_ in zip(nets, opts, state["heads"], state["opts"]):
            h.load_state_dict(hs)
            o.load_state_dict(os_)
        vocab_ids = None if state["vocab_ids"] is None else state["vocab_ids"].cpu()
        start, earlier, history = state["step"], state["earlier_steps"], state["history"]
        if source == ckpt:
            gen.set_state(state["rng"].cpu())
            pending = state.get("pending", [])  # the batches already drawn for the next steps
        # same arguments: the same (possibly time-fitted) schedule; a new ``steps``: run to that many steps
        total = state["total"] if steps == state["steps_arg"] else max(steps, start)
        if restart or source != ckpt:
            earlier, start, total = earlier + start, 0, steps
        log(("restarting" if restart else "resuming") + f" from step {earlier + start}"
            + ("" if restart else f" of {earlier + total}") if source == ckpt else
            f"starting from {source} (step {earlier}) on this data")
    schedule = lambda i: min(1.0, (i + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(i, total) / total))

    embed = model.get_input_embeddings()
    bf16 = precision == "bfloat16" or (precision == "auto" and bf16_pays(device, hidden_size))
    if precision != "float32":
        log(f"precision: {'bfloat16 (autocast)' if bf16 else 'float32'}"
            + (" (auto: measured on this machine)" if precision == "auto" else ""))
    mixed = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    # the target's teacher pass: a bfloat16 copy where bfloat16 pays (autocast would cast its weights every batch)
    teacher = copy.deepcopy(model).to(torch.bfloat16) if bf16 and model.dtype != torch.bfloat16 else model
    v_ids = None if vocab_ids is None else vocab_ids.to(device)
    lm_head_t, vocab_map = _draft_head(target, v_ids)
    pad = min(target.eos_token_ids) if target.eos_token_ids else 0
    weights = [0.8 ** j for j in range(unroll)]
    decoded_gamma = min(3, unroll)  # the bench's γ for the acceptance the decoder would see (decoded_acceptance)
    embed_f = lambda x: embed(x).detach().float()  # the target's embedding: an input, never trained
    if isinstance(cache_teacher, (str, Path)):
        cache = TeacherStore(cache_teacher, target, sequences, hidden_request, dtype=teacher.dtype)
        cache.fill(teacher, pad=pad, reuse=reuse_teacher, progress=progress, log=log)
        _release_freed_memory()  # the fill's activations
    else:
        cache = {} if cache_teacher else None

    def batch_of(idx):
        """Token ids, answer mask and the target's (hidden, p, top) for the sequences ``idx``, padded alike."""
        ids, mask, answer = _pad_batch([sequences[i] for i in idx], pad, device)
        if cache is None:
            hidden, final, top = _teacher(teacher, ids, mask, hidden_request)
        else:
            new = [i for i in dict.fromkeys(idx) if i not in cache]
            if new:
                new_ids, new_mask, _ = _pad_batch([sequences[i] for i in new], pad, device)
                taught = _teacher(teacher, new_ids, new_mask, hidden_request)
                for i, n, *rows in zip(new, new_mask.sum(1).tolist(), *taught):
                    cache[i] = [r[:n] for r in rows]
            hidden, final, top = (torch.nn.utils.rnn.pad_sequence([cache[i][k] for i in idx], batch_first=True)
                                  .to(device) for k in range(3))
        with mixed():
            return ids, answer, hidden, _teacher_rows(final, lm_head_t, answer), top

    def validate():
        for h in nets:
            h.eval()
        accs, losses, rounds = [[] for _ in nets], [[] for _ in nets], [[] for _ in nets]
        with torch.no_grad():
            for i in range(0, len(val), batch_size):
                ids, answer, hidden, p, top = batch_of(val[i:i + batch_size])
                for k, h in enumerate(nets):
                    with mixed():
                        loss, matches, m = _sequence_loss(h, embed_f, lm_head_t, vocab_map, hidden, ids, answer, p,
                                                          top, unroll, weights)
                    accs[k].append((matches, m))
                    losses[k].append(loss.item())
                    rounds[k] += decoded_acceptance(matches.cpu(), answer.cpu(), decoded_gamma)
        for h in nets:
            h.train()
        out = []
        for k in range(len(nets)):
            matches = torch.cat([m.flatten(1) for m, _ in accs[k]], 1)
            mask = torch.cat([m.flatten() for _, m in accs[k]])
            matches = matches[:, mask].cpu()  # seeds whose whole draft lies in the trained text
            decoded = dict(gamma=decoded_gamma, mean_acceptance_length=mean_acceptance_length(rounds[k]),
                           per_position_acceptance=per_position_acceptance(rounds[k])[0])
            out.append((sum(losses[k]) / len(losses[k]), conditional_acceptance(matches), vllm_acceptance(matches),
                        decoded))
        return out

    def export():
        drafters = []
        for k, h in enumerate(nets):
            d = _drafter(h, vocab_ids)
            d.history = [r for r in history if r["head"] == k]
            d.save(out_dir / f"head{k}", dtype=torch.float16, target=target.name, unroll=unroll, steps=earlier + step,
                   sequences=len(train), history=d.history)
            drafters.append(d)
        return drafters

    def save_checkpoint():
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(dict(run=run, heads=[h.state_dict() for h in nets], opts=[o.state_dict() for o in opts],
                        vocab_ids=vocab_ids, step=step, total=total, steps_arg=steps, earlier_steps=earlier,
                        rng=gen.get_state(), pending=pending, history=history), ckpt)
        export()  # the heads so far, usable even if the run is cut off
        for h in nets:
            h.train()

    t0 = time.perf_counter()
    bar = tqdm(range(start, total), desc="training MTP head", unit="step", disable=not progress, initial=start,
               total=total)
    with _big_arrays_on_the_heap():  # a step's big arrays reuse freed pages instead of faulting in new ones
        step = start
        while step < total:
            if not pending:
                pending = _length_grouped(train, lengths, batch_size, gen)
            idx = pending.pop()
            ids, answer, hidden, p, top = batch_of(idx)
            for h, o in zip(nets, opts):
                for g in o.param_groups:
                    g["lr"] = lr * schedule(step)
                with mixed():
                    loss, _, _ = _sequence_loss(h, embed_f, lm_head_t, vocab_map, hidden, ids, answer, p, top, unroll,
                                                weights, greedy=False)
                o.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(h.parameters(), 1.0)
                o.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % RELEASE_EVERY == 0:
                _release_freed_memory()
            if time_budget is not None and step == start + 20:  # fit the schedule into the time left
                per_step = (time.perf_counter() - t0) / 20
                fits = start + 20 + int((time_budget - (time.perf_counter() - t0)) / (per_step * 1.08))
                if fits < total:
                    total = max(step + 1, fits)
                    bar.total = total
                    log(f"{per_step:.2f} s/step: {total} steps fit in the time budget")
            if step % log_every == 0 or step == total:
                for k, (val_loss, cond, vllm, decoded) in enumerate(validate()):
                    history.append(dict(step=earlier + step, head=k, val_loss=val_loss, conditional_acceptance=cond,
                                        vllm_acceptance=vllm, decoded=decoded, seconds=time.perf_counter() - t0))
                    log(f"step {earlier + step} head {k} {heads[k]}: val loss {val_loss:.3f}; greedy acceptance by "
                        f"position, conditional {' '.join(f'{a:.2f}' for a in cond)}, as vLLM counts it "
                        + " ".join(f"{a:.2f}" for a in vllm) + f"; decoding at γ={decoded_gamma}: mean acceptance "
                        f"length {decoded['mean_acceptance_length']:.2f} ("
                        + " ".join(f"{a:.2f}" for a in decoded["per_position_acceptance"]) + ")")
            if step % checkpoint_every == 0 or step == total:
                save_checkpoint()
    for h in nets:
        h.eval()
    drafters = export()
    del teacher
    if isinstance(cache, dict):
        cache.clear()  # the target's outputs per sequence: hundreds of MB for a notebook's data
    _release_freed_memory()
    return drafters


def _start_from_drafter(path: Path, nets: list, run: dict, log) -> tuple:
    """``init_from`` a saved drafter's folder (a run's ``head0``, or a drafter shipped in the package, whose run and
    optimizer stayed on the machine that trained it): its head's weights and draft vocabulary, a fresh optimizer.
    Returns ``(vocab_ids, steps it was trained, its history)``."""
    drafter = MTPDrafter.load(path)
    meta = getattr(drafter, "meta", {})
    if len(nets) != 1 or dict(drafter.head.config) != run["heads"][0] \
            or meta.get("target", run["target"]["name"]) != run["target"]["name"]:
        raise ValueError(f"init_from: {path} holds a drafter {_describe('heads', [dict(drafter.head.config)])} for "
                         f"{meta.get('target')!r}, not {_describe('heads', run['heads'])} for "
                         f"{run['target']['name']!r}: start from a drafter of the same target and head")
    nets[0].load_state_dict(drafter.head.state_dict())  # (float16 weights as saved: copied into float32)
    steps = int(meta.get("steps") or 0)
    log(f"starting from the drafter in {path} ({steps} steps trained) on this data, with a fresh optimizer")
    # (the history of a drafter saved before heads were trained side by side names no head: it had one)
    return drafter.vocab_ids, steps, [dict(r, head=r.get("head", 0)) for r in meta.get("history") or []]


GROUP = 8  # batches drawn at once and cut by length (_length_grouped)


def _length_grouped(train: list, lengths: list, batch_size: int, gen) -> list:
    """:data:`GROUP` batches of ``batch_size`` training sequences drawn at random (with replacement) at once, sorted
    by length and cut into batches, in random order (the last one is used first): the sequences of a batch have
    about the same length, so little of it is padding (transformers' ``group_by_length``). Drawn one batch at a
    time, a batch of 16 answers of the CPU corpus (stage A ~235 tokens, stage B ~400 with their quoted texts) was
    padded to 1.9x its tokens, and a step's passes over the padding cost as much as over the answers."""
    drawn = [train[i] for i in torch.randint(len(train), (GROUP * batch_size,), generator=gen).tolist()]
    drawn.sort(key=lambda i: lengths[i])
    batches = [drawn[i:i + batch_size] for i in range(0, len(drawn), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


RELEASE_EVERY = 10  # training steps between two _release_freed_memory calls


def _libc():
    """The C library, or ``None`` where it cannot be loaded."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@contextmanager
def _big_arrays_on_the_heap():
    """Inside this block glibc serves every allocation from its heap and keeps what is freed there for the next one
    (``mallopt``: no mmap, no trimming on its own; :func:`_release_freed_memory` still hands memory back every
    :data:`RELEASE_EVERY` steps). Otherwise every allocation above glibc's mmap threshold (at most 32 MB) is mapped
    afresh and unmapped when freed: a training step's big arrays (the teacher's ``p``, features, activations of 16
    answers) faulted in and zeroed their pages every step, and the kernel took 17 % of an EAGLE-3 step (perf).
    Measured on an Intel(R) Xeon(R) Processor (2 cores), steps 10-30 of an EAGLE-3 run on the stored corpus, one
    process each, interleaved, the same settings given by ``GLIBC_TUNABLES``: 3.95 and 3.97 s a step against 4.16,
    4.50, 4.05 and 4.05 without; with this code 3.44 against 4.81 s, the peak memory over 30 steps 7.53 against
    6.82 GB, after each periodic trim 2.50 GB either way. Afterwards glibc's defaults are set again (65,536 maps, a
    128 KB trim threshold; the threshold no longer adapts). A no-op where the C library has no ``mallopt`` (not
    glibc)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2 ** 31 - 1)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_max, 65536)
        libc.mallopt(m_trim_threshold, 128 * 1024)


def _release_freed_memory() -> None:
    """Hand the memory training freed back to the OS: glibc keeps freed heap pages of many small tensors, so a
    notebook's kernel would otherwise carry training's high-water mark (hundreds of MB) into everything after it.
    A no-op where the C library is not glibc.

    Training calls it every :data:`RELEASE_EVERY` steps too: batches of other lengths leave freed memory the next
    ones do not reuse, so a long run grew without bound (anonymous memory 12.4 -> 15.6 GB over 400 EAGLE-3 steps of
    16 answers). Measured on an Intel(R) Xeon(R) Processor (2 cores): the live memory after a release was 1.0-1.3 GB,
    10 steps later 3.7-5.4 GB; a release costs its next step ~0.65 s (the pages are faulted in again: 3.9 s against
    3.2 s a step when released every step), so every 10 steps costs ~2 %."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
