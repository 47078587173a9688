"""The token stream view: the text as it grows, every token marked with what happened to it."""
from __future__ import annotations

from pathlib import Path

import anywidget
import traitlets

from ..palette import COLORS, TOKEN_KINDS, kind_css, text_shade
from ..report import token_tip

HERE = Path(__file__).parent
SCOPE = ".mtplab-token-view"


def token_view_css() -> str:
    """The view's stylesheet: the layout rules of token_view.css, then its colours, all from ``mtplab.palette``."""
    setting, auto, rule = COLORS["setting_change"], COLORS["auto_change"], COLORS["rule"]
    return ((HERE / "token_view.css").read_text() + kind_css(SCOPE) + "\n".join((
        f"{SCOPE} .round {{ border-right-color: {rule}; }}",
        f"{SCOPE} .tok.selected {{ outline-color: {COLORS['selected']}; }}",
        f"{SCOPE} .setting-change {{ color: {text_shade(setting)}; border-color: {setting}; }}",
        f"{SCOPE} .auto-change {{ color: {text_shade(auto)}; border-color: {auto}; }}",
        f"{SCOPE} .status {{ color: {COLORS['muted']}; }}",
    )) + "\n")


def legend_items() -> list:
    """``[[kind, label, description], ...]``: the legend the browser draws above the tokens, in palette order."""
    return [[k.name, k.label, k.description] for k in TOKEN_KINDS.values()]


def round_tokens(rnd, mark: str = "", auto: str = "") -> dict:
    """The part of a Round the browser needs: ``{"i", "k", "mark", "auto", "toks": [[kind, text, pos, tip], ...]}``
    (``k``: the draft length the round asked for, shown as ``data-k`` on the round's span; ``mark``: a setting the
    user changed before it; ``auto``: the draft length ``schedule="auto"`` switched to before it)."""
    return {"i": rnd.index, "k": rnd.num_draft_tokens, "mark": mark, "auto": auto,
            "toks": [[kind, text, pos, token_tip(rnd, kind, pos)] for kind, _, text, pos in rnd.token_events()]}


def auto_changes(rounds) -> dict:
    """Round index -> label, for the rounds before which ``schedule="auto"`` chose another draft length."""
    out, before = {}, None
    for r in rounds:
        if r.expected_speedup is not None and r.num_draft_tokens != before:
            out[r.index] = f"γ={r.num_draft_tokens}, expects {r.expected_speedup:.2f}×"
        before = r.num_draft_tokens
    return out


class TokenView(anywidget.AnyWidget):
    _esm = HERE / "token_view.js"
    _css = token_view_css()
    legend = traitlets.List(legend_items()).tag(sync=True)  # [[kind, label, description], ...]
    rounds = traitlets.List(traitlets.Dict()).tag(sync=True)
    selected = traitlets.Dict({"round": -1, "pos": -1}).tag(sync=True)
    status = traitlets.Unicode("").tag(sync=True)

    def show_rounds(self, rounds, marks: dict | None = None) -> None:
        """Show exactly these rounds (an extension of what is shown is sent as a whole list, drawn incrementally)."""
        marks, auto = marks or {}, auto_changes(rounds)
        self.rounds = [round_tokens(r, marks.get(r.index, ""), auto.get(r.index, "")) for r in rounds]

    def clear(self) -> None:
        self.rounds = []
        self.selected = {"round": -1, "pos": -1}
