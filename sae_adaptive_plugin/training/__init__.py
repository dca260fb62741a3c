"""Training any registered architecture with SAELens's runner from a YAML config."""

from sae_adaptive_plugin.training.config import (
    ConfigError,
    build_runner_config,
    check_devices,
    known_architectures,
)
from sae_adaptive_plugin.training.config_sources import load_config_mapping
from sae_adaptive_plugin.training.run import TrainResult, run_training, train_from_yaml

__all__ = [
    "ConfigError",
    "TrainResult",
    "build_runner_config",
    "check_devices",
    "known_architectures",
    "load_config_mapping",
    "run_training",
    "train_from_yaml",
]
