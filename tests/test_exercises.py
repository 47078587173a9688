"""notebook 05's check: no attempt reveals nothing; an attempt is judged, then the truth and the why are shown."""
from mtplab.exercises import check


def test_no_attempt_reveals_nothing(capsys):
    assert check(None, 0.4, why="because") is None
    out = capsys.readouterr().out
    assert "0.4" not in out and "because" not in out and "prediction" in out


def test_attempts_are_judged_then_explained(capsys):
    assert check(0.41, 0.4, why="min(1, p/q)") is True
    assert check(0.5, 0.4) is False
    assert check(5, 5, tol=0) is True and check(4, 5, tol=0) is False
    assert check("higher", "higher") is True and check(False, True) is False
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "✓ right — truth: 0.4" and out[1] == "Why: min(1, p/q)"
    assert out[2] == "✗ not quite — truth: 0.4"
