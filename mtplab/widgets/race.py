"""The race: a plain run and a speculative run of the same prompt replayed side by side at their recorded pace.

Each lane shows its tokens when the round that emitted them ended on the clock of the recorded run (prefill, then
every round's draft + verify + bookkeeping seconds), so the speculative lane jumps several tokens per target pass
while the plain lane ticks one by one — and a drafter that costs more than it saves visibly loses. Both lanes end at
their trace's ``metrics.seconds``: the ratio of their paces is :func:`mtplab.trace.speedup`, the dashboard's number.
"""
from __future__ import annotations

from pathlib import Path

import anywidget
import traitlets

from ..palette import COLORS, kind_css, tint
from ..trace import Trace, speedup

HERE = Path(__file__).parent
SCOPE = ".mtplab-race"
SPEEDS = (0.25, 0.5, 1.0)  # playback rates offered; 1 is the recorded pace


def race_css() -> str:
    """Layout of race.css, then the token colours (``mtplab.palette``, as the token view) and the lanes' accents."""
    return ((HERE / "race.css").read_text() + kind_css(SCOPE)
            + f"{SCOPE} .lane.spec .bar {{ background: {COLORS['accepted']}; }}\n"
            + f"{SCOPE} .lane.plain .bar {{ background: {COLORS['muted']}; }}\n"
            + f"{SCOPE} .summary, {SCOPE} .clock {{ color: {COLORS['muted']}; }}\n"
            + f"{SCOPE} .lane, {SCOPE} .lane .pass {{ border-color: {COLORS['rule']}; }}\n"
            + f"{SCOPE} .lane .track {{ background: {tint(COLORS['rule'])}; }}\n")


def lane(trace: Trace, name: str, key: str) -> dict:
    """A trace as the browser replays it: ``{"key", "name", "seconds", "tokens", "passes", "events"}`` where
    ``events`` is ``[[t, [[kind, text], ...]], ...]``: at ``t`` seconds into the run, the round that just ended showed
    these tokens (rejected drafts are left out: they never reach the text). The last ``t`` is ``metrics.seconds``."""
    t, events = trace.prefill_seconds, []
    for r in trace.rounds:
        t += r.draft_seconds + r.verify_seconds + r.bookkeeping_seconds
        events.append([t, [[kind, text] for kind, _, text, _ in r.token_events() if kind != "rejected"]])
    m = trace.metrics
    return {"key": key, "name": name, "seconds": m.seconds, "tokens": m.new_tokens, "passes": m.rounds,
            "events": events}


def race_summary(spec: Trace, plain: Trace) -> str:
    """What the race shows, in words, from the same formula as the dashboard."""
    s, p, x = spec.metrics, plain.metrics, speedup(spec, plain)
    verdict = "faster" if x >= 1 else "slower"
    return (f"speculative: {s.new_tokens} tokens in {s.seconds:.2f} s ({s.rounds} target passes) · plain: "
            f"{p.new_tokens} tokens in {p.seconds:.2f} s ({p.rounds} passes) → {x:.2f}× plain decoding, "
            f"{verdict} on this machine in this run")


class RaceView(anywidget.AnyWidget):
    """``RaceView(spec, plain)``: the two runs replayed side by side (autoplay, then ▶ replay)."""
    _esm = HERE / "race.js"
    _css = race_css()
    lanes = traitlets.List(traitlets.Dict()).tag(sync=True)
    summary = traitlets.Unicode("").tag(sync=True)
    speeds = traitlets.List(list(SPEEDS)).tag(sync=True)

    def __init__(self, spec: Trace | None = None, plain: Trace | None = None, **kw):
        super().__init__(**kw)
        if spec is not None:
            self.show(spec, plain)

    def show(self, spec: Trace, plain: Trace) -> None:
        """Replay these two runs of one prompt (the speculative one first, then its plain baseline)."""
        if plain is None or any(r.num_drafted for r in plain.rounds):
            raise ValueError("the second trace must be a plain run (SpeculativeDecoder(target, None)): got "
                             + ("None" if plain is None else f"one that drafted (drafter={plain.config.get('drafter')!r})"))
        if spec.prompt_ids != plain.prompt_ids:
            raise ValueError("the two runs decoded different prompts: a race needs the same prompt")
        self.summary = race_summary(spec, plain)
        self.lanes = [lane(plain, "plain decoding", "plain"),
                      lane(spec, f"speculative · {spec.config.get('drafter')}", "spec")]

    def clear(self) -> None:
        self.lanes, self.summary = [], ""
