"""``load_pair``: a target together with the real MTP drafter made for it.

* Gemma 4 (``google/gemma-4-E2B-it``, ...): the separate assistant checkpoint, by Google's naming
  ``<target id>-assistant`` (``google/gemma-4-E2B-it-assistant``) → :class:`Gemma4AssistantDrafter`.
* A checkpoint whose config has ``num_mtp_layers`` (DeepSeek-V3, GLM-4.5, ...): the MTP layers stored in the target's
  own checkpoint → :class:`BuiltinMTPDrafter`.
"""
from __future__ import annotations

import os

from .drafters.builtin_mtp import BuiltinMTPDrafter
from .drafters.gemma4 import Gemma4AssistantDrafter
from .models import Target, _load_kwargs, load_target


def load_pair(name_or_path: str | os.PathLike, assistant: str | os.PathLike | None = None, *, device=None, dtype=None,
              device_map=None, trust_remote_code: bool = False) -> tuple[Target, object]:
    """Load ``(target, drafter)``: the target (as :func:`mtplab.load_target`) and its MTP drafter.

    ``assistant``: the Gemma 4 assistant's hub id or folder (default: ``<name_or_path>-assistant``). The other
    arguments pass through to transformers' ``from_pretrained`` for both models. Without the hub (and without the
    models in the local Hugging Face cache) transformers raises its ``OSError`` saying it could not reach them.
    """
    if name_or_path is None:
        raise ValueError("load_pair needs a hub id or folder of a target with an MTP drafter, e.g. "
                         "'google/gemma-4-E2B-it'; got None")
    target = load_target(name_or_path, device=device, dtype=dtype, device_map=device_map,
                         trust_remote_code=trust_remote_code)
    text = target.model.config.get_text_config()
    if getattr(text, "num_mtp_layers", None):
        return target, BuiltinMTPDrafter.from_target(target)
    if text.model_type.startswith("gemma4"):
        assistant = assistant or str(name_or_path).rstrip("/\\") + "-assistant"
        model = Gemma4AssistantDrafter.load(assistant, **_load_kwargs(device, dtype, device_map, trust_remote_code))
        return target, Gemma4AssistantDrafter(model)
    raise ValueError(f"{name_or_path} ({type(target.model).__name__}) has no MTP drafter mtplab can load: load_pair "
                     "takes a Gemma 4 target (with its '-assistant' checkpoint) or a checkpoint whose config has "
                     "num_mtp_layers (DeepSeek-V3, GLM-4.5, ...)")
