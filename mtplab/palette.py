"""The one palette: every colour mtplab draws with, and what each token colour means. Views read it; none types a
colour of its own.

Colours are Okabe & Ito's colour-blind-safe set (2008, "Color Universal Design"). Colour never carries a meaning
alone: every token kind also has a second cue (strike-through, underline, overline) that survives grey-scale
printing and any colour-vision deficiency. Shades (text on a tinted background, tints, faint bars, terminal
colours) are computed from the base colours here, never typed as separate values.

Plain Python, no ipywidgets: the static HTML report, the command line and the notebook widgets all import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

OKABE_ITO = {
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
    "black": "#000000",
}
GREY = "#999999"  # rules and separators
DARK_GREY = "#555555"  # secondary text
WHITE = "#FFFFFF"

TINT_ALPHA = 0.15  # a token's background: its colour at this opacity
MIN_CONTRAST = 5.0  # a token's text shade on its own tint: WCAG AA (4.5) with a margin for an off-white page
FAINT = 0.6  # faint(): the share of white mixed into a colour for bars that are context, not the point


@dataclass(frozen=True)
class TokenKind:
    """How one kind of token (``Round.token_events`` kinds) is shown."""
    name: str
    color: str
    label: str  # legend text
    description: str  # what happened to a token of this kind (legend tooltip)
    decoration: str = ""  # the second cue: a CSS text-decoration line ("line-through", "underline", "overline")
    bold: bool = False
    tinted: bool = True  # drawn on a tint of its colour (plain target tokens are not: they are the ordinary text)


TOKEN_KINDS = {k.name: k for k in (
    TokenKind("accepted", OKABE_ITO["bluish_green"], "accepted", "drafted and accepted"),
    TokenKind("rejected", OKABE_ITO["vermillion"], "rejected", "drafted and rejected (dropped)", "line-through"),
    TokenKind("correction", OKABE_ITO["orange"], "correction", "correction: resampled by the target after a rejection",
              "underline"),
    TokenKind("bonus", OKABE_ITO["blue"], "bonus", "bonus: the target's free token after a fully accepted draft",
              "overline", bold=True),
    TokenKind("plain", DARK_GREY, "target only", "target token, nothing drafted", tinted=False),
)}

COLORS = {
    **{k.name: k.color for k in TOKEN_KINDS.values()},
    # charts
    "target": OKABE_ITO["blue"],  # the target's p
    "drafter": OKABE_ITO["orange"],  # the drafter's q
    "theory": OKABE_ITO["reddish_purple"],
    "measured": OKABE_ITO["black"],
    "sweep": OKABE_ITO["blue"],
    "draft_time": OKABE_ITO["orange"],
    "verify_time": OKABE_ITO["blue"],
    "bookkeeping_time": GREY,
    # page furniture
    "error": OKABE_ITO["vermillion"],  # an inline error message
    "rule": GREY,  # round separators, axis lines
    "muted": DARK_GREY,  # status lines
    "selected": OKABE_ITO["black"],  # the outline of the selected token
    "setting_change": OKABE_ITO["reddish_purple"],  # a setting changed during a run (⚙)
    "auto_change": OKABE_ITO["blue"],  # schedule="auto" chose another draft length (⟳)
}


def rgb(color: str) -> tuple:
    """``"#RRGGBB"`` (or ``"#RGB"``) -> ``(r, g, b)`` in 0..255."""
    h = color.lstrip("#")
    if len(h) == 3:
        h = "".join(c * 2 for c in h)
    if len(h) != 6:
        raise ValueError(f"not a #RRGGBB colour: {color!r}")
    return tuple(int(h[i: i + 2], 16) for i in (0, 2, 4))


def hex_color(r, g, b) -> str:
    return "#" + "".join(f"{max(0, min(255, round(v))):02x}" for v in (r, g, b))


def mix(color: str, other: str, share: float) -> str:
    """``color`` with ``share`` (0..1) of ``other`` mixed in, opaque."""
    return hex_color(*(a + (b - a) * share for a, b in zip(rgb(color), rgb(other))))


def faint(color: str) -> str:
    """A pale, opaque version of ``color`` (for bars shown as context next to the one in focus)."""
    return mix(color, WHITE, FAINT)


def rgba(color: str, alpha: float) -> str:
    """``color`` at opacity ``alpha``, as a CSS/plotly ``rgba(...)``."""
    return "rgba({}, {}, {}, {:g})".format(*rgb(color), alpha)


def luminance(color: str) -> float:
    """WCAG relative luminance."""
    lin = [s / 12.92 if s <= 0.04045 else ((s + 0.055) / 1.055) ** 2.4 for s in (c / 255 for c in rgb(color))]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two opaque colours (1..21)."""
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_shade(color: str, background: str = WHITE, ratio: float = MIN_CONTRAST) -> str:
    """The lightest darker shade of ``color`` (same hue, scaled towards black) that reads at ``ratio`` on
    ``background``; ``color`` itself when it already does."""
    r, g, b = rgb(color)
    for step in range(101):
        f = 1 - step / 100
        shade = hex_color(r * f, g * f, b * f)
        if contrast(shade, background) >= ratio:
            return shade
    return hex_color(0, 0, 0)


def tint(color: str) -> str:
    """The opaque colour a token of ``color`` is drawn on over white (``TINT_ALPHA`` of it)."""
    return mix(WHITE, color, TINT_ALPHA)


def kind_css(scope: str) -> str:
    """CSS rules ``{scope} .tok-<kind>`` for every token kind: a readable shade of its colour on a tint of it, and its
    second cue. The report and the token view both draw tokens with these rules."""
    rules = []
    for k in TOKEN_KINDS.values():
        decl = [f"color: {text_shade(k.color, tint(k.color) if k.tinted else WHITE)}"]
        if k.tinted:
            decl.append(f"background: {rgba(k.color, TINT_ALPHA)}")
        if k.decoration:
            decl.append(f"text-decoration: {k.decoration}")
        if k.bold:
            decl.append("font-weight: 600")
        rules.append(f"{scope} .tok-{k.name} {{ {'; '.join(decl)}; }}")
    return "\n".join(rules) + "\n"


@cache
def ansi(kind: str) -> str:
    """The terminal SGR parameters for a token kind: its colour (nearest of the 256-colour palette) and its second
    cue; "" for plain tokens, which keep the terminal's own colour."""
    k = TOKEN_KINDS[kind]
    if not k.tinted:
        return ""
    cue = {"line-through": ";9", "underline": ";4", "overline": ";53", "": ""}[k.decoration]
    return f"38;5;{xterm256(k.color)}{cue}{';1' if k.bold else ''}"


def xterm256(color: str) -> int:
    """The nearest colour of the xterm 256-colour palette (its 6×6×6 cube and grey ramp) to ``color``."""
    levels = [0, 95, 135, 175, 215, 255]
    cube = {16 + 36 * i + 6 * j + k: (levels[i], levels[j], levels[k])
            for i in range(6) for j in range(6) for k in range(6)}
    greys = {232 + i: (8 + 10 * i,) * 3 for i in range(24)}
    target = rgb(color)
    return min({**cube, **greys}.items(), key=lambda kv: sum((a - b) ** 2 for a, b in zip(kv[1], target)))[0]
