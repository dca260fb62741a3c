"""The AdaptiveK complexity probe: ridge fit, the probe, label sources, activation collection.

The names below are imported on first use, so the light modules of this package (e.g. the
``fit-probe`` flags' choices) can be imported without torch.
"""

import importlib
from typing import Any

from sae_adaptive_plugin.stats import spearman

_EXPORTS = {
    "DEFAULT_LAMBDAS": "ridge",
    "MAX_EXTENDED_LAMBDA": "complexity_probe",
    "ComplexityProbe": "complexity_probe",
    "ProbeReport": "ridge",
    "RidgeAccumulator": "ridge",
}
__all__ = [*sorted(_EXPORTS), "spearman_corr"]

#: The package-wide Spearman correlation (:func:`sae_adaptive_plugin.stats.spearman`).
spearman_corr = spearman


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
