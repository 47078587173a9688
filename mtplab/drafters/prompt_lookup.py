"""Prompt lookup (n-gram) drafting: copy what followed the last occurrence of the current n-gram.

Like transformers' ``prompt_lookup_num_tokens`` / ``max_matching_ngram_size``, but it takes the *most recent*
earlier match (what was just written is the best guess for what comes next) and it drafts deterministically, so q
is one-hot and a drafted token x is accepted with probability p(x).
"""
from __future__ import annotations

from .base import Draft, Drafter


class PromptLookupDrafter(Drafter):
    def __init__(self, max_matching_ngram_size: int = 3, min_matching_ngram_size: int = 1):
        if not isinstance(max_matching_ngram_size, int) or max_matching_ngram_size < 1:
            raise ValueError(f"max_matching_ngram_size must be an integer >= 1, got {max_matching_ngram_size!r}")
        if not isinstance(min_matching_ngram_size, int) or not 1 <= min_matching_ngram_size <= max_matching_ngram_size:
            raise ValueError(
                f"min_matching_ngram_size must be an integer in [1, {max_matching_ngram_size}], "
                f"got {min_matching_ngram_size!r}"
            )
        self.max_n = max_matching_ngram_size
        self.min_n = min_matching_ngram_size
        self.name = "prompt-lookup"

    def propose(self, ids, k, cfg, generator, target_hidden=None) -> Draft:
        return Draft(lookup(ids, k, self.max_n, self.min_n), None)


def lookup(ids: list, k: int, max_n: int, min_n: int = 1) -> list:
    """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix n-gram."""
    size = len(ids)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        tail = ids[size - n:]
        for start in range(size - n - 1, -1, -1):  # newest match first
            if ids[start:start + n] == tail:
                return ids[start + n:start + n + k]
    return []


def check_context_ngram(n):
    """``n`` if it is a valid ``context_ngram`` setting of a trained drafter (``None`` or 1-3), else ValueError."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 3):
        raise ValueError(f"context_ngram must be None or an integer in [1, 3], got {n!r}")
    return n


def copy_or_choose(seq: list, logits, q, ngram: int | None, cfg, generator) -> tuple:
    """A trained drafter's next token after ``seq`` and its q, the one place the context copy is written: where the
    last ``ngram``..3 tokens of ``seq`` occurred earlier in it, the token that followed their latest occurrence with q
    one-hot (deterministic, so verification stays exact); otherwise the head's choice from its q (``ngram=None``:
    always)."""
    from ..sampling import choose, one_hot

    copied = lookup(seq, 1, 3, ngram) if ngram else []
    if copied:
        return copied[0], one_hot(copied[0], q)
    return choose(logits, q, cfg, generator), q
