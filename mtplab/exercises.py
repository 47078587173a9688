"""Predict-then-run exercises (notebook 05): ``check`` compares a prediction with the truth the cell measured."""
from __future__ import annotations


def check(answer, truth, why: str = "", tol: float = 0.02):
    """Print whether ``answer`` matches ``truth`` (numbers: within ``tol`` relative, at least ``tol`` absolute;
    ``tol=0`` for an exact integer), then the truth and ``why``. Without an attempt (``answer is None``) it reveals
    nothing: predicting first is the exercise. Returns True/False, or None without an attempt."""
    if answer is None:
        print("Write your prediction in the answer line, then run this cell again: the truth and the why are shown "
              "only after an attempt.")
        return None
    if isinstance(truth, (bool, str)) or isinstance(answer, (bool, str)):
        ok = answer == truth
    else:
        ok = abs(answer - truth) <= tol * max(1, abs(truth))
    shown = f"{truth:.3g}" if isinstance(truth, float) else truth
    print(("✓ right" if ok else "✗ not quite") + f" — truth: {shown}")
    if why:
        print("Why: " + why)
    return ok
