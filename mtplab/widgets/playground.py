"""The Playground: a real speculative decoder with every control, the token view, the inspector and the dashboard.

Decoding runs in one background worker thread (all model work, Step included, happens there: torch keeps one
thread pool per calling thread, and two pools fight over a small CPU) so the notebook stays responsive; views are
redrawn at most every ``REFRESH_SECONDS`` from the rounds the decoder emitted. Changing the draft length or sampling while a run is going
takes effect from the next round (the decoder reads its settings at every round) and is marked in the token view.
"""
from __future__ import annotations

import html
import time
from concurrent.futures import Future, ThreadPoolExecutor

import ipywidgets as W

from ..decoder import SCHEDULES, SpeculativeDecoder
from .. import costs
from ..drafters import registry
from ..models import Target, load_target
from ..trace import speedup
from .dashboard import GAMMAS, SpeedupDashboard
from .inspector import RoundInspector
from .token_view import TokenView

REFRESH_SECONDS = 0.3  # the browser draws on the same CPU the decoder runs on: redraw sparingly
DEFAULT_PROMPT = "Give three tips for drinking more water every day."  # not a training prompt of the shipped MTP head
MTP_LABEL = registry.ENTRIES["mtp"].label
LIVE = ("num_draft_tokens", "schedule", "temperature", "top_k", "top_p")


def offline_drafters(target: Target) -> dict:
    """Label -> factory for the drafters that need no download (built on first use), from the one registry."""
    return {registry.label(name, target): (lambda name=name: registry.make(name, target))
            for name in registry.names(target)}


class Playground(W.VBox):
    def __init__(self, target: Target | None = None, drafter: str | None = None, prompt: str = DEFAULT_PROMPT,
                 num_draft_tokens: int = 4, temperature: float = 0.0, max_new_tokens: int = 64, seed: int = 0):
        self.target = target if target is not None else load_target()
        self._factories = offline_drafters(self.target)
        self._drafters = {}
        self.prompt = W.Textarea(prompt, layout=W.Layout(width="100%", height="60px"))
        if drafter is None:  # the shipped MTP drafter where there is one, else prompt lookup
            drafter = MTP_LABEL if MTP_LABEL in self._factories else "prompt lookup"
        if drafter not in self._factories:
            raise ValueError(f"drafter must be one of {list(self._factories)}, got {drafter!r}")
        self.drafter = W.Dropdown(options=list(self._factories), value=drafter, description="drafter")
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
        ])
        self.add_class("mtplab-playground")

        self.trace = self.plain = None  # the last good run and its plain baseline
        self.decoder = None
        self._stream = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtplab-playground")
        self._job: Future | None = None
        self._marks = {}
        self.buttons["Run"].on_click(lambda _: self.run())
        self.buttons["Step"].on_click(lambda _: self.step())
        self.buttons["Stop"].on_click(lambda _: self.stop())
        self.buttons["Reset"].on_click(lambda _: self.reset())
        for name in LIVE:
            getattr(self, name).observe(lambda ch, name=name: self._live_change(name, ch["new"]), "value")
        self.tokens.observe(lambda ch: self._select(ch["new"]), "selected")
        self.dashboard.on_sweep = self.sweep
        # warm the worker up (thread pool, first-call costs) so the first measured run is not penalised
        self._worker.submit(SpeculativeDecoder(self.target, None).generate, "Hello", 2)  # runs before any queued job

    # --- settings ----------------------------------------------------------------------------------------------
    def _settings(self) -> dict:
        return dict(num_draft_tokens=self.num_draft_tokens.value, schedule=self.schedule.value,
                    temperature=self.temperature.value, top_k=self.top_k.value, top_p=self.top_p.value)

    def _make_decoder(self, drafter_label=None, **over) -> SpeculativeDecoder:
        label = drafter_label or self.drafter.value
        if label not in self._drafters:
            self._drafters[label] = self._factories[label]()
        return SpeculativeDecoder(self.target, self._drafters[label], **(self._settings() | over))

    def _show_error(self, e: Exception | None) -> None:
        self.error.value = "" if e is None else (
            f"<div style='color:#D55E00'>⚠ {html.escape(str(e))} — the last good result is kept.</div>")

    def _live_change(self, name: str, value) -> None:
        dec = self.decoder
        if dec is None or not self.running:
            return
        try:
            setattr(dec, name, value)
        except (ValueError, TypeError) as e:
            self._show_error(e)
            return
        self._show_error(None)
        label = {"num_draft_tokens": "γ", "top_k": "top-k", "top_p": "top-p"}.get(name, name)
        self._marks[len(dec.trace.rounds)] = f"{label}={value}"

    @property
    def running(self) -> bool:
        return self._busy or self._stream is not None

    @property
    def _busy(self) -> bool:
        return self._job is not None and not self._job.done()

    # --- running -------------------------------------------------------------------------------------------
    def _start(self):
        """A fresh decoder and stream from the current controls, or None (error shown inline)."""
        try:
            dec = self._make_decoder()
            stream = dec.stream(self.prompt.value, self.max_new_tokens.value, self.seed.value)  # checks everything
        except (ValueError, TypeError) as e:
            self._show_error(e)
            return None
        self._show_error(None)
        self.decoder, self._marks, self.plain = dec, {}, None
        self.tokens.clear()
        self.inspector.clear()
        self.dashboard.clear()
        return stream

    def run(self) -> None:
        """Decode the prompt in a background thread, then measure the plain baseline on it."""
        if self.running:
            return
        stream = self._start()
        if stream is not None:
            self._job = self._worker.submit(self._run_thread, stream)

    def _run_thread(self, stream) -> None:
        try:
            last = 0.0
            for _ in stream:
                if time.perf_counter() - last > REFRESH_SECONDS:
                    self._refresh(charts=False)  # charts once at the end: plotly redraws are the costly part
                    last = time.perf_counter()
            self._refresh()
            self._finish()
        except Exception as e:  # never leave the view half-drawn without saying why
            self._show_error(e)

    def _finish(self) -> None:
        """Measure the speedup: plain decoding and the same speculative run again, back to back, without drawing.

        The live run shares the CPU with the browser drawing it, the plain run would not; re-running the
        speculative decode (same seed: the same decisions) makes the two timings comparable."""
        dec = self.decoder
        self.trace = dec.trace
        if dec.trace.stop_reason == "stopped":
            self.tokens.status = f"stopped after {len(dec.trace.rounds)} rounds"
            return
        self.tokens.status = "measuring: plain decoding, then this run again without drawing…"
        args = (self.prompt.value, self.max_new_tokens.value, self.seed.value)
        plain = SpeculativeDecoder(self.target, None, temperature=dec.temperature, top_k=dec.top_k, top_p=dec.top_p)
        self.plain = plain.generate(*args)
        if not self._marks:  # settings changed mid-run cannot be replayed: keep the live timings then
            live = dec.trace
            self.trace = dec.generate(*args)
            assert self.trace.token_ids == live.token_ids  # same seed, same settings: the same run
        self.dashboard.update(self.trace, self.plain, costs.verify_curve(self.target, progress=False))
        m = self.trace.metrics
        self.tokens.status = (f"{m.new_tokens} tokens in {m.rounds} target passes · "
                              f"{speedup(self.trace, self.plain):.2f}× plain decoding")

    def step(self) -> None:
        """Decode exactly one round (on the worker; this waits for it: a round takes well under a second)."""
        if self._busy:
            return
        if self._stream is None:
            self._stream = self._start()
            if self._stream is None:
                return
        if self._worker.submit(next, self._stream, None).result() is None:  # the run is complete
            self._stream = None
            self.trace = self.decoder.trace
        self._refresh()

    def stop(self) -> None:
        if self.decoder is not None:
            self.decoder.stop()
        if self._stream is not None:
            self._worker.submit(self._stream.close).result()
            self._stream = None
            self.decoder.trace.stop_reason = "stopped"
            self.trace = self.decoder.trace
            self.tokens.status = f"stopped after {len(self.trace.rounds)} rounds"

    def wait(self, timeout: float | None = None) -> None:
        """Block until a background run (and its baseline) is finished — for scripts and tests."""
        if self._job is not None:
            self._job.result(timeout)

    def reset(self) -> None:
        self.stop()
        self.wait()
        self.decoder = self.trace = self.plain = None
        self.tokens.clear()
        self.tokens.status = ""
        self.inspector.clear()
        self.dashboard.clear()
        self._show_error(None)

    # --- views -------------------------------------------------------------------------------------------------
    def _refresh(self, charts: bool = True) -> None:
        trace = self.decoder.trace
        self.tokens.show_rounds(list(trace.rounds), self._marks)
        if trace.rounds:
            if charts:
                self.dashboard.update(trace)
            m = trace.metrics
            self.tokens.status = f"round {len(trace.rounds)} · {m.new_tokens} tokens · γ={trace.rounds[-1].num_draft_tokens}"

    def _select(self, sel: dict) -> None:
        trace = self.decoder.trace if self.decoder is not None else None
        r = sel.get("round", -1)
        if trace is None or not 0 <= r < len(trace.rounds):
            return
        self.inspector.show(trace.rounds[r], sel.get("pos", 0), trace, self.target.token_text)

    def sweep(self, gammas=GAMMAS) -> list:
        """Decode the prompt at every γ, each next to a plain run, and plot measured speedups (in the background)."""
        if self.running:
            return []
        points = []

        def work():
            bar = self.dashboard.sweep_progress
            bar.max, bar.value, bar.layout.visibility = len(gammas), 0, "visible"
            try:
                plain = SpeculativeDecoder(self.target, None, **(self._settings() | {"num_draft_tokens": 1}))
                for g in gammas:  # each γ as it is (constant): the curve auto chooses from
                    spec = self._make_decoder(num_draft_tokens=g, schedule="constant")
                    a = spec.generate(self.prompt.value, self.max_new_tokens.value, self.seed.value)
                    b = plain.generate(self.prompt.value, self.max_new_tokens.value, self.seed.value)
                    points.append((g, speedup(a, b)))
                    self.dashboard.show_sweep(points)
                    bar.value += 1
            except (ValueError, TypeError) as e:
                self._show_error(e)
            finally:
                bar.layout.visibility = "hidden"

        self._job = self._worker.submit(work)
        return points
