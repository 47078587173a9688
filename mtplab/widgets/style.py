"""Shared colours (Okabe–Ito, colour-blind safe) and number formats for the views."""

COLORS = {
    "accepted": "#009E73",
    "rejected": "#D55E00",
    "correction": "#E69F00",
    "bonus": "#0072B2",
    "plain": "#555555",
    "target": "#0072B2",
    "drafter": "#E69F00",
    "theory": "#CC79A7",
    "measured": "#000000",
    "draft_time": "#E69F00",
    "verify_time": "#0072B2",
    "bookkeeping_time": "#999999",
}


def fmt_prob(x) -> str:
    return "—" if x is None else (f"{x:.3f}" if x >= 0.001 else f"{x:.1e}")
