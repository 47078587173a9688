"""Drafters: one file per kind behind the interface in ``base``."""
from .base import Draft, Drafter
from .builtin_mtp import BuiltinMTPDrafter
from .draft_model import DraftModelDrafter, LayerSkipDrafter
from .gemma4 import Gemma4AssistantDrafter
from .mtp import MTPDrafter, MTPHead, load_drafter
from .prompt_lookup import PromptLookupDrafter

__all__ = ["Draft", "Drafter", "BuiltinMTPDrafter", "DraftModelDrafter", "Gemma4AssistantDrafter", "LayerSkipDrafter",
           "MTPDrafter", "MTPHead", "PromptLookupDrafter", "load_drafter"]
