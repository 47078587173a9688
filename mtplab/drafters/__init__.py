"""Drafters: one file per kind behind the interface in ``base``."""
from .base import Draft, Drafter
from .draft_model import DraftModelDrafter, LayerSkipDrafter
from .mtp import MTPDrafter, MTPHead
from .prompt_lookup import PromptLookupDrafter

__all__ = ["Draft", "Drafter", "DraftModelDrafter", "LayerSkipDrafter", "MTPDrafter", "MTPHead", "PromptLookupDrafter"]
