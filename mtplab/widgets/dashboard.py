"""Speedup dashboard: live metrics, per-position acceptance, per-round time bars, and theory vs measurement."""
from __future__ import annotations

import html

import ipywidgets as W
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .. import theory
from ..costs import cost_model
from ..palette import COLORS
from ..trace import GLOSSARY, conditional_acceptance, speedup
from .style import named_traces

GAMMAS = list(range(1, 9))
# The figure's traces, addressed by name (a trace's name is its legend label): adding one never redraws another.
ACCEPTANCE = "accepted"
TIME_BARS = {  # name: (Round attribute, palette colour)
    "draft": ("draft_seconds", "draft_time"),
    "verify": ("verify_seconds", "verify_time"),
    "bookkeeping": ("bookkeeping_seconds", "bookkeeping_time"),
}
THEORY = "theory (Leviathan, v=1)"
THEORY_MEASURED_V = "theory (measured v(γ))"
MEASURED = "measured"
SWEEP = "sweep"


class SpeedupDashboard(W.VBox):
    """``update(spec, plain=None)`` redraws from traces only. ``on_sweep`` (set by the Playground) runs a γ sweep.
    ``traces``: the figure's plotly traces by name (``ACCEPTANCE``, the ``TIME_BARS`` keys, ``THEORY``, ...)."""

    def __init__(self):
        self.metrics = W.HTML("<i>No run yet.</i>")
        self.fig = go.FigureWidget(make_subplots(
            rows=1, cols=3, column_widths=[0.25, 0.4, 0.35],
            subplot_titles=("per-position acceptance (as vLLM counts it)", "time per round", "speedup vs draft length γ")))
        f = self.fig
        f.add_bar(name=ACCEPTANCE, x=[], y=[], marker_color=COLORS["accepted"], row=1, col=1, showlegend=False)
        for name, (_, color) in TIME_BARS.items():
            f.add_bar(name=name, x=[], y=[], marker_color=COLORS[color], row=1, col=2)
        f.add_scatter(name=THEORY, x=[], y=[], mode="lines", line=dict(color=COLORS["theory"], dash="dot"), row=1, col=3)
        f.add_scatter(name=THEORY_MEASURED_V, x=[], y=[], mode="lines", line=dict(color=COLORS["theory"]), row=1, col=3)
        f.add_scatter(name=MEASURED, x=[], y=[], mode="markers",
                      marker=dict(color=COLORS["measured"], size=10, symbol="diamond"), row=1, col=3)
        f.add_scatter(name=SWEEP, x=[], y=[], mode="markers+lines", marker=dict(color=COLORS["sweep"], size=7),
                      row=1, col=3)
        self.traces = named_traces(f)
        f.update_layout(barmode="stack", height=320, width=900, margin=dict(l=40, r=10, t=40, b=40),
                        legend=dict(orientation="h", y=-0.25))
        f.update_yaxes(range=[0, 1.05], row=1, col=1)
        f.update_yaxes(title_text="ms", row=1, col=2)
        f.update_yaxes(title_text="× plain", row=1, col=3)
        f.update_xaxes(title_text="position", row=1, col=1)
        f.update_xaxes(title_text="round", row=1, col=2)
        f.update_xaxes(title_text="γ", row=1, col=3)
        self.sweep_button = W.Button(description="Sweep γ = 1…8", icon="line-chart",
                                     tooltip="decode the prompt at every draft length, with and without the drafter")
        self.sweep_progress = W.IntProgress(min=0, max=len(GAMMAS), layout=W.Layout(width="200px", visibility="hidden"))
        self.sweep_button.on_click(lambda _: self.on_sweep and self.on_sweep())
        self.on_sweep = None
        super().__init__([self.metrics, self.fig, W.HBox([self.sweep_button, self.sweep_progress])])
        self.add_class("mtplab-dashboard")

    def update(self, spec, plain=None, verify_cost: dict | None = None) -> None:
        """Redraw from ``spec`` (and its plain baseline). ``verify_cost``: this machine's measured v(γ) for the
        theory curve (default: the one an auto run recorded, else the verify times of the γ this run used)."""
        m = spec.metrics
        if verify_cost is None and spec.config.get("verify_cost"):
            verify_cost = dict(enumerate(spec.config["verify_cost"]))
        rows = [("mean acceptance length", f"{m.mean_acceptance_length:.2f} tokens / target pass"),
                ("acceptance rate", f"{m.acceptance_rate:.2f} of drafted tokens"),
                ("conditional acceptance", " ".join(f"{a:.2f}" for a in conditional_acceptance(spec.rounds))
                 + " by draft position (given the ones before)"),
                ("tokens/s", f"{m.tokens_per_second:.1f}")]
        with self.fig.batch_update():
            t = self.traces
            t[ACCEPTANCE].update(x=list(range(len(m.per_position_acceptance))), y=m.per_position_acceptance)
            idx = [r.index for r in spec.rounds]
            for name, (key, _) in TIME_BARS.items():
                t[name].update(x=idx, y=[1000 * getattr(r, key) for r in spec.rounds])
            if plain is not None and plain.rounds and m.new_tokens:
                s = speedup(spec, plain)
                cm = cost_model(spec, plain)
                vc = verify_cost or cm["verify_cost"] or None
                rounds = spec.rounds
                gamma = sum(r.num_draft_tokens for r in rounds) / len(rounds)  # = the setting, unless auto chose
                g = max(1, round(gamma))
                rows += [("measured speedup", f"<b>{s:.2f}×</b> vs plain decoding (same prompt, same run)"),
                         ("α", f"α ≈ {cm['alpha']:.2f}: the i.i.d. estimate theory takes (the acceptance rate "
                                f"above also counts drafted tokens after a rejection, so it is lower)"),
                         ("c", f"c ≈ {cm['c']:.3f} (a drafted token's seconds / a plain step's)"),
                         ("theory at γ", f"{theory.walltime_factor(cm['alpha'], g, cm['c']):.2f}× (Leviathan), "
                          f"{theory.walltime_factor(cm['alpha'], g, cm['c'], vc):.2f}× (measured v(γ))")]
                auto = [r for r in rounds if r.expected_speedup is not None]
                if auto:
                    counts = {}
                    for r in auto:
                        counts[r.num_draft_tokens] = counts.get(r.num_draft_tokens, 0) + 1
                    chosen = ", ".join(f"γ={k} ×{n}" for k, n in sorted(counts.items()))
                    expected = sum(r.expected_speedup for r in auto) / len(auto)
                    rows.append(("auto draft length", f"chose {chosen} (γ=0: a plain step) from c = "
                                 f"{spec.config.get('draft_cost', 0):.3f}, v(γ) and the live acceptance; expected "
                                 f"{expected:.2f}×, measured {s:.2f}×"))
                if spec.config.get("temperature") == 0:
                    same = spec.token_ids == plain.token_ids[: len(spec.token_ids)]
                    rows.append(("greedy output", "identical to plain ✓" if same else "DIFFERS from plain ✗"))
                t[THEORY].update(x=GAMMAS, y=[theory.walltime_factor(cm["alpha"], g, cm["c"]) for g in GAMMAS])
                t[THEORY_MEASURED_V].update(x=GAMMAS, y=[theory.walltime_factor(cm["alpha"], g, cm["c"], vc)
                                                         for g in GAMMAS])
                t[MEASURED].update(x=[gamma], y=[s])
        self.metrics.value = "<table class='mtplab-metrics'>" + "".join(
            f"<tr><td title='{html.escape(GLOSSARY.get(k, ''), quote=True)}'>{html.escape(k)}</td><td>{v}</td></tr>"
            for k, v in rows) + "</table>"

    def show_sweep(self, points) -> None:
        """``points``: ``[(γ, measured speedup), ...]`` from a sweep."""
        with self.fig.batch_update():
            self.traces[SWEEP].update(x=[g for g, _ in points], y=[s for _, s in points])

    def clear(self) -> None:
        with self.fig.batch_update():
            for t in self.traces.values():
                t.update(x=[], y=[])
        self.metrics.value = "<i>No run yet.</i>"
