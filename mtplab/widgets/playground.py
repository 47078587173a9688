"""The Playground: a real speculative decoder with every control, the token view, the inspector and the dashboard.

A view over a :class:`mtplab.controller.Controller`, which decodes (on its worker thread), times and sweeps: the
controls write its settings, the buttons call it, and its events redraw the views from the traces it holds.
Changing the draft length or sampling while a run is going takes effect from the next round and is marked in the
token view.
"""
from __future__ import annotations

import html

import ipywidgets as W

from ..controller import DEFAULT_PROMPT, LIVE, Controller
from ..decoder import SCHEDULES
from ..drafters import registry
from ..models import Target
from ..palette import COLORS
from .dashboard import GAMMAS, SpeedupDashboard
from .inspector import RoundInspector
from .race import RaceView
from .token_view import TokenView

MTP_LABEL = registry.ENTRIES["mtp"].label
CONTROLS = ("prompt", "drafter", "max_new_tokens", "seed") + LIVE  # widget name = controller setting name


class Playground(W.VBox):
    def __init__(self, target: Target | None = None, drafter: str | None = None, prompt: str = DEFAULT_PROMPT,
                 num_draft_tokens: int = 4, temperature: float = 0.0, max_new_tokens: int = 64, seed: int = 0):
        self.controller = ctrl = Controller(target, drafter, prompt, num_draft_tokens, temperature=temperature,
                                            seed=seed, max_new_tokens=max_new_tokens)
        self.prompt = W.Textarea(prompt, layout=W.Layout(width="100%", height="60px"))
        self.drafter = W.Dropdown(options=list(ctrl.labels), value=ctrl.settings["drafter"], description="drafter")
        self.num_draft_tokens = W.IntSlider(num_draft_tokens, min=1, max=16, description="draft length γ",
                                            continuous_update=False, style={"description_width": "initial"})
        self.schedule = W.ToggleButtons(options=list(SCHEDULES), value="auto", style={"button_width": "80px"},
                                        tooltips=["γ per round from this machine's measured costs and the live "
                                                  "acceptance (the slider is the most it drafts; γ=0: a plain step)",
                                                  "always the slider's γ", "+2 after a full accept, -1 otherwise"])
        self.temperature = W.FloatText(temperature, description="temperature", step=0.1, layout=W.Layout(width="170px"))
        self.top_k = W.IntText(0, description="top-k", layout=W.Layout(width="140px"))
        self.top_p = W.FloatText(1.0, description="top-p", step=0.05, layout=W.Layout(width="140px"))
        self.seed = W.IntText(seed, description="seed", layout=W.Layout(width="140px"))
        self.max_new_tokens = W.IntText(max_new_tokens, description="max new tokens", layout=W.Layout(width="190px"),
                                        style={"description_width": "initial"})
        self.buttons = {name: W.Button(description=name, icon=icon, layout=W.Layout(width="90px"))
                        for name, icon in (("Run", "play"), ("Step", "step-forward"), ("Stop", "stop"), ("Reset", "undo"))}
        self.buttons["Run"].button_style = "success"
        self.error = W.HTML("")
        self.tokens = TokenView()
        self.inspector = RoundInspector()
        self.dashboard = SpeedupDashboard()
        self.race = RaceView()  # after a timed run: it and its plain baseline replayed side by side
        for cls, w in (("mtplab-draft-length", self.num_draft_tokens), ("mtplab-error", self.error),
                       ("mtplab-prompt", self.prompt), ("mtplab-drafter", self.drafter)):
            w.add_class(cls)
        for name, b in self.buttons.items():
            b.add_class(f"mtplab-{name.lower()}")
        super().__init__([
            self.prompt,
            W.HBox([self.drafter, self.num_draft_tokens, self.schedule]),
            W.HBox([self.temperature, self.top_k, self.top_p, self.seed, self.max_new_tokens]),
            W.HBox(list(self.buttons.values())), self.error, self.tokens, self.inspector, self.dashboard,
            self.race,
        ])
        self.add_class("mtplab-playground")

        self.buttons["Run"].on_click(lambda _: self.run())
        self.buttons["Step"].on_click(lambda _: self.step())
        self.buttons["Stop"].on_click(lambda _: self.stop())
        self.buttons["Reset"].on_click(lambda _: self.reset())
        for name in CONTROLS:
            getattr(self, name).observe(lambda ch, name=name: self._set(name, ch["new"]), "value")
        self.tokens.observe(lambda ch: self._select(ch["new"]), "selected")
        self.dashboard.on_sweep = self.sweep
        ctrl.subscribe(self._on)

    # --- what the notebook calls: the controller's --------------------------------------------------------------
    target = property(lambda self: self.controller.target)
    trace = property(lambda self: self.controller.trace, doc="the last good run (complete or stopped)")
    plain = property(lambda self: self.controller.plain, doc="... and the plain run that timed it")
    decoder = property(lambda self: self.controller.decoder)
    running = property(lambda self: self.controller.running)

    def run(self) -> None:
        """Decode the prompt in the background (or finish a stepped run), then time it against plain decoding."""
        self.controller.run()

    def step(self) -> None:
        """Decode exactly one round."""
        self.controller.step()

    def stop(self) -> None:
        self.controller.stop()

    def reset(self) -> None:
        self.controller.reset()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the background work is finished — for scripts and tests."""
        self.controller.wait(timeout)

    def sweep(self, gammas=GAMMAS) -> list:
        """Decode the prompt at every γ, each next to a plain run, and plot the measured speedups (in the
        background); returns the list of ``(γ, speedup)`` it fills."""
        if self.controller.sweep(gammas):
            bar = self.dashboard.sweep_progress
            bar.max, bar.value, bar.layout.visibility = len(gammas), 0, "visible"
        return self.controller.sweep_points

    # --- drawing: only from what the controller holds ----------------------------------------------------------
    def _set(self, name: str, value) -> None:
        try:
            self.controller.set(name, value)
        except (ValueError, TypeError):
            pass  # the controller keeps the error and tells _on, which shows it inline

    def _on(self, event: str) -> None:
        ctrl = self.controller
        if event in ("started", "reset"):
            self.tokens.clear()
            self.inspector.clear()
            self.dashboard.clear()
            self.race.clear()
            self.tokens.status = ctrl.status
        elif event == "rounds":
            trace = ctrl.shown
            self.tokens.show_rounds(list(trace.rounds), dict(ctrl.marks))
            if trace.rounds:
                self.tokens.status = (f"round {len(trace.rounds)} · {len(trace.token_ids)} tokens · "
                                      f"γ={trace.rounds[-1].num_draft_tokens}")
        elif event == "finished":
            self._draw(ctrl.shown, ctrl.plain)
            self.tokens.status = ctrl.status
        elif event == "status":
            self.tokens.status = ctrl.status
        elif event == "error":
            e = ctrl.error
            self.error.value = "" if e is None else (
                f"<div style='color:{COLORS['error']}'>⚠ {html.escape(str(e))} — the last good result is kept.</div>")
        elif event in ("sweep", "swept"):
            points = list(ctrl.sweep_points)
            self.dashboard.show_sweep(points)
            self.dashboard.sweep_progress.value = len(points)
            if event == "swept":
                self.dashboard.sweep_progress.layout.visibility = "hidden"

    def _draw(self, trace, plain=None) -> None:
        """Every view from one trace (None: empty views)."""
        if trace is None:
            self.tokens.clear()
            self.inspector.clear()
            self.dashboard.clear()
            self.race.clear()
            return
        self.tokens.show_rounds(list(trace.rounds), dict(self.controller.marks))
        if not trace.rounds:
            self.dashboard.clear()
        elif plain is not None:
            self.dashboard.update(trace, plain, self.controller.verify_cost())
            self.race.show(trace, plain)
        else:
            self.dashboard.update(trace)
            self.race.clear()

    def _select(self, sel: dict) -> None:
        trace = self.controller.shown
        r = sel.get("round", -1)
        if trace is None or not 0 <= r < len(trace.rounds):
            return
        self.inspector.show(trace.rounds[r], sel.get("pos", 0), trace, self.target.token_text)
