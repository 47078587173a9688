"""Tree drafts: check several alternative drafts in one target pass, as Medusa, EAGLE and SpecInfer do.

A drafter may offer, next to its main draft, a few other *branches* (``Draft.branches``): other guesses for the
same next tokens, e.g. the head's second choice for the first token, or what followed an earlier occurrence of the
last token. The decoder merges them into a token tree: branches that start alike share their nodes::

    context … x_t ─┬─ "The" ─┬─ " cat" ─ " sat"    main draft
                   │         └─ " dog" ─ " ran"    branch 2
                   └─ "A" ─── " cat" ─ " sat"      branch 3

One target pass reads the pending token x_t and every node. A *tree attention mask* lets each node see the context
and its own ancestors only, and each node gets the position of its depth, so every node is scored exactly as if
its branch had been fed alone. In greedy decoding the target's choices then pick one path down the tree: from the
root, step to the child that equals the target's argmax, as long as there is one. The branch that follows that
path furthest is verified as usual (same accepted tokens, same correction), and the KV cache keeps its rows only.

A tree raises the acceptance length per target pass at the price of a wider pass (more rows). On a CPU with
mtplab's few-row kernels (``mtplab.kernels``) a pass over ~10 rows costs little more than over 5; whether it pays
is what ``mtplab bench`` measures. Trees are used for greedy decoding; with sampling the decoder verifies the main
draft alone, by the usual lossless rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from .models import GrowingLayer


@dataclass
class TokenTree:
    tokens: list  # node tokens, every parent before its children
    parents: list  # index of each node's parent node; -1: a child of the root (the pending token)
    branches: list  # for each branch, the indices of its nodes, root's child first

    @property
    def depths(self) -> list:
        depth = []
        for parent in self.parents:
            depth.append(1 if parent < 0 else depth[parent] + 1)
        return depth


def build_tree(branches: list) -> TokenTree:
    """Merge token lists that all continue the same context into a trie (shared prefixes share nodes)."""
    tokens, parents, index, paths = [], [], {}, []
    for branch in branches:
        path, parent = [], -1
        for token in branch:
            key = (parent, int(token))
            if key not in index:
                index[key] = len(tokens)
                tokens.append(int(token))
                parents.append(parent)
            parent = index[key]
            path.append(parent)
        paths.append(path)
    return TokenTree(tokens, parents, paths)


def tree_inputs(tree: TokenTree, past: int, device=None):
    """Position ids ``[1, 1+n]`` and boolean attention mask ``[1, 1, 1+n, past+1+n]`` for one pass over the
    pending token (at position ``past``) and the tree's n nodes: a node sees the context, the root and its ancestors.
    (:func:`mtplab.models.forward` turns the mask into the additive form both eager and SDPA attention read.)"""
    n = len(tree.tokens)
    sees = torch.zeros(1 + n, 1 + n, dtype=torch.bool)
    sees[:, 0] = True
    for i, parent in enumerate(tree.parents):
        sees[i + 1, i + 1] = True
        if parent >= 0:
            sees[i + 1] |= sees[parent + 1]
    mask = torch.cat([torch.ones(1 + n, past, dtype=torch.bool), sees], dim=1)
    positions = past + torch.tensor([0] + tree.depths)
    return positions[None].to(device), mask[None, None].to(device)


def best_branch(tree: TokenTree, argmax: list) -> tuple:
    """``(branch, accepted)``: the branch that follows the target's greedy choices furthest (the first such branch on
    a tie) and how many of its tokens do.

    ``argmax[r]``: the target's greedy token after row r of the pass (row 0: the pending token, row i+1: node i);
    only the rows on the followed path are read."""
    def accepted(path):
        n = 0
        for node in path:
            parent_row = 0 if tree.parents[node] < 0 else tree.parents[node] + 1
            if tree.tokens[node] != argmax[parent_row]:
                break
            n += 1
        return n
    scores = [accepted(path) for path in tree.branches]
    return scores.index(max(scores)), max(scores)


def check_cache(cache) -> None:
    """Refuse, before a tree pass runs, a KV cache whose rows :func:`keep_cache_rows` cannot select (sliding-window
    or other special layers)."""
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, GrowingLayer):
            raise NotImplementedError(f"tree drafts need a plain full-attention KV cache, this target's has "
                                      f"{type(layer).__name__} layers: use a chain draft (no branches)")


def keep_cache_rows(cache, start: int, rows: list) -> None:
    """Keep the first ``start`` positions of every layer's KV cache, then only the given rows after them
    (``rows`` counted from ``start``), in that order. (Plain full-attention layers: see :func:`check_cache`.)

    A :class:`~mtplab.models.GrowingLayer` moves the kept rows down inside its buffer and shortens its views, as a
    rollback does: joining the rows into new tensors (``torch.cat``) copied the whole cache, and the next pass,
    finding its keys outside the buffer, copied it again (two copies of the cache every tree round)."""
    index = None
    for layer in cache.layers:
        if not layer.is_initialized or layer.keys.numel() == 0:
            continue
        if index is None or index.device != layer.keys.device:
            index = torch.tensor([start + r for r in rows], device=layer.keys.device)
        if isinstance(layer, GrowingLayer):
            end = start + len(rows)
            layer.keys[..., start:end, :] = layer.keys.index_select(-2, index)  # (a copy first: rows may overlap)
            layer.values[..., start:end, :] = layer.values.index_select(-2, index)
            layer.keys, layer.values = layer.keys[..., :end, :], layer.values[..., :end, :]
            continue
        layer.keys = torch.cat([layer.keys[..., :start, :], layer.keys.index_select(-2, index)], dim=-2)
        layer.values = torch.cat([layer.values[..., :start, :], layer.values.index_select(-2, index)], dim=-2)
