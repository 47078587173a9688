"""One palette: every colour is defined once in mtplab.palette, and every view draws a token kind from it alike."""
import re
from pathlib import Path

import pytest

from mtplab import palette, report
from mtplab.cli import _paint
from mtplab.palette import COLORS, TOKEN_KINDS

ROOT = Path(__file__).resolve().parent.parent
HEX = re.compile(r"(?<![&\w])#(?:[0-9a-fA-F]{8}|[0-9a-fA-F]{6}|[0-9a-fA-F]{3})\b")


def kind_rules(css: str) -> dict:
    """``kind -> declarations`` of the ``.tok-<kind>`` rules in a stylesheet."""
    return {m[1]: m[2].strip() for m in re.finditer(r"\.tok-(\w+)\s*\{([^}]*)\}", css)}


def test_no_colour_literal_outside_the_palette():
    files = [p for p in (ROOT / "mtplab").rglob("*") if p.suffix in (".py", ".css", ".js")]
    files += sorted((ROOT / "notebooks").glob("*.ipynb"))
    stray = {(str(p.relative_to(ROOT)), h) for p in files if p.name != "palette.py"
             for h in HEX.findall(p.read_text(encoding="utf-8"))}
    assert not stray, f"colours written outside mtplab/palette.py: {sorted(stray)}"
    literals = [h.upper() for h in HEX.findall((ROOT / "mtplab" / "palette.py").read_text())]
    assert len(literals) == len(set(literals)) >= 8, "each colour is written once"
    assert "rgba(" not in "".join(p.read_text(encoding="utf-8") for p in files if p.name != "palette.py")


def test_every_view_draws_a_kind_from_the_palette_alike():
    from mtplab.widgets.token_view import TokenView, token_view_css

    reported, viewed = kind_rules(report.CSS), kind_rules(token_view_css())
    assert list(reported) == list(viewed) == list(TOKEN_KINDS)
    assert reported == viewed
    assert TokenView._css == token_view_css()  # what the widget sends to the browser
    for kind in ("accepted", "rejected", "correction", "bonus"):
        c = COLORS[kind]
        assert f"color: {palette.text_shade(c, palette.tint(c))};" in viewed[kind]
        assert f"background: {palette.rgba(c, palette.TINT_ALPHA)}" in viewed[kind]
    assert "line-through" in viewed["rejected"] and "underline" in viewed["correction"]
    assert "overline" in viewed["bonus"] and "background" not in viewed["plain"]
    assert TokenView().legend == [[k.name, k.label, k.description] for k in TOKEN_KINDS.values()]


def test_the_token_view_css_file_holds_layout_only():
    css = (ROOT / "mtplab" / "widgets" / "token_view.css").read_text()
    assert ".tok-" not in css and not re.search(r"(?<![-\w])(color|background)\s*:", css)


@pytest.mark.parametrize("kind", ["accepted", "rejected", "correction", "bonus"])
def test_token_text_is_a_readable_darker_shade_of_its_colour(kind):
    base = COLORS[kind]
    shade = palette.text_shade(base, palette.tint(base))
    assert palette.contrast(shade, palette.tint(base)) >= palette.MIN_CONTRAST
    assert palette.contrast(base, palette.tint(base)) < palette.MIN_CONTRAST  # the base alone would not read
    r, g, b = palette.rgb(base)
    r2, g2, b2 = palette.rgb(shade)
    f = max(r2, g2, b2) / max(r, g, b)
    assert 0.5 < f < 1 and all(abs(x2 - x * f) <= 1 for x, x2 in zip((r, g, b), (r2, g2, b2)))  # same hue, darker


def test_colour_arithmetic():
    assert palette.rgb(COLORS["bonus"]) == (0, 114, 178) and palette.rgb("#fff") == (255, 255, 255)
    assert palette.contrast("#000", "#fff") == pytest.approx(21)
    assert palette.rgb(palette.text_shade("#000")) == (0, 0, 0)  # already readable: unchanged
    assert palette.mix("#000", "#fff", 0.5) == "#808080"
    assert palette.faint(COLORS["accepted"]) == palette.mix(COLORS["accepted"], palette.WHITE, palette.FAINT)
    assert palette.rgba(COLORS["rejected"], 0.15) == "rgba(213, 94, 0, 0.15)"
    assert [palette.xterm256(c) for c in ("#000", "#fff", COLORS["rejected"], COLORS["bonus"], "#808080")] == [
        16, 231, 166, 25, 244]
    with pytest.raises(ValueError):
        palette.rgb("#12345")


def test_the_terminal_paints_tokens_in_the_palette_with_their_cues():
    assert _paint("rejected", "x\n", True) == f"\x1b[38;5;{palette.xterm256(COLORS['rejected'])};9mx\\n\x1b[0m"
    assert palette.ansi("correction").endswith(";4") and palette.ansi("bonus").endswith(";53;1")
    assert _paint("plain", "y", True) == "y"  # the terminal's own colour
    assert _paint("accepted", "z", False) == "[+z]"
