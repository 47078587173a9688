"""The speedup dashboard on made-up traces (no model): every trace is found by its name, and each update draws
into the trace it names."""
import pytest
from conftest import made_up_traces

from mtplab import speedup
from mtplab.widgets import dashboard as D


def test_traces_have_unique_names_and_each_update_fills_its_own():
    d = D.SpeedupDashboard()
    names = [D.ACCEPTANCE, *D.TIME_BARS, D.THEORY, D.THEORY_MEASURED_V, D.MEASURED, D.SWEEP]
    assert sorted(d.traces) == sorted(names) and sorted(t.name for t in d.fig.data) == sorted(names)
    assert all(d.traces[t.name] is t for t in d.fig.data)

    d.show_sweep([(1, 1.2), (2, 1.5), (4, 1.1)])
    assert list(d.traces[D.SWEEP].x) == [1, 2, 4] and list(d.traces[D.SWEEP].y) == [1.2, 1.5, 1.1]
    assert all(not t.x for t in d.fig.data if t.name != D.SWEEP)

    spec, plain = made_up_traces()
    d.update(spec, plain)
    assert list(d.traces[D.ACCEPTANCE].y) == spec.metrics.per_position_acceptance
    for name, (key, _) in D.TIME_BARS.items():
        assert list(d.traces[name].x) == [0, 1, 2]
        assert list(d.traces[name].y) == pytest.approx([1000 * getattr(r, key) for r in spec.rounds])
    assert list(d.traces[D.MEASURED].y) == pytest.approx([speedup(spec, plain)])
    assert list(d.traces[D.MEASURED].x) == pytest.approx([4 / 3])  # mean draft length of the three rounds
    for name in (D.THEORY, D.THEORY_MEASURED_V):
        assert list(d.traces[name].x) == D.GAMMAS and len(d.traces[name].y) == len(D.GAMMAS)
    assert list(d.traces[D.SWEEP].x) == [1, 2, 4]  # an update leaves the sweep alone
    assert "measured speedup" in d.metrics.value

    d.clear()
    assert all(not t.x and not t.y for t in d.fig.data) and "No run yet" in d.metrics.value
