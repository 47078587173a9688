"""The static HTML report on a made-up trace (no model)."""
import html

from conftest import made_up_traces

from mtplab import report
from mtplab.palette import COLORS, TOKEN_KINDS


def test_report_marks_every_token_and_shows_the_legend_from_the_palette(tmp_path):
    spec, _ = made_up_traces()
    page = report.save_html(spec, tmp_path / "t.html").read_text()
    events = [e for r in spec.rounds for e in r.token_events()]
    for kind, _, text, _ in events:
        assert f'class="tok tok-{kind}"' in page and f">{text}</span>" in page
    assert page.count('class="tok tok-') == len(events) + len(TOKEN_KINDS)
    for k in TOKEN_KINDS.values():
        assert f'<span class="tok tok-{k.name}" title="{html.escape(k.description)}">{html.escape(k.label)}</span>' in page
    for name in ("accepted", "draft_time", "verify_time", "bookkeeping_time"):
        assert f'fill="{COLORS[name]}"' in page
    assert spec._repr_html_() == report.trace_html(spec)

