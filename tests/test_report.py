"""The static HTML report on a made-up trace (no model), and the one-way import between trace and report."""
import ast
import html
from pathlib import Path

import pytest

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


def test_each_metric_formula_on_made_up_traces():
    """The one formula of each metric, against numbers worked out by hand from made_up_traces()."""
    from mtplab import costs
    from mtplab.trace import speedup, speedup_of

    spec, plain = made_up_traces()
    m = spec.metrics  # 3 rounds emit 3 + 2 + 1 tokens; 4 drafted, 3 accepted
    assert (m.new_tokens, m.rounds, m.drafted, m.accepted) == (6, 3, 4, 3)
    assert m.acceptance_rate == 0.75 and m.mean_acceptance_length == 2.0 and m.per_position_acceptance == [1.0, 0.5]
    assert m.verify_tokens == pytest.approx((3 + 3 + 1) / 3)
    assert speedup_of(10, 1.0, 10, 2.0) == 2.0 and speedup_of(20, 1.0, 10, 1.0) == 2.0
    assert speedup(spec, plain) == pytest.approx((0.016 * 7 / 7) / ((0.008 + 0.04 + 0.015 + 0.003) / 6))
    step = costs.step_seconds(plain.rounds)
    assert step == pytest.approx(0.016)
    assert costs.draft_cost_ratio(spec.rounds, step) == pytest.approx(0.008 / 4 / 0.016)
    cm = costs.cost_model(spec, plain)
    assert cm["c"] == pytest.approx(0.125) and cm["verify_cost"] == {2: pytest.approx(0.02 / 0.016)}


def test_one_vocabulary_readme_glossary_and_metrics_agree():
    """Each term of trace.GLOSSARY is in the README's glossary with the same words, and the conditional acceptance
    differs from the per-position acceptance as vLLM counts it exactly as defined (hand-worked rounds)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    for term, meaning in trace.GLOSSARY.items():
        assert f"- **{term}**: {meaning}." in readme
    spec, _ = made_up_traces()  # drafted 2 → accepted 2; drafted 2 → accepted 1; drafted 0
    extra = mtplab.Round(index=3, context_len=12, drafter="made-up", num_draft_tokens=3, draft_ids=[1, 2, 3],
                         num_accepted=0, token_id=5, token_kind="correction")
    rounds = spec.rounds + [extra]  # + drafted 3 → accepted 0: reached position 0 only
    assert trace.per_position_acceptance(rounds)[0] == [2 / 3, 1 / 3, 0.0]
    assert trace.conditional_acceptance(rounds) == [2 / 3, 1 / 2]
