"""mtplab: see speculative decoding and multi-token prediction work — a real, recorded speculative decoder."""
from . import costs, palette, report, sampling, theory, workshop
from .decoder import SpeculativeDecoder
from .drafters import (BuiltinMTPDrafter, Draft, Drafter, DraftModelDrafter, Gemma4AssistantDrafter, LayerSkipDrafter,
                       MTPDrafter, PromptLookupDrafter, load_drafter)
from .models import Target, fetch_bundled, load_model, load_target, tiny_random_target, truncated_copy
from .pairs import load_pair
from .sampling import SamplingConfig
from .trace import Round, Trace, speedup

__version__ = "0.1.0"

_WIDGETS = ("Playground", "RaceView", "TokenView", "RoundInspector", "SpeedupDashboard", "TheorySimulator")


def __getattr__(name):  # the notebook views load ipywidgets/plotly only when asked for
    if name in _WIDGETS:
        from . import widgets

        return getattr(widgets, name)
    raise AttributeError(f"module 'mtplab' has no attribute {name!r}")

__all__ = [
    "SpeculativeDecoder", "Draft", "Drafter", "DraftModelDrafter", "LayerSkipDrafter", "MTPDrafter", "PromptLookupDrafter",
    "BuiltinMTPDrafter", "Gemma4AssistantDrafter", "load_drafter",
    "Target", "fetch_bundled", "load_model", "load_target", "load_pair", "tiny_random_target", "truncated_copy",
    "SamplingConfig", "Round", "Trace", "speedup", "costs", "palette", "report", "sampling", "theory", "workshop",
]
