"""Every drafter by name: one table for the CLI, the benchmark, the Playground and the notebooks.

``make(name, target, **options)`` builds one; ``label(name, target)`` is how a view shows it; ``names(target)``
lists those that work offline for that target (the shipped MTP drafters exist for the bundled target only).
Besides the names, a folder holding a trained drafter (``mtplab train-drafter --out DIR`` writes ``DIR/head0``) is
accepted wherever a drafter name is, so a new head is benchmarked exactly like the shipped ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .base import Drafter


def default_layers(target) -> int:
    """Layers a layer-skip exit or a truncated draft model keeps by default: 2/5 of the target's (12 of 30)."""
    return max(1, round(0.4 * len(target.model.get_decoder().layers)))


@dataclass(frozen=True)
class Entry:
    name: str
    label: str  # may name {layers}
    about: str
    build: Callable  # (target, layers) -> Drafter | None
    shipped_mtp: bool = False  # needs the MTP drafter mtplab ships for this target


def _mtp(name, **kw):
    def build(target, layers):
        from .mtp import load_drafter

        return load_drafter(name, target, **kw)
    return build


def _layer_skip(target, layers):
    from .draft_model import LayerSkipDrafter

    return LayerSkipDrafter(target, exit_layer=layers)


def _draft_model(target, layers):
    from ..models import truncated_copy
    from .draft_model import DraftModelDrafter

    return DraftModelDrafter(truncated_copy(target, layers), target.tokenizer, name=f"draft-model({layers} layers)")


def _prompt_lookup(target, layers):
    from .prompt_lookup import PromptLookupDrafter

    return PromptLookupDrafter()


ENTRIES = {e.name: e for e in [
    Entry("mtp", "MTP (trained for this target)",
          "mtplab's MTP head over the target's last hidden state, copying from the context on 3-gram matches",
          _mtp("mtp"), shipped_mtp=True),
    Entry("mtp-tree", "MTP + token tree (greedy: 3 branches in one pass)",
          "the same drafter, verified as a token tree with its runner-up and a 1-gram copy when greedy",
          _mtp("mtp-tree"), shipped_mtp=True),
    Entry("mtp-head", "MTP head alone (no context copy)", "the MTP head without the context copy",
          _mtp("mtp", context_ngram=None), shipped_mtp=True),
    Entry("eagle3", "EAGLE-3 (reads the context; in training)",
          "an EAGLE-3 head over the target's low, middle and high layers and its own cache of the context, copying "
          "on 3-gram matches; trained on a CPU so far, a session at a time", _mtp("eagle3"), shipped_mtp=True),
    Entry("prompt-lookup", "prompt lookup", "copies what followed the last 1-3 tokens earlier in the context",
          _prompt_lookup),
    Entry("layer-skip", "layer-skip (exit after layer {layers})",
          "the target's own first layers, final norm and head (early exit, no extra memory)", _layer_skip),
    Entry("draft-model", "draft model (first {layers} layers)",
          "a separate model with its own cache: a copy of the target's first layers", _draft_model),
    Entry("none", "none (plain decoding)", "no drafter: the plain baseline, same loop", lambda target, layers: None),
]}
NAMES = tuple(ENTRIES)


def is_folder(name) -> bool:
    """Whether ``name`` is not a drafter name but a folder (a trained drafter's, for :func:`make`)."""
    return name not in ENTRIES and Path(str(name)).is_dir()


def _check(name) -> Entry:
    if name not in ENTRIES:
        raise ValueError(f"drafter must be one of {NAMES} or a folder holding a trained drafter, got {name!r}")
    return ENTRIES[name]


def names(target) -> list:
    """The drafters that work offline for ``target``."""
    from .mtp import SHIPPED

    return [n for n, e in ENTRIES.items() if not e.shipped_mtp or target.name in SHIPPED]


def make(name: str, target, layers: int | None = None) -> Drafter | None:
    """Build drafter ``name`` for ``target`` (``layers``: layer-skip exit / draft-model depth, default
    :func:`default_layers`); ``name`` may be a trained drafter's folder (:func:`mtplab.load_drafter` reads it)."""
    if is_folder(name):
        from .mtp import load_drafter

        return load_drafter(name, target)
    entry = _check(name)
    return entry.build(target, default_layers(target) if layers is None else layers)


def label(name: str, target, layers: int | None = None) -> str:
    return _check(name).label.format(layers=default_layers(target) if layers is None else layers)
