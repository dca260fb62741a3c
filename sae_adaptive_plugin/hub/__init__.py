"""Publishing and loading SAE folders: Hub push with a model card, architecture checks, loading."""

from sae_adaptive_plugin.hub.push import (
    HubPushError,
    PushResult,
    UnknownArchitectureError,
    architecture_provider,
    check_architecture,
    check_weights,
    convert_to_inference,
    is_training_checkpoint,
    load_from_hub,
    load_sae_folder,
    missing_architecture_hint,
    model_card,
    push_to_hub,
    training_summary,
)
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
