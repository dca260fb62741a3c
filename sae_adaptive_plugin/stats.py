"""Spearman rank correlation, the one used by every metric of the package.

``scipy.stats.spearmanr`` (average ranks for ties). When either side is constant there is no
ranking to agree with and the correlation is defined here as ``0.0`` (SciPy returns NaN), so a
fixed-k SAE's ``Spearman(L0, true L0)`` is 0 and result tables stay finite.
"""

from __future__ import annotations

from typing import Any


def spearman(a: Any, b: Any) -> float:
    """Spearman correlation of two equal-length tensors or arrays; ``0.0`` if one is constant."""
    import numpy as np
    from scipy.stats import spearmanr

    a_np = np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype=np.float64).ravel()
    b_np = np.asarray(b.detach().cpu() if hasattr(b, "detach") else b, dtype=np.float64).ravel()
    if a_np.size != b_np.size:
        raise ValueError(f"spearman needs equal lengths, got {a_np.size} and {b_np.size}")
    if a_np.size < 2 or a_np.std() == 0 or b_np.std() == 0:
        return 0.0
    return float(spearmanr(a_np, b_np).statistic)
