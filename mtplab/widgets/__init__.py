"""Notebook views. They read Rounds and Traces; only the Playground drives a decoder."""
from .dashboard import SpeedupDashboard
from .inspector import RoundInspector
from .playground import Playground
from .race import RaceView
from .theory_sim import TheorySimulator
from .token_view import TokenView

__all__ = ["Playground", "RaceView", "RoundInspector", "SpeedupDashboard", "TheorySimulator", "TokenView"]
