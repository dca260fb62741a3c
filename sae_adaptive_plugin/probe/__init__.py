"""The AdaptiveK complexity probe: ridge fit, the probe, label sources, activation collection."""

from sae_adaptive_plugin.probe.complexity_probe import (
    DEFAULT_LAMBDAS,
    MAX_EXTENDED_LAMBDA,
    ComplexityProbe,
    ProbeReport,
    RidgeAccumulator,
    spearman_corr,
)

__all__ = [
    "DEFAULT_LAMBDAS",
    "MAX_EXTENDED_LAMBDA",
    "ComplexityProbe",
    "ProbeReport",
    "RidgeAccumulator",
    "spearman_corr",
]
