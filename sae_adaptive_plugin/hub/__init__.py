"""Publishing and loading SAE folders: checks and loading, the model card, the Hub push."""

from sae_adaptive_plugin.hub.load import (
    UnknownArchitectureError,
    architecture_provider,
    check_architecture,
    check_weights,
    convert_to_inference,
    is_training_checkpoint,
    load_from_hub,
    load_sae_folder,
    missing_architecture_hint,
)
from sae_adaptive_plugin.hub.model_card import model_card, training_summary
from sae_adaptive_plugin.hub.push import HubPushError, PushResult, push_to_hub
from sae_adaptive_plugin.provenance import PACKAGE_NAME, PROVIDER_METADATA_KEY

__all__ = [
    "PACKAGE_NAME",
    "PROVIDER_METADATA_KEY",
    "HubPushError",
    "PushResult",
    "UnknownArchitectureError",
    "architecture_provider",
    "check_architecture",
    "check_weights",
    "convert_to_inference",
    "is_training_checkpoint",
    "load_from_hub",
    "load_sae_folder",
    "missing_architecture_hint",
    "model_card",
    "push_to_hub",
    "training_summary",
]
