"""A self-contained HTML view of a Trace: every token marked with what happened to it, plus the metrics.

Opens without a kernel (``save_html``) and is what a Trace shows in a notebook (``Trace._repr_html_``).
Colours and legend come from ``mtplab.palette`` (Okabe–Ito, each token kind with a second cue), like the widgets'.
It reads a Trace's attributes only: it does not import ``mtplab.trace`` (which imports this module to render itself).
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

from .palette import COLORS, TOKEN_KINDS, kind_css

if TYPE_CHECKING:
    from .trace import Trace

CSS = f"""
.mtplab-trace{{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.9}}
.mtplab-trace .tok{{padding:1px 1px;border-radius:3px;white-space:pre-wrap}}
.mtplab-trace .round-sep{{border-left:1px dashed {COLORS["rule"]};margin:0 2px}}
.mtplab-trace .legend span.tok{{margin-right:12px}}
.mtplab-trace table{{border-collapse:collapse;margin-top:8px}}
.mtplab-trace td{{padding:2px 10px 2px 0}}
""" + kind_css(".mtplab-trace")


def token_tip(rnd, kind, pos) -> str:
    if kind in ("accepted", "rejected") and rnd.p:
        u = rnd.draws[pos] if pos < len(rnd.draws) else None
        a = rnd.accept_probs[pos] if pos < len(rnd.accept_probs) else None
        return (f"round {rnd.index}, position {pos}: p={rnd.p[pos]:.3f} q={rnd.q[pos]:.3f}"
                + ("" if a is None else f" min(1,p/q)={a:.3f}") + ("" if u is None else f" u={u:.3f}"))
    return f"round {rnd.index}: {kind} token from the target"


def tokens_html(trace: Trace) -> str:
    parts = []
    for rnd in trace.rounds:
        for kind, _, text, pos in rnd.token_events():
            parts.append(f'<span class="tok tok-{kind}" title="{html.escape(token_tip(rnd, kind, pos))}" '
                         f'data-round="{rnd.index}" data-pos="{pos}">{html.escape(text)}</span>')
        parts.append('<span class="round-sep"></span>')
    return "".join(parts)


def legend_html() -> str:
    return '<div class="legend">' + "".join(
        f'<span class="tok tok-{k.name}" title="{html.escape(k.description)}">{html.escape(k.label)}</span>'
        for k in TOKEN_KINDS.values()
    ) + "</div>"


def metrics_html(trace: Trace) -> str:
    m = trace.metrics
    rows = [
        ("drafter", trace.config.get("drafter")), ("new tokens / rounds", f"{m.new_tokens} / {m.rounds}"),
        ("acceptance rate", f"{m.acceptance_rate:.2f}"), ("mean acceptance length", f"{m.mean_acceptance_length:.2f}"),
        ("per-position acceptance", " ".join(f"{x:.2f}" for x in m.per_position_acceptance)),
        ("tokens/s", f"{m.tokens_per_second:.1f}"),
        ("time: draft / verify / bookkeeping", f"{m.draft_seconds:.2f} / {m.verify_seconds:.2f} / {m.bookkeeping_seconds:.2f} s"),
    ]
    return "<table>" + "".join(f"<tr><td>{k}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows) + "</table>"


def bars_svg(values, labels, title: str, colors, unit: str = "", width: int = 360, height: int = 150) -> str:
    """A small static bar chart (inline SVG, no script): ``values`` is a list of stacks (lists of numbers)."""
    top = max((sum(v) for v in values), default=0) or 1
    n = max(len(values), 1)
    bw = (width - 40) / n
    parts = [f'<svg class="mtplab-chart" width="{width}" height="{height + 30}" role="img">'
             f'<text x="{width / 2}" y="12" text-anchor="middle" font-size="12">{html.escape(title)}</text>']
    for i, (stack, label) in enumerate(zip(values, labels)):
        y = height
        for v, color in zip(stack, colors):
            h = (height - 20) * v / top
            y -= h
            parts.append(f'<rect x="{35 + i * bw:.1f}" y="{y:.1f}" width="{max(bw - 2, 1):.1f}" height="{h:.1f}" '
                         f'fill="{color}"><title>{html.escape(str(label))}: {v:.3g}{unit}</title></rect>')
        if n <= 16 or i % (n // 8 + 1) == 0:
            parts.append(f'<text x="{35 + (i + .5) * bw:.1f}" y="{height + 14}" text-anchor="middle" '
                         f'font-size="10">{html.escape(str(label))}</text>')
    parts.append(f'<text x="2" y="24" font-size="10">{top:.3g}{unit}</text>'
                 f'<line x1="34" y1="{height}" x2="{width}" y2="{height}" stroke="{COLORS["rule"]}"/></svg>')
    return "".join(parts)


def charts_html(trace: Trace) -> str:
    m = trace.metrics
    acc = bars_svg([[a] for a in m.per_position_acceptance], range(len(m.per_position_acceptance)),
                   "acceptance by draft position", [COLORS["accepted"]])
    times = bars_svg([[1000 * r.draft_seconds, 1000 * r.verify_seconds, 1000 * r.bookkeeping_seconds]
                      for r in trace.rounds], [r.index for r in trace.rounds],
                     "time per round: draft / verify / bookkeeping",
                     [COLORS["draft_time"], COLORS["verify_time"], COLORS["bookkeeping_time"]], " ms")
    return f'<div class="charts">{acc}{times}</div>'


def trace_html(trace: Trace) -> str:
    return (f'<div class="mtplab-trace"><style>{CSS}</style>{legend_html()}'
            f"<div>{tokens_html(trace)}</div>{metrics_html(trace)}{charts_html(trace)}</div>")


def save_html(trace: Trace, path) -> Path:
    """Write a page that shows ``trace`` without a kernel."""
    path = Path(path)
    title = html.escape(trace.prompt[:80])
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>mtplab: {title}</title></head>"
                    f"<body><p><b>Prompt:</b> {html.escape(trace.prompt)}</p>{trace_html(trace)}</body></html>",
                    encoding="utf-8")
    return path
