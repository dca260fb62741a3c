"""Bisection for the shift ``δ`` at which a batch's mean k meets a target.

Both adaptive SAEs set their per-row budget from a score that a scalar shift moves monotonically
(AdaptiveK's label range, SoftSAE's estimator bias ``c₀``); :func:`shift_for_target_mean` finds
the ``δ ∈ [lo, hi]`` at which ``mean_at(δ)`` is closest to ``target``.
"""

from __future__ import annotations

from collections.abc import Callable


def shift_for_target_mean(
    mean_at: Callable[[float], float],
    target: float,
    lo: float,
    hi: float,
    *,
    increasing: bool,
    n_iter: int = 40,
) -> float:
    """The ``δ ∈ [lo, hi]`` with ``mean_at(δ) ≈ target`` by bisection, for ``mean_at``
    monotone in ``δ`` (``increasing`` says which way); an end of the interval when the target
    lies beyond what the interval reaches."""
    if not lo < hi:
        raise ValueError(f"shift search interval must have lo < hi, got [{lo}, {hi}]")
    for _ in range(n_iter):
        mid = 0.5 * (lo + hi)
        if (mean_at(mid) > target) == increasing:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)
