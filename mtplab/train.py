"""Making an MTP drafter for a target by self-distillation.

1. :func:`collect_features` runs the target over token sequences (its own generations, or redistributable text)
   and stores, per position, the target's last hidden state, the token, and the target's own next-token
   distribution (top ``TOP_K`` probabilities). One teacher-forced forward per block: no generation needed.
2. :func:`train_mtp_drafter` trains an :class:`~mtplab.drafters.mtp.MTPHead` to reproduce those distributions
   ``unroll`` steps ahead, feeding its own output state back exactly as it will when drafting. It logs per-position
   greedy acceptance on a validation split (as vLLM reports it: position i accepted / rounds that drafted
   position i), checkpoints, and resumes from its last checkpoint after an interruption.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .drafters.mtp import MTPDrafter, MTPHead
from .models import chat_ids, last_hidden

TOP_K = 16


@torch.inference_mode()
def collect_features(target, sequences, block_size: int = 256, progress: bool = True) -> dict:
    """Teacher-forced target pass over ``sequences`` (lists of token ids), cut into blocks of ``block_size``.

    Returns ``{"hidden": [N, T, H] float16, "tokens": [N, T] int32, "top_ids": [N, T, K] int32,
    "top_probs": [N, T, K] float16}``; row t of a block holds the target's view *after* reading token t.
    """
    from tqdm.auto import tqdm

    blocks = [s[i:i + block_size] for s in sequences for i in range(0, len(s) - block_size + 1, block_size)]
    if not blocks:
        raise ValueError(f"no sequence is as long as block_size={block_size}")
    model = target.model
    out = {"hidden": [], "tokens": [], "top_ids": [], "top_probs": []}
    for block in tqdm(blocks, desc="target features", unit="block", disable=not progress):
        x = torch.tensor([block], device=model.device)
        with last_hidden(model) as got:
            o = model(input_ids=x, **got.kwargs)
        p = torch.softmax(o.logits[0].float(), dim=-1)
        top = torch.topk(p, TOP_K, dim=-1)
        out["hidden"].append(got.hidden(o)[0].to(torch.float16).cpu())
        out["tokens"].append(x[0].to(torch.int32).cpu())
        out["top_ids"].append(top.indices.to(torch.int32).cpu())
        out["top_probs"].append(top.values.to(torch.float16).cpu())
    return {k: torch.stack(v) for k, v in out.items()}


def frequent_tokens(features: dict, size: int | None) -> torch.Tensor | None:
    """The ``size`` tokens the target predicts most often (its argmax) in the features: the draft vocabulary."""
    if size is None:
        return None
    counts = torch.bincount(features["top_ids"][..., 0].flatten().long())
    size = min(size, int((counts > 0).sum()))
    return torch.sort(torch.topk(counts, size).indices).values


def _unrolled_loss(head, embed, lm_head_t, vocab_map, batch, unroll):
    """Soft cross-entropy against the target's top-k distribution at each of ``unroll`` steps; also the greedy
    match of each step (the drafter's argmax equals the target's)."""
    hidden, tokens, top_ids, top_probs = (batch[k] for k in ("hidden", "tokens", "top_ids", "top_probs"))
    T = tokens.shape[1]
    n = T - unroll
    s = hidden[:, :n].float()
    losses, matches = [], []
    for j in range(1, unroll + 1):
        s = head(s, embed(tokens[:, j:n + j].long()))
        logp = torch.log_softmax(s @ lm_head_t, dim=-1)  # [B, n, V']
        ids, pr = top_ids[:, j:n + j].long(), top_probs[:, j:n + j].float()
        local = vocab_map[ids]  # -1 where the target's candidate is outside the draft vocabulary
        pr = pr * (local >= 0)
        pr = pr / pr.sum(-1, keepdim=True).clamp_min(1e-8)
        losses.append(-(pr * logp.gather(-1, local.clamp_min(0))).sum(-1).mean())
        matches.append(local[..., 0] == logp.argmax(-1))  # greedy: drafted token == target's top token
    return torch.stack(losses), torch.stack(matches)  # [unroll], [unroll, B, n]


def acceptance_by_position(matches: torch.Tensor) -> list:
    """Greedy per-position acceptance as vLLM reports it: P(position i accepted | positions < i accepted)."""
    chain = matches.cumprod(0).float().flatten(1).mean(1)  # P(first i+1 positions all accepted)
    prev = torch.cat([torch.ones(1), chain[:-1]])
    return (chain / prev.clamp_min(1e-8)).tolist()


def train_mtp_drafter(target, features: dict, out_dir, *, num_layers: int = 2, draft_vocab_size: int | None = 8192,
                      unroll: int = 4, steps: int = 2000, batch_size: int = 16, lr: float = 2e-3,
                      val_fraction: float = 0.05, log_every: int = 100, checkpoint_every: int = 500,
                      seed: int = 0, progress: bool = True, log=print) -> MTPDrafter:
    """Train an MTP head on ``features`` (from :func:`collect_features`); save it to ``out_dir``; resume there."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    n_blocks = features["tokens"].shape[0]
    n_val = max(1, int(n_blocks * val_fraction)) if n_blocks > 1 else 0
    train_idx, val_idx = torch.arange(n_val, n_blocks), torch.arange(n_val)
    hidden_size = features["hidden"].shape[-1]
    vocab_ids = frequent_tokens(features, draft_vocab_size)
    head = MTPHead(hidden_size, num_layers)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    start, history = 0, []
    ckpt = out_dir / "checkpoint.pt"
    if ckpt.exists():  # resume
        state = torch.load(ckpt, weights_only=True)
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        vocab_ids, start, history = state["vocab_ids"], state["step"], state["history"]
        log(f"resuming from step {start}")

    embed = target.model.get_input_embeddings()
    head_w = target.model.get_output_embeddings().weight.detach()
    lm_head_t = (head_w if vocab_ids is None else head_w[vocab_ids]).float().t().contiguous()
    vocab_map = torch.full((target.vocab_size,), -1, dtype=torch.long)
    vocab_map[torch.arange(target.vocab_size) if vocab_ids is None else vocab_ids] = torch.arange(lm_head_t.shape[1])
    for p in embed.parameters():
        p.requires_grad_(False)
    batch_of = lambda idx: {k: v[idx] for k, v in features.items()}

    def validate():
        head.eval()
        with torch.no_grad():
            losses, matches = _unrolled_loss(head, embed, lm_head_t, vocab_map, batch_of(val_idx), unroll)
        head.train()
        return losses.mean().item(), acceptance_by_position(matches)

    t0 = time.perf_counter()
    head.train()
    bar = tqdm(range(start, steps), desc="training MTP head", unit="step", disable=not progress, initial=start, total=steps)
    for step in bar:
        idx = train_idx[torch.randint(len(train_idx), (min(batch_size, len(train_idx)),))]
        losses, _ = _unrolled_loss(head, embed, lm_head_t, vocab_map, batch_of(idx), unroll)
        loss = losses.mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if n_val and (done % log_every == 0 or done == steps):
            val_loss, acc = validate()
            history.append(dict(step=done, train_loss=loss.item(), val_loss=val_loss, acceptance=acc,
                                seconds=time.perf_counter() - t0))
            log(f"step {done}: train {loss.item():.3f} val {val_loss:.3f} per-position greedy acceptance "
                + " ".join(f"{a:.2f}" for a in acc))
        if done % checkpoint_every == 0 or done == steps:
            out_dir.mkdir(parents=True, exist_ok=True)
            torch.save(dict(head=head.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                            vocab_ids=vocab_ids, step=done, history=history), ckpt)
    drafter = MTPDrafter(head.eval(), vocab_ids)
    drafter.history = history
    drafter.save(out_dir, target=target.name, unroll=unroll, steps=steps, history=history)
    return drafter


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


def build_features(target, out_dir, max_tokens: int | None = None, block_size: int = 128, progress=True) -> dict:
    """Features of the target over the standard library's documentation in chat form, cached in ``out_dir``."""
    path = Path(out_dir) / "features.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    seqs = chat_sequences(target, stdlib_texts())
    if max_tokens:
        kept, total = [], 0
        for s in seqs:
            kept.append(s[: max_tokens - total])
            total += len(kept[-1])
            if total >= max_tokens:
                break
        seqs = kept
    feats = collect_features(target, seqs, block_size=block_size, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, path)
    return feats


# --- training straight from token sequences (the target's own answers), target features computed on the fly ---------

def draft_vocabulary(sequences, size: int | None) -> torch.Tensor | None:
    """The ``size`` most frequent answer tokens of ``sequences`` (``(ids, answer_start)`` pairs): for greedy answers
    these are exactly the tokens the target most often predicts."""
    if size is None:
        return None
    counts = torch.bincount(torch.tensor([t for ids, start in sequences for t in ids[start:]], dtype=torch.long))
    size = min(size, int((counts > 0).sum()))
    return torch.sort(torch.topk(counts, size).indices).values


def _pad_batch(batch, pad: int, device):
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    answer = torch.zeros((len(batch), width), dtype=torch.bool)  # position t holds a token of the answer
    for i, (seq, start) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        answer[i, start: len(seq)] = True
    return ids.to(device), mask.to(device), answer.to(device)


@torch.no_grad()
def _teacher(model, ids, mask, vocab_ids):
    """The target's last hidden states and its next-token distribution restricted (and renormalised) to the draft
    vocabulary, plus whether its argmax lies in that vocabulary."""
    with last_hidden(model) as got:
        o = model(input_ids=ids, attention_mask=mask, **got.kwargs)
    p = torch.softmax(o.logits.float(), dim=-1)
    top = p.argmax(-1)
    if vocab_ids is not None:
        p = p[..., vocab_ids]
    return got.hidden(o).float(), p / p.sum(-1, keepdim=True).clamp_min(1e-8), top


def _sequence_loss(head, embed, lm_head_t, vocab_map, hidden, ids, answer, p, top, unroll, weights):
    """Unrolled soft cross-entropy at answer positions; step j predicts token t+j+1 from the state fed back j-1
    times and the true token t+j (as drafting does once the earlier drafts were accepted)."""
    n = ids.shape[1] - unroll
    s = hidden[:, :n]
    if head.attn is not None:  # memory: every position j, value from the token after it; seed t sees j <= t
        L = ids.shape[1] - 1
        K, V = head.attn.memory(hidden[:, :L], embed(ids[:, :L]), embed(ids[:, 1:]))
        seed, pos = torch.arange(n, device=ids.device)[:, None], torch.arange(L, device=ids.device)[None, :]
        seen, distance = pos <= seed, (seed - pos).clamp_min(0).to(hidden.dtype)
    losses, matches, masks = [], [], []
    for j in range(1, unroll + 1):
        context = None
        if head.attn is not None:
            match = (ids[:, j:n + j, None] == ids[:, None, :L]).to(hidden.dtype)
            context = (K, V, match, distance, seen)
        s = head(s, embed(ids[:, j:n + j]), context)
        logq = torch.log_softmax(s @ lm_head_t, dim=-1)
        m = answer[:, j + 1: j + 1 + n]
        m = torch.nn.functional.pad(m, (0, n - m.shape[1]))
        ce = -(p[:, j:n + j] * logq).sum(-1)
        losses.append((ce * m).sum() / m.sum().clamp_min(1))
        matches.append(vocab_map[top[:, j:n + j]] == logq.argmax(-1))
        masks.append(m)
    loss = sum(w * l for w, l in zip(weights, losses)) / sum(weights)
    return loss, torch.stack(matches), masks[0] & masks[-1]


def train_on_sequences(target, sequences, out_dir, *, heads=((2, None),), draft_vocab_size: int | None = 8192,
                       unroll: int = 4, steps: int = 2000, batch_size: int = 16, lr: float = 2e-3,
                       val_size: int = 64, log_every: int = 100, checkpoint_every: int = 200,
                       time_budget: float | None = None, restart: bool = False, seed: int = 0, progress: bool = True,
                       log=print) -> list:
    """Train one or more MTP heads on ``sequences`` (``(ids, answer_start)`` pairs, e.g. from
    :func:`mtplab.datagen.load_sequences`), computing the target's hidden states and distributions on the fly.

    ``heads``: ``(num_layers, intermediate_size[, context_attention])`` per head (see :class:`MTPHead`); all see
    the same batches (one target pass). Each is
    saved to ``out_dir/head{i}`` (safetensors + JSON); ``out_dir/checkpoint.pt`` makes a re-run resume.
    ``time_budget`` (seconds): shorten the run to fit, measured over the first steps (the schedule adapts).
    ``restart``: continue from the checkpoint's weights and optimizer with a fresh schedule (warm-up, cosine) from
    step 0 — a warm restart, as used for the shipped drafter. Returns the drafters.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    model = target.model
    device = model.device
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(sequences), generator=gen).tolist()
    val_size = max(1, min(val_size, len(sequences) // 10))
    val = [sequences[i] for i in order[:val_size]]
    train = [sequences[i] for i in order[val_size:]]
    vocab_ids = draft_vocabulary(train, draft_vocab_size)
    hidden_size = model.get_input_embeddings().weight.shape[1]
    torch.manual_seed(seed)
    nets = [MTPHead(hidden_size, *spec).to(device) for spec in heads]
    opts = [torch.optim.AdamW(h.parameters(), lr=lr, weight_decay=0.0) for h in nets]
    start, history, total = 0, [], steps
    ckpt = out_dir / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True, map_location=device)
        for h, o, hs, os_ in zip(nets, opts, state["heads"], state["opts"]):
            h.load_state_dict(hs)
            o.load_state_dict(os_)
        vocab_ids, start, history = state["vocab_ids"], state["step"], state["history"]
        # same arguments: the same (possibly time-fitted) schedule; a new ``steps``: run to that many steps
        total = state["total"] if steps == state.get("steps_arg", steps) else max(steps, start)
        if restart:
            start, total = 0, steps
        log(f"{'restarting' if restart else 'resuming'} from step {start} of {total}")
    schedule = lambda i: min(1.0, (i + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(i, total) / total))

    embed = model.get_input_embeddings()
    head_w = model.get_output_embeddings().weight.detach().float()
    lm_head_t = (head_w if vocab_ids is None else head_w[vocab_ids.to(device)]).t().contiguous()
    vocab_map = torch.full((target.vocab_size,), -1, dtype=torch.long, device=device)
    vocab_map[torch.arange(target.vocab_size, device=device) if vocab_ids is None else vocab_ids.to(device)] = \
        torch.arange(lm_head_t.shape[1], device=device)
    v_ids = None if vocab_ids is None else vocab_ids.to(device)
    pad = min(target.eos_token_ids) if target.eos_token_ids else 0
    weights = [0.8 ** j for j in range(unroll)]
    embed_f = lambda x: embed(x).detach().float()  # the target's embedding: an input, never trained

    def validate():
        for h in nets:
            h.eval()
        accs, losses = [[] for _ in nets], [[] for _ in nets]
        with torch.no_grad():
            for i in range(0, len(val), batch_size):
                ids, mask, answer = _pad_batch(val[i:i + batch_size], pad, device)
                hidden, p, top = _teacher(model, ids, mask, v_ids)
                for k, h in enumerate(nets):
                    loss, matches, m = _sequence_loss(h, embed_f, lm_head_t, vocab_map, hidden, ids, answer, p,
                                                         top, unroll, weights)
                    accs[k].append((matches, m))
                    losses[k].append(loss.item())
        for h in nets:
            h.train()
        out = []
        for k in range(len(nets)):
            matches = torch.cat([m.flatten(1) for m, _ in accs[k]], 1)
            mask = torch.cat([m.flatten() for _, m in accs[k]])
            out.append((sum(losses[k]) / len(losses[k]), acceptance_by_position(matches[:, mask].cpu())))
        return out

    def export():
        drafters = []
        for k, h in enumerate(nets):
            d = MTPDrafter(h, vocab_ids)
            d.history = [r for r in history if r["head"] == k]
            d.save(out_dir / f"head{k}", dtype=torch.float16, target=target.name, unroll=unroll, steps=step,
                   sequences=len(train), history=d.history)
            drafters.append(d)
        return drafters

    def save_checkpoint(done):
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(dict(heads=[h.state_dict() for h in nets], opts=[o.state_dict() for o in opts],
                        vocab_ids=vocab_ids, step=done, history=history, total=total, steps_arg=steps), ckpt)
        export()  # the heads so far, usable even if the run is cut off
        for h in nets:
            h.train()

    t0 = time.perf_counter()
    bar = tqdm(range(start, total), desc="training MTP head", unit="step", disable=not progress, initial=start,
               total=total)
    step = start
    while step < total:
        idx = torch.randint(len(train), (batch_size,), generator=gen).tolist()
        ids, mask, answer = _pad_batch([train[i] for i in idx], pad, device)
        hidden, p, top = _teacher(model, ids, mask, v_ids)
        for h, o in zip(nets, opts):
            for g in o.param_groups:
                g["lr"] = lr * schedule(step)
            loss, _, _ = _sequence_loss(h, embed_f, lm_head_t, vocab_map, hidden, ids, answer, p, top, unroll,
                                           weights)
            o.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(h.parameters(), 1.0)
            o.step()
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if time_budget is not None and step == start + 20:  # fit the schedule into the time left
            per_step = (time.perf_counter() - t0) / 20
            fits = start + 20 + int((time_budget - (time.perf_counter() - t0)) / (per_step * 1.08))
            if fits < total:
                total = max(step + 1, fits)
                bar.total = total
                log(f"{per_step:.2f} s/step: {total} steps fit in the time budget")
        if step % log_every == 0 or step == total:
            for k, (val_loss, acc) in enumerate(validate()):
                history.append(dict(step=step, head=k, val_loss=val_loss, acceptance=acc,
                                    seconds=time.perf_counter() - t0))
                log(f"step {step} head {k} {heads[k]}: val {val_loss:.3f} per-position greedy acceptance "
                    + " ".join(f"{a:.2f}" for a in acc))
        if step % checkpoint_every == 0 or step == total:
            save_checkpoint(step)
    for h in nets:
        h.eval()
    return export()
