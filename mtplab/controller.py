"""The Playground's controller: everything behind the views but the drawing.

A :class:`Controller` owns the target, the drafters it built (one each, reused), the settings, the decoder of the
current run, one worker thread, the plain baseline that times a run, and γ sweeps. Views subscribe with
:meth:`Controller.subscribe` and redraw from what it holds (``shown``, ``plain``, ``error``, ``status``); they never
decode. It runs without a browser or ipywidgets, so tests drive it directly.

All model work happens on the one worker thread (Step included: torch keeps a thread pool per calling thread, and
two pools fight over a small CPU). Events reach subscribers on the thread where they happen:

* ``"started"``: a new run began (views clear);  ``"rounds"``: the live run has new rounds (at most every
  ``refresh_seconds``, and once at its end);  ``"finished"``: a run and its baseline are complete, or it stopped;
* ``"status"``: ``status`` changed;  ``"error"``: ``error`` changed (a bad setting, or a run that failed: the last
  good run is kept and ``shown`` is it again);  ``"sweep"``: ``sweep_points`` grew;  ``"swept"``: the sweep ended;
  ``"reset"``.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from . import costs
from .decoder import SpeculativeDecoder
from .drafters import registry
from .models import Target, load_target
from .trace import Trace, speedup

DEFAULT_PROMPT = "Give three tips for drinking more water every day."  # not a training prompt of the shipped MTP head
LIVE = ("num_draft_tokens", "schedule", "temperature", "top_k", "top_p")  # read by the decoder before every round
SETTINGS = ("prompt", "drafter", "max_new_tokens", "seed") + LIVE  # the rest apply from the next run
LIVE_LABELS = {"num_draft_tokens": "γ", "top_k": "top-k", "top_p": "top-p"}
GAMMAS = tuple(range(1, 9))


def drafter_labels(target: Target) -> dict:
    """Label -> registry name of the drafters that need no download, from the one registry."""
    return {registry.label(name, target): name for name in registry.names(target)}


class Controller:
    def __init__(self, target: Target | None = None, drafter: str | None = None, prompt=DEFAULT_PROMPT,
                 num_draft_tokens: int = 4, schedule: str = "auto", temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, max_new_tokens: int = 64, refresh_seconds: float = 0.3):
        self.target = target if target is not None else load_target()
        self.labels = drafter_labels(self.target)
        if drafter is None:  # the shipped MTP drafter where there is one, else prompt lookup
            mtp = registry.label("mtp", self.target)
            drafter = mtp if mtp in self.labels else registry.label("prompt-lookup", self.target)
        if drafter not in self.labels:
            raise ValueError(f"drafter must be one of {list(self.labels)}, got {drafter!r}")
        self.settings = dict(prompt=prompt, drafter=drafter, max_new_tokens=max_new_tokens, seed=seed,
                             num_draft_tokens=num_draft_tokens, schedule=schedule, temperature=temperature,
                             top_k=top_k, top_p=top_p)
        self.refresh_seconds = refresh_seconds
        self.trace: Trace | None = None  # the last good run (complete or stopped), timed without drawing
        self.plain: Trace | None = None  # ... and its plain baseline (None when it stopped)
        self.decoder: SpeculativeDecoder | None = None  # the run in progress or the last one
        self.marks: dict = {}  # round index -> the setting the user changed before it
        self.error: Exception | None = None
        self.status = ""
        self.sweep_points: list = []  # (γ, measured speedup) of the last sweep, so far
        self._drafters, self._subscribers, self._active = {}, [], []
        self._stream = None  # a run advanced round by round with step()
        self._streaming = False  # the current decoder is between its first and last round
        self._stopping = threading.Event()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtplab-controller")
        self._job: Future | None = None
        # warm the worker up (thread pool, first-call costs) so the first measured run is not penalised
        self._worker.submit(SpeculativeDecoder(self.target, None).generate, self.target.encode("Hello")
                            if self.target.tokenizer is not None else [1, 2], 2)

    # --- subscribers -------------------------------------------------------------------------------------------
    def subscribe(self, callback) -> None:
        """Call ``callback(event)`` on every event (see the module docstring)."""
        self._subscribers.append(callback)

    def _emit(self, event: str) -> None:
        for callback in list(self._subscribers):
            callback(event)

    def _set_status(self, text: str) -> None:
        self.status = text
        self._emit("status")

    def _fail(self, e: Exception | None) -> None:
        self.error = e
        self._emit("error")

    # --- settings ----------------------------------------------------------------------------------------------
    def set(self, name: str, value) -> None:
        """Change one setting. Live ones (``LIVE``) reach a run in progress from its next round (marked in
        ``marks``; a value the decoder refuses raises its ``ValueError``/``TypeError`` and is also kept in
        ``error``); the others apply from the next run, which checks them all."""
        if name not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {name!r}")
        self.settings[name] = value
        dec = self.decoder
        if name not in LIVE or dec is None or not self._streaming:
            return
        try:
            setattr(dec, name, value)
        except (ValueError, TypeError) as e:
            self._fail(e)
            raise
        self.marks[len(dec.trace.rounds)] = f"{LIVE_LABELS.get(name, name)}={value}"
        if self.error is not None:
            self._fail(None)

    def drafter(self, label: str | None = None):
        """The drafter named by ``label`` (default: the setting), built on first use and then reused."""
        label = label or self.settings["drafter"]
        if label not in self.labels:
            raise ValueError(f"drafter must be one of {list(self.labels)}, got {label!r}")
        if label not in self._drafters:
            self._drafters[label] = registry.make(self.labels[label], self.target)
        return self._drafters[label]

    def _decoder(self, drafter=..., **over) -> SpeculativeDecoder:
        live = {k: self.settings[k] for k in LIVE} | over
        return SpeculativeDecoder(self.target, self.drafter() if drafter is ... else drafter, **live)

    def _args(self) -> tuple:
        return self.settings["prompt"], self.settings["max_new_tokens"], self.settings["seed"]

    # --- state -------------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Work is queued or running on the worker."""
        return self._job is not None and not self._job.done()

    @property
    def running(self) -> bool:
        """A run is in progress: on the worker, or paused between steps."""
        return self.busy or self._stream is not None

    @property
    def shown(self) -> Trace | None:
        """What the views show: the run in progress, else the last good run."""
        if self.decoder is not None and self._streaming:
            return self.decoder.trace
        return self.trace

    def wait(self, timeout: float | None = None) -> None:
        """Block until the worker is idle (for scripts and tests)."""
        job = self._job
        if job is not None:
            job.result(timeout)

    # --- runs ----------------------------------------------------------------------------------------------------
    def _start(self):
        """On the worker: a fresh decoder and stream from the settings, or None (the error is kept, the last good
        run still shown). Starting measures this machine's costs for ``schedule="auto"`` the first time."""
        try:
            dec = self._decoder()
            stream = dec.stream(*self._args())  # checks every argument before the first round
        except Exception as e:
            self._fail(e)
            return None
        self.decoder, self.marks, self._streaming = dec, {}, True
        if self._stopping.is_set():  # Stop came between Run and this start: the run ends before its first round
            dec.stop()
        if self.error is not None:
            self._fail(None)
        self._emit("started")
        return stream

    def run(self) -> bool:
        """Decode in the background, then time it against plain decoding; continues a stepped run. Returns
        whether work was queued (False while busy). A bad setting ends it at once, in ``error``."""
        if self.busy:
            return False
        stream, self._stream = self._stream, None
        self._stopping.clear()
        self._job = self._worker.submit(self._run_job, stream)
        return True

    def _run_job(self, stream) -> None:
        stream = stream if stream is not None else self._start()
        if stream is None:
            return
        try:
            last = time.perf_counter()
            for _ in stream:
                if time.perf_counter() - last > self.refresh_seconds:
                    self._emit("rounds")
                    last = time.perf_counter()
            self._emit("rounds")
            self._streaming = False
            self._finish()
        except Exception as e:  # never leave the views on a half-done run without saying why
            self._abandon(e)

    def _abandon(self, e: Exception) -> None:
        """A run failed: keep the last good run, show it again, say why."""
        self._streaming, self._stream, self.decoder = False, None, None
        self._set_status(f"the run failed ({type(e).__name__}); the last good result is kept")
        self._fail(e)
        self._emit("finished")

    def _finish(self) -> None:
        """Time the run: plain decoding and the same speculative run again, back to back, without drawing.

        The live run shared the CPU with the views drawing it, the plain run would not; decoding again with the
        same settings and seed (the same decisions) makes the two timings comparable."""
        live = self.decoder.trace
        self.trace, self.plain = live, None
        if live.stop_reason != "stopped":
            self._set_status("measuring: plain decoding, then this run again without drawing…")
            plain = self._decoder(None, num_draft_tokens=1)
            again = self._decoder(self.decoder.drafter, **{k: getattr(self.decoder, k) for k in LIVE})
            base = self._measure(plain)
            rerun = None if self.marks or base is None else self._measure(again)  # changed mid-run: not replayable
            if rerun is not None and rerun.token_ids != live.token_ids:
                raise RuntimeError("decoding the same settings and seed again gave other tokens: a bug")
            if base is not None:
                self.trace, self.plain = rerun or live, base
        m = self.trace.metrics
        self._set_status(f"stopped after {m.rounds} rounds" if live.stop_reason == "stopped" else
                         f"{m.new_tokens} tokens in {m.rounds} target passes · " + (
                             f"{speedup(self.trace, self.plain):.2f}× plain decoding" if self.plain is not None
                             else "timing stopped"))
        self._emit("finished")

    def _measure(self, dec: SpeculativeDecoder) -> Trace | None:
        """A complete decode of the prompt with ``dec``, or None when Stop came first."""
        if self._stopping.is_set():
            return None
        self._active.append(dec)
        try:
            trace = dec.generate(*self._args())
        finally:
            self._active.remove(dec)
        return None if trace.stop_reason == "stopped" else trace

    def verify_cost(self) -> dict:
        """This machine's measured v(γ) for the target (cached after the first measurement)."""
        return costs.verify_curve(self.target, progress=False)

    def step(self) -> bool:
        """Decode exactly one round (on the worker; this waits for it). Returns whether a round was decoded."""
        if self.busy:
            return False
        self._job = self._worker.submit(self._step_job)
        return self._job.result()

    def _step_job(self) -> bool:
        if self._stream is None:
            self._stopping.clear()
            self._stream = self._start()
            if self._stream is None:
                return False
        try:
            if next(self._stream, None) is None:  # the run is complete
                self._stream, self._streaming = None, False
                self.trace, self.plain = self.decoder.trace, None
                self._set_status(f"{len(self.trace.token_ids)} tokens in {len(self.trace.rounds)} target passes "
                                 "(stepped: Run times a run against plain decoding)")
                self._emit("finished")
            else:
                self._emit("rounds")
        except Exception as e:
            self._abandon(e)
        return True

    def stop(self) -> None:
        """End the run (after its current round) or the measuring or sweep in progress; keep what was decoded."""
        self._stopping.set()
        for dec in [self.decoder, *self._active]:
            if dec is not None:
                dec.stop()
        if self._stream is not None and not self.busy:
            stream, self._stream = self._stream, None
            self._worker.submit(stream.close).result()
            self._streaming = False
            self.decoder.trace.stop_reason = "stopped"
            self.trace, self.plain = self.decoder.trace, None
            self._set_status(f"stopped after {len(self.trace.rounds)} rounds")
            self._emit("finished")

    def reset(self) -> None:
        """Stop, wait, and forget every run (the drafters stay built)."""
        self.stop()
        self.wait()
        self.decoder = self.trace = self.plain = None
        self.marks, self.sweep_points, self.error, self.status = {}, [], None, ""
        self._emit("reset")

    # --- sweeps --------------------------------------------------------------------------------------------------
    def sweep(self, gammas=GAMMAS) -> bool:
        """In the background: decode the prompt at every γ (constant: the curve auto chooses from), each next to
        a plain run, and collect ``sweep_points`` ``[(γ, measured speedup)]`` (a new list, filled as it goes).
        Returns whether it was queued."""
        if self.running:
            return False
        self._stopping.clear()
        self.sweep_points = []
        self._job = self._worker.submit(self._sweep_job, tuple(gammas))
        return True

    def _sweep_job(self, gammas) -> None:
        try:
            plain = self._decoder(None, num_draft_tokens=1)
            for g in gammas:
                a = self._measure(self._decoder(num_draft_tokens=g, schedule="constant"))
                b = self._measure(plain)
                if a is None or b is None:
                    break
                self.sweep_points.append((g, speedup(a, b)))
                self._emit("sweep")
        except (ValueError, TypeError) as e:
            self._fail(e)
        self._emit("swept")
