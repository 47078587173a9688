"""The static HTML report on a made-up trace (no model), and the one-way import between trace and report."""
import ast
import html
from pathlib import Path

from conftest import made_up_traces

import mtplab
from mtplab import report, trace
from mtplab.palette import COLORS, TOKEN_KINDS

SRC = Path(mtplab.__file__).parent


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


def test_report_does_not_import_trace_and_trace_imports_report_once_at_the_top():
    assert not hasattr(report, "Trace")  # only for type checking
    tree = ast.parse((SRC / "report.py").read_text())
    runtime = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in runtime if isinstance(n, ast.ImportFrom) and n.module in ("trace", "mtplab.trace")]
    assert trace.trace_html is report.trace_html
    tree = ast.parse((SRC / "trace.py").read_text())
    late = [n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f) if isinstance(n, ast.ImportFrom) and n.module and "report" in n.module]
    assert not late
