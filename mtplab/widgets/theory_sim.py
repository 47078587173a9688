"""Theory simulator: no model, instant. Sliders for α, γ, c; simulated rounds drawn like the token view; expected
vs simulated tokens per round and walltime factor (Leviathan et al.'s model)."""
from __future__ import annotations

import ipywidgets as W
import plotly.graph_objects as go

from .. import theory
from ..palette import COLORS
from .style import named_traces
from .token_view import TokenView

GAMMAS = list(range(1, 17))
EXPECTED, SIMULATED = "expected walltime factor", "this γ (simulated)"


def simulated_round_tokens(sim: theory.Simulation) -> list:
    """The token view's round dicts for simulated rounds (each token drawn as a block)."""
    out = []
    for i, r in enumerate(sim.rounds):
        toks = [["accepted", "■", j, f"simulated round {i}: drafted token {j} accepted"] for j in range(r.accepted)]
        if r.accepted < r.gamma:
            toks.append(["rejected", "■", r.accepted, f"simulated round {i}: drafted token {r.accepted} rejected"])
            toks.append(["correction", "■", r.accepted, "the target's correction"])
        else:
            toks.append(["bonus", "■", r.gamma, "all accepted: the target's bonus token"])
        out.append({"i": i, "k": r.gamma, "mark": "", "toks": toks})
    return out


class TheorySimulator(W.VBox):
    def __init__(self, alpha: float = 0.7, gamma: int = 4, c: float = 0.1, num_rounds: int = 30, seed: int = 0):
        style = {"description_width": "initial"}
        self.alpha = W.FloatSlider(alpha, min=0, max=1, step=0.01, description="α acceptance", style=style)
        self.gamma = W.IntSlider(gamma, min=1, max=16, description="γ draft length", style=style)
        self.c = W.FloatSlider(c, min=0, max=1, step=0.01, description="c draft cost", style=style)
        self.seed = W.IntText(seed, description="seed", layout=W.Layout(width="140px"))
        self.num_rounds = num_rounds
        self.tokens = TokenView()
        self.numbers = W.HTML()
        self.fig = go.FigureWidget(
            data=[go.Scatter(name=EXPECTED, x=GAMMAS, y=[], mode="lines+markers",
                             line=dict(color=COLORS["theory"])),
                  go.Scatter(name=SIMULATED, x=[], y=[], mode="markers",
                             marker=dict(color=COLORS["measured"], size=12, symbol="diamond"))],
            layout=go.Layout(height=260, margin=dict(l=40, r=10, t=10, b=40), xaxis=dict(title="γ"),
                             yaxis=dict(title="speedup × plain"), legend=dict(orientation="h", y=1.15)),
        )
        self.traces = named_traces(self.fig)
        for w in (self.alpha, self.gamma, self.c, self.seed):
            w.observe(lambda _: self.update(), "value")
        super().__init__([W.HBox([self.alpha, self.gamma, self.c, self.seed]), self.numbers, self.tokens, self.fig])
        self.add_class("mtplab-theory")
        self.update()

    def update(self) -> None:
        a, g, c = self.alpha.value, self.gamma.value, self.c.value
        sim = theory.simulate(a, g, c, num_rounds=self.num_rounds, seed=self.seed.value)
        self.simulation = sim
        self.tokens.rounds = simulated_round_tokens(sim)
        best = theory.best_gamma(a, c)
        self.numbers.value = (
            "<table>"
            f"<tr><td>tokens per round</td><td>expected <b>{theory.expected_tokens_per_round(a, g):.2f}</b></td>"
            f"<td>simulated ({self.num_rounds} rounds) <b>{sim.tokens_per_round:.2f}</b></td></tr>"
            f"<tr><td>walltime factor</td><td>expected <b>{theory.walltime_factor(a, g, c):.2f}×</b></td>"
            f"<td>simulated <b>{sim.walltime_factor:.2f}×</b></td></tr>"
            f"<tr><td>best γ for α={a:.2f}, c={c:.2f}</td><td colspan=2><b>{best}</b> "
            f"({theory.walltime_factor(a, best, c):.2f}×)</td></tr></table>")
        with self.fig.batch_update():
            self.traces[EXPECTED].y = [theory.walltime_factor(a, k, c) for k in GAMMAS]
            self.traces[SIMULATED].update(x=[g], y=[sim.walltime_factor])
