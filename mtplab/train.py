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
        o = model(input_ids=x, output_hidden_states=True)
        p = torch.softmax(o.logits[0].float(), dim=-1)
        top = torch.topk(p, TOP_K, dim=-1)
        out["hidden"].append(o.hidden_states[-1][0].to(torch.float16).cpu())
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
        state = torch.load(ckpt, weights_only=False)
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
        chat = tok.apply_chat_template([{"role": "user", "content": f"{asks[i % len(asks)]}\n\n{prompt}"},
                                        {"role": "assistant", "content": tok.decode(ids)}], tokenize=False)
        out.append(tok(chat, add_special_tokens=False)["input_ids"])
    return out


def build_features(target, out_dir, max_tokens: int | None = None, block_size: int = 128, progress=True) -> dict:
    """Features of the target over the standard library's documentation in chat form, cached in ``out_dir``."""
    path = Path(out_dir) / "features.pt"
    if path.exists():
        return torch.load(path)
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
