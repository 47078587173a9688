"""Round inspector: for one round and position, the target's p against the drafter's q, the decision and costs.

For rounds drafted by an MTP drafter (``round.draft_start_position`` is set) it adds an MTP view: which target
position's hidden state seeded the draft, and the run's acceptance by draft position so far — how quickly the head's
guesses fade as it feeds its own state back, step after step. Under the costs, rounds verified as a token tree
(``mtplab.tree``, any drafter) list their branches and the one the target followed, and the target's KV cache rows
are drawn after the verify pass and after the rollback (:func:`cache_view`).
"""
from __future__ import annotations

import html

import ipywidgets as W
import plotly.graph_objects as go

from ..palette import COLORS, faint
from ..trace import per_position_acceptance
from .style import fmt_prob, named_traces

P_BARS, Q_BARS, RESIDUAL_BARS = "p (target)", "q (drafter)", "residual norm(max(0, p−q))"
ACCEPTANCE = "acceptance"
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


def cache_view(rnd, show: int = 12) -> str:
    """HTML: the target's KV cache rows around one round, from the Round's recorded lengths. Before the round the
    cache holds every token but the pending one; the verify pass appends a row for the pending token and for each
    drafted token (or tree node); the rollback keeps the pending row and the accepted drafts' rows and drops the
    rest. The target's own token is the next pending one, outside the cache. At most ``show`` rows are drawn."""
    esc = html.escape
    earlier = rnd.context_len - 1
    added, kept = rnd.target_cache_before - earlier, rnd.target_cache_len - earlier
    texts = [repr(t) for t in rnd.draft_text] if rnd.draft_text else [str(t) for t in rnd.draft_ids]
    color = {"ctx": COLORS["muted"], "kept": COLORS["accepted"], "dropped": COLORS["rejected"]}
    cell = lambda text, kind, strike=False: (
        f'<span class="mtplab-cache-row mtplab-cache-{kind}" style="display:inline-block;margin:1px;padding:1px 4px;'
        f'border:1px solid {color[kind]};border-radius:3px;{"text-decoration:line-through;" if strike else ""}">'
        f"{esc(text)}</span>")
    context = cell(f"… {earlier} rows", "ctx")

    def line(title, rows):
        hidden = len(rows) - show
        rows = rows[-show:] if hidden > 0 else rows
        more = cell(f"+{hidden}", "ctx") if hidden > 0 else ""
        return f"<div><b style='display:inline-block;width:11em'>{title}</b>{context}{more}{''.join(rows)}</div>"

    if rnd.tree_branches:  # a tree pass read every node; the rollback kept the followed branch's accepted rows
        after_verify = [cell("pending", "kept")] + [cell(f"node {i}", "ctx") for i in range(added - 1)]
        after_rollback = [cell("pending", "kept")] + [cell(t, "kept") for t in texts[:kept - 1]]
    else:  # a chain: the rows of the accepted drafts stay, those from the rejected draft on are dropped
        after_verify = [cell(t, "kept" if i < kept else "dropped", strike=i >= kept)
                        for i, t in enumerate(["pending"] + texts[:added - 1])]
        after_rollback = after_verify[:kept]
    nxt = esc(repr(rnd.token_text)) if rnd.token_text else "(end)"
    return (f'<div class="mtplab-cache-view"><small>target KV cache, one box per row: {earlier} rows before the '
            f"round; the verify pass added {added} (the pending token + {added - 1} drafted); the rollback dropped "
            f"{added - kept} and kept {kept}.</small>"
            + line(f"after verify: {rnd.target_cache_before}", after_verify)
            + line(f"after rollback: {rnd.target_cache_len}", after_rollback)
            + f"<small>next pending token (not cached yet): <code>{nxt}</code> · drafter cache "
              f"{rnd.drafter_cache_len} rows</small></div>")


def emitted_texts(trace) -> list:
    """Texts of the tokens the run emitted so far, in order (``None`` where the round kept no text)."""
    out = []
    for r in trace.rounds:
        texts = list(r.draft_text[: r.num_accepted]) if r.draft_text else [None] * r.num_accepted
        out += texts + ([r.token_text or None] if r.token_id is not None else [])
    return out


def token_at(trace, position: int, token_text=None) -> str | None:
    """Text of the token at ``position`` of the run's sequence (prompt, then emitted tokens); ``token_text`` (token
    id -> text, e.g. ``target.token_text``) decodes prompt tokens, which the trace keeps as ids only."""
    n = len(trace.prompt_ids)
    if 0 <= position < n:
        return None if token_text is None else token_text(trace.prompt_ids[position])
    texts = emitted_texts(trace)
    if 0 <= position - n < len(texts):
        text = texts[position - n]
        if text is None and token_text is not None:
            text = token_text(trace.token_ids[position - n])
        return text
    return None


def mtp_note(rnd, trace=None, token_text=None) -> str:
    """HTML: which target hidden state seeded an MTP round ("" for other drafters)."""
    start = rnd.draft_start_position
    if start is None:
        return ""
    esc = html.escape
    quoted = lambda t: "" if t is None else f" (<code>{esc(repr(t))}</code>)"
    this = nxt = None
    if trace is not None:
        this, nxt = token_at(trace, start, token_text), token_at(trace, start + 1, token_text)
    k = rnd.num_drafted
    drafted = ("nothing" if k == 0 else f"position {start + 2}" if k == 1
               else f"positions {start + 2}–{start + 1 + k}")
    return (f"<b>MTP draft</b>: drafted from the target's hidden state at position {start}{quoted(this)}. That state, "
            f"after reading that token, is the one from which the target chose the newest token{quoted(nxt)} "
            f"(position {start + 1}); the head combined it with that token's embedding and drafted {drafted}, "
            f"feeding its own output state back at every step.")


def tree_note(rnd, token_text=None) -> str:
    """HTML: the branches of a tree round and the one the target's greedy choices followed ("" for chain rounds)."""
    if not rnd.tree_branches:
        return ""
    esc = html.escape
    text = (lambda t: esc(repr(token_text(t)))) if token_text is not None else str
    lines = []
    for i, branch in enumerate(rnd.tree_branches):
        label = "main draft" if i == 0 else f"branch {i}"
        toks = " ".join(f"<code>{text(t)}</code>" for t in branch)
        lines.append(f"<b>{label} ← verified</b>: {toks}" if i == rnd.tree_branch else f"{label}: {toks}")
    return (f"<b>Token tree</b>: one target pass read the pending token and {rnd.tree_nodes} tree nodes "
            f"({len(rnd.tree_branches)} branches, shared prefixes merged), each node seeing only its own ancestors. "
            f"The branch the target's greedy choices followed furthest is the draft shown; the cache kept its rows."
            "<br>" + "<br>".join(lines))


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
    """``show(round, pos, trace)`` draws the p-vs-q bars, the accept/reject arithmetic and the round's costs; for MTP
    rounds also the seeding hidden state and the run's acceptance by draft position so far (``trace``: the run
    the round belongs to; ``token_text``: token id -> text, to name prompt tokens)."""

    def __init__(self):
        self.title = W.HTML(EMPTY_NOTE)
        self.fig = go.FigureWidget(
            data=[go.Bar(name=P_BARS, marker_color=COLORS["target"], x=[], y=[]),
                  go.Bar(name=Q_BARS, marker_color=COLORS["drafter"], x=[], y=[]),
                  go.Bar(name=RESIDUAL_BARS, marker_color=COLORS["rejected"], x=[], y=[])],
            layout=go.Layout(barmode="group", height=260, width=720, margin=dict(l=50, r=10, t=10, b=60),
                             xaxis=dict(type="category"), yaxis=dict(title="probability", range=[0, 1]),
                             legend=dict(orientation="h", y=1.15)),
        )
        self.bars = named_traces(self.fig)
        self.costs = W.HTML("")
        self.mtp_note = W.HTML("")
        self.curve = go.FigureWidget(
            data=[go.Bar(name=ACCEPTANCE, marker_color=[], x=[], y=[], text=[], textposition="outside",
                         hovertemplate="position %{x}: %{customdata}<extra></extra>", customdata=[])],
            layout=go.Layout(height=220, width=480, margin=dict(l=50, r=10, t=30, b=40),
                             title=dict(text="", font=dict(size=13), x=0.02),
                             xaxis=dict(title="draft position (0 = first drafted token)", dtick=1),
                             yaxis=dict(title="accepted", range=[0, 1.15], tickformat=".0%")),
        )
        self.acceptance = named_traces(self.curve)[ACCEPTANCE]
        self.mtp_view = W.VBox([self.mtp_note, self.curve], layout=W.Layout(display="none"))
        self.mtp_view.add_class("mtplab-inspector-mtp")
        super().__init__([self.title, self.fig, self.costs, self.mtp_view])
        self.add_class("mtplab-inspector")
        self.selection = None

    def show(self, rnd, pos: int, trace=None, token_text=None) -> None:
        self.selection = (rnd.index, pos)
        labels, p, q, residual = bars(rnd, pos)
        with self.fig.batch_update():
            self.bars[P_BARS].update(x=labels, y=p)
            self.bars[Q_BARS].update(x=labels if q else [], y=q or [])
            self.bars[RESIDUAL_BARS].update(x=labels if residual else [], y=residual or [])
        self.title.value = describe(rnd, pos)
        tree = f"<br>{tree_note(rnd, token_text)}" if rnd.tree_branches else ""
        self.costs.value = f"<small>{costs(rnd)}</small>{tree}{cache_view(rnd)}"
        self._show_mtp(rnd, pos, trace, token_text)

    def _show_mtp(self, rnd, pos, trace, token_text) -> None:
        if rnd.draft_start_position is None:
            self._clear_mtp()
            return
        self.mtp_note.value = mtp_note(rnd, trace, token_text) + (
            "<br><small>Below: how often each draft position was accepted in this run so far (position i accepted / "
            "rounds that drafted position i); the position you clicked is highlighted. Every step after the first starts "
            "from the head's own output state instead of the target's.</small>")
        rounds = list(trace.rounds) if trace is not None else [rnd]
        rounds = [r for r in rounds if r.draft_start_position is not None] or [rnd]
        rates, accepted, drafted = per_position_acceptance(rounds)
        here = pos if pos < rnd.num_drafted else None  # the inspected drafted position, highlighted
        colors = [(faint(COLORS["accepted"]) if i != here else COLORS["accepted"] if i < rnd.num_accepted
                   else COLORS["rejected"]) for i in range(len(rates))]
        with self.curve.batch_update():
            self.acceptance.update(x=list(range(len(rates))), y=rates, marker_color=colors,
                                      text=[f"{r:.0%}" for r in rates],
                                      customdata=[f"{a} of {d} rounds accepted it" for a, d in zip(accepted, drafted)])
            self.curve.layout.title.text = (f"this run so far: acceptance by draft position ({len(rounds)} "
                                            f"round{'s' if len(rounds) != 1 else ''})")
        self.mtp_view.layout.display = ""

    def _clear_mtp(self) -> None:
        self.mtp_note.value = ""
        with self.curve.batch_update():
            self.acceptance.update(x=[], y=[], text=[], customdata=[], marker_color=[])
            self.curve.layout.title.text = ""
        self.mtp_view.layout.display = "none"

    def clear(self) -> None:
        self.selection = None
        with self.fig.batch_update():
            for trace in self.fig.data:
                trace.update(x=[], y=[])
        self.title.value = EMPTY_NOTE
        self.costs.value = ""
        self._clear_mtp()
