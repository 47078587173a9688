"""Round inspector: for one round and position, the target's p against the drafter's q, the decision and costs."""
from __future__ import annotations

import html

import ipywidgets as W
import plotly.graph_objects as go

from .style import COLORS, fmt_prob

EMPTY_NOTE = "Click a token in the token view to inspect its round."


def describe(rnd, pos: int) -> str:
    """One-paragraph account of what happened at ``pos`` of ``rnd`` (HTML)."""
    esc = html.escape
    if pos < rnd.num_drafted and pos <= rnd.num_accepted:
        tok = rnd.draft_text[pos] if rnd.draft_text else str(rnd.draft_ids[pos])
        a = rnd.accept_probs[pos]
        u = rnd.draws[pos]
        ok = pos < rnd.num_accepted
        if u is None:
            test = (f"greedy: the target's top token {'is' if ok else 'is not'} the drafted one → "
                    f"<b>{'accepted' if ok else 'rejected'}</b>")
        else:
            test = (f"keep with probability min(1, p/q) = {a:.3f}; draw u = {u:.3f} "
                    f"{'<' if ok else '≥'} {a:.3f} → <b>{'accepted' if ok else 'rejected'}</b>")
        return (f"Round {rnd.index}, drafted position {pos}: <code>{esc(repr(tok))}</code> with "
                f"p = {fmt_prob(rnd.p[pos])}, q = {fmt_prob(rnd.q[pos])}. {test}.")
    kind = rnd.token_kind
    why = {"bonus": "every drafted token was accepted, so the target's last row gives one more token for free",
           "correction": "the drafted token here was rejected; the target resampled from norm(max(0, p − q))",
           "plain": "nothing was drafted; the target chose this token on its own"}[kind]
    return f"Round {rnd.index}, position {pos}: <code>{esc(repr(rnd.token_text))}</code> is a <b>{kind}</b> token — {why}."


def costs(rnd) -> str:
    ms = lambda s: f"{1000 * s:.1f} ms"
    return (f"draft {ms(rnd.draft_seconds)} · verify {ms(rnd.verify_seconds)} · bookkeeping "
            f"{ms(rnd.bookkeeping_seconds)} | target cache {rnd.target_cache_before} → {rnd.target_cache_len} "
            f"after rollback (−{rnd.target_cache_before - rnd.target_cache_len}) · drafter cache "
            f"{rnd.drafter_cache_len}"
            + ("" if rnd.draft_start_position is None else f" · drafted from target position {rnd.draft_start_position}"))


def bars(rnd, pos: int):
    """``(labels, p, q, residual)`` for the chart at ``pos``; q/residual are None where they do not apply."""
    if pos < rnd.num_drafted and rnd.candidates:
        rows = rnd.candidates[pos]
        labels = [repr(r[1]) for r in rows]
        p = [r[2] for r in rows]
        q = [r[3] for r in rows]
    elif pos < len(rnd.p_top):
        rows = rnd.p_top[pos]
        labels, p, q = [repr(r[1]) for r in rows], [r[2] for r in rows], None
    else:
        return [], [], None, None
    residual = None
    if rnd.residual_top and pos == rnd.num_accepted and rnd.token_kind == "correction":
        res = {r[0]: r[2] for r in rnd.residual_top}
        ids = [r[0] for r in rows]
        extra = [r for r in rnd.residual_top if r[0] not in ids]
        labels += [repr(r[1]) for r in extra]
        p += [None] * len(extra)
        q = None if q is None else q + [None] * len(extra)
        residual = [res.get(i) for i in ids] + [r[2] for r in extra]
    return labels, p, q, residual


class RoundInspector(W.VBox):
    """``show(round, pos)`` draws the p-vs-q bars, the accept/reject arithmetic and the round's costs."""

    def __init__(self):
        self.title = W.HTML(EMPTY_NOTE)
        self.fig = go.FigureWidget(
            data=[go.Bar(name="p (target)", marker_color=COLORS["target"], x=[], y=[]),
                  go.Bar(name="q (drafter)", marker_color=COLORS["drafter"], x=[], y=[]),
                  go.Bar(name="residual norm(max(0, p−q))", marker_color=COLORS["rejected"], x=[], y=[])],
            layout=go.Layout(barmode="group", height=260, width=720, margin=dict(l=50, r=10, t=10, b=60),
                             xaxis=dict(type="category"), yaxis=dict(title="probability", range=[0, 1]),
                             legend=dict(orientation="h", y=1.15)),
        )
        self.costs = W.HTML("")
        super().__init__([self.title, self.fig, self.costs])
        self.add_class("mtplab-inspector")
        self.selection = None

    def show(self, rnd, pos: int) -> None:
        self.selection = (rnd.index, pos)
        labels, p, q, residual = bars(rnd, pos)
        with self.fig.batch_update():
            self.fig.data[0].update(x=labels, y=p)
            self.fig.data[1].update(x=labels if q else [], y=q or [])
            self.fig.data[2].update(x=labels if residual else [], y=residual or [])
        self.title.value = describe(rnd, pos)
        self.costs.value = f"<small>{costs(rnd)}</small>"

    def clear(self) -> None:
        self.selection = None
        with self.fig.batch_update():
            for trace in self.fig.data:
                trace.update(x=[], y=[])
        self.title.value = EMPTY_NOTE
        self.costs.value = ""
