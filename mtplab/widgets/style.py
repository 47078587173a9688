"""Number formats shared by the views (their colours are in ``mtplab.palette``)."""


def fmt_prob(x) -> str:
    return "—" if x is None else (f"{x:.3f}" if x >= 0.001 else f"{x:.1e}")
