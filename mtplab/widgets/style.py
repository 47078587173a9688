"""Number formats shared by the views (their colours are in ``mtplab.palette``)."""


def fmt_prob(x) -> str:
    return "—" if x is None else (f"{x:.3f}" if x >= 0.001 else f"{x:.1e}")


def named_traces(fig) -> dict:
    """``{name: trace}`` of a plotly figure, so views update a trace by what it shows, never by its position."""
    traces = {t.name: t for t in fig.data}
    if len(traces) != len(fig.data) or None in traces:
        raise RuntimeError(f"every trace needs a name of its own, got {[t.name for t in fig.data]}")
    return traces
