"""Check and load SAE folders: architecture known to SAELens, weights complete and finite.

:func:`check_architecture` / :func:`load_from_hub` / :func:`load_sae_folder` turn SAELens's bare
``KeyError`` for an architecture it does not know into an :class:`UnknownArchitectureError` naming
the package that provides it. :func:`convert_to_inference` writes the inference form of a training
checkpoint. Only safetensors and JSON are read.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from sae_lens.constants import (
    ACTIVATION_SCALER_CFG_FILENAME,
    RUNNER_CFG_FILENAME,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
    TRAINER_STATE_FILENAME,
)

from sae_adaptive_plugin.provenance import PACKAGE_NAME, PROVIDER_METADATA_KEY
from sae_adaptive_plugin.registration.plugin import PACKAGE_ARCHITECTURES


class UnknownArchitectureError(ValueError):
    """A ``cfg.json`` names an architecture that SAELens has no class for in this interpreter."""


def _plugin_providers() -> dict[str, str]:
    """architecture name -> distribution name, for every architecture a SAELens plugin registered."""
    from sae_adaptive_plugin.registration.loader import load_plugins

    providers: dict[str, str] = {}
    for report in load_plugins():
        if report.ok and report.distribution:
            dist = report.distribution.rsplit(" ", 1)[0]
            for name in report.architectures:
                providers[name] = dist
    return providers


def architecture_provider(architecture: str, cfg: dict[str, Any] | None = None) -> str | None:
    """The package that provides ``architecture``, if known (None for SAELens's own ones)."""
    if architecture in PACKAGE_ARCHITECTURES:
        return PACKAGE_NAME
    metadata = (cfg or {}).get("metadata") or {}
    if isinstance(metadata, dict) and metadata.get(PROVIDER_METADATA_KEY):
        return str(metadata[PROVIDER_METADATA_KEY])
    return _plugin_providers().get(architecture)


def missing_architecture_hint(architecture: str, cfg: dict[str, Any] | None = None) -> str:
    """What to install (or unset) so that ``architecture`` registers: for this package's
    architectures ``pip install sae-adaptive-plugin`` and the autoload opt-out when it is set."""
    provider = architecture_provider(architecture, cfg)
    if provider == PACKAGE_NAME:
        opt_out = os.environ.get("SAE_ADAPTIVE_PLUGIN_NO_AUTOLOAD", "")
        cause = (
            f"autoload disabled by SAE_ADAPTIVE_PLUGIN_NO_AUTOLOAD={opt_out}: call "
            "`sae_adaptive_plugin.load_plugins()` before loading, or unset it"
            if opt_out not in ("", "0")
            else "`sae-adaptive plugins` says why it did not register"
        )
        hint = (
            f"It is provided by the package {PACKAGE_NAME!r}: `pip install {PACKAGE_NAME}`. If it "
            f"is installed: {cause}."
        )
    elif provider:
        hint = f"It is provided by the package {provider!r}: `pip install {provider}`."
    else:
        hint = (
            "It is not one of SAELens's architectures, so it must come from a SAELens plugin "
            "package: install the package that provides it (`sae-adaptive plugins` lists the "
            "installed plugins and their architectures)."
        )
    return hint


def check_architecture(cfg: dict[str, Any], source: str = SAE_CFG_FILENAME) -> str:
    """Return ``cfg``'s architecture name, or raise :class:`UnknownArchitectureError` naming the
    package to install when SAELens has no inference class registered for it."""
    from sae_lens import registry
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

    from sae_adaptive_plugin.registration.loader import load_plugins

    load_plugins()  # also where the .pth autoload did not run (python -S, --target installs)
    architecture = cfg.get("architecture")
    if not isinstance(architecture, str) or architecture in registry.SAE_CLASS_REGISTRY:
        # SAELens's defaulting of older configs looks the architecture up: only when registered
        architecture = handle_config_defaulting(dict(cfg)).get("architecture")
    if not isinstance(architecture, str) or not architecture:
        raise UnknownArchitectureError(f"{source} has no 'architecture' field")
    if architecture in registry.SAE_CLASS_REGISTRY:
        return architecture
    known = ", ".join(sorted(registry.SAE_CLASS_REGISTRY))
    hint = missing_architecture_hint(architecture, cfg)
    raise UnknownArchitectureError(
        f"{source} names architecture {architecture!r}, which SAELens does not know "
        f"(known: {known}). {hint}"
    )


def load_from_hub(
    repo_id: str,
    sae_id: str,
    device: str = "cpu",
    dtype: str = "float32",
    force_download: bool = False,
    **kwargs: Any,
):
    """``SAE.from_pretrained(repo_id, sae_id)`` after checking that SAELens knows the repo's
    architecture (:class:`UnknownArchitectureError` naming the package otherwise)."""
    from huggingface_hub import hf_hub_download
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    hub_repo, folder = get_repo_id_and_folder_name(repo_id, sae_id)
    cfg_path = hf_hub_download(
        hub_repo, f"{folder}/{SAE_CFG_FILENAME}", force_download=force_download
    )
    cfg = json.loads(Path(cfg_path).read_text())
    check_architecture(cfg, source=f"{hub_repo}/{folder}/{SAE_CFG_FILENAME}")
    return SAE.from_pretrained(
        repo_id, sae_id, device=device, dtype=dtype, force_download=force_download, **kwargs
    )


def _read_cfg(path: Path) -> dict[str, Any]:
    cfg_path = path / SAE_CFG_FILENAME
    if not path.is_dir():
        raise FileNotFoundError(f"PATH {path} is not a directory (expected an SAE folder)")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"PATH {path} has no {SAE_CFG_FILENAME}: not a SAELens SAE folder")
    if not (path / SAE_WEIGHTS_FILENAME).is_file():
        found = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"PATH {path} has no {SAE_WEIGHTS_FILENAME} (only safetensors weights are published); "
            f"found: {found}"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object")
    return cfg


def check_weights(path: str | Path) -> None:
    """Raise ``ValueError`` naming ``path`` unless it is a complete safetensors file whose floating
    tensors are all finite (a truncated, pickled or NaN weights file is refused)."""
    import torch
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                tensor = fh.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise ValueError(
                        f"{path}: tensor {name!r} holds {bad} NaN/Inf values of {tensor.numel()}"
                    )
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types for a corrupt header/body
        raise ValueError(
            f"{path}: not a readable safetensors file (truncated or in another format): "
            f"{type(e).__name__}: {e}"
        ) from e


def load_sae_folder(path: str | Path, device: str = "cpu") -> Any:
    """``SAE.load_from_disk(path)`` after checking the folder, with errors that name the file:
    ``cfg.json`` valid JSON naming a registered architecture (:func:`check_architecture`), the
    weights a complete safetensors file with finite values (:func:`check_weights`), and every
    weight the architecture expects present."""
    from sae_lens import SAE

    path = Path(path)
    cfg = _read_cfg(path)
    check_architecture(cfg, source=str(path / SAE_CFG_FILENAME))
    check_weights(path / SAE_WEIGHTS_FILENAME)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*model_from_pretrained_kwargs")
            return SAE.load_from_disk(str(path), device=device)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(
            f"{path}: {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME} do not make an SAE: "
            f"{type(e).__name__}: {e}"
        ) from e


def is_training_checkpoint(path: str | Path, cfg: dict[str, Any] | None = None) -> bool:
    """True when ``path`` holds a SAELens training SAE rather than an inference SAE: a trainer
    checkpoint (``trainer_state.pt``), a training-only architecture (e.g. ``batchtopk``), or a
    ``cfg.json`` carrying fields of the training config that the inference config lacks."""
    from dataclasses import fields

    from sae_lens import registry

    path = Path(path)
    cfg = cfg if cfg is not None else _read_cfg(path)
    if (path / TRAINER_STATE_FILENAME).exists():
        return True
    architecture = cfg.get("architecture")
    training = registry.SAE_TRAINING_CLASS_REGISTRY.get(architecture)
    inference = registry.SAE_CLASS_REGISTRY.get(architecture)
    if training is None:
        return False
    if inference is None:
        return True
    training_only = {f.name for f in fields(training[1])} - {f.name for f in fields(inference[1])}
    return bool(training_only & set(cfg))


def convert_to_inference(path: str | Path, out_dir: str | Path) -> Path:
    """Write the inference form of the training SAE at ``path`` into ``out_dir`` (SAELens's
    ``TrainingSAE.load_from_disk`` + ``save_inference_model``), folding an activation scaler saved
    by the trainer as the trainer itself does at the end of training. Copies the sparsity and runner
    config. ``path`` is only read."""
    from sae_lens import registry
    from sae_lens.saes.sae import TrainingSAE
    from sae_lens.training.activation_scaler import ActivationScaler

    path, out_dir = Path(path), Path(out_dir)
    architecture = _read_cfg(path).get("architecture")
    if architecture not in registry.SAE_TRAINING_CLASS_REGISTRY:
        provider = architecture_provider(str(architecture))
        raise UnknownArchitectureError(
            f"{path / SAE_CFG_FILENAME} is a training checkpoint of architecture {architecture!r}, "
            "which has no SAELens training class in this interpreter; install "
            + (f"the package {provider!r}" if provider else "the plugin package that provides it")
        )
    with warnings.catch_warnings():  # SAELens's advice on loading the LM, irrelevant here
        warnings.filterwarnings("ignore", message=".*model_from_pretrained_kwargs")
        sae = TrainingSAE.load_from_disk(path, device="cpu")
    scaler_path = path / ACTIVATION_SCALER_CFG_FILENAME
    if scaler_path.exists():
        scaler = ActivationScaler()
        scaler.load(scaler_path)
        if scaler.scaling_factor is not None:
            sae.fold_activation_norm_scaling_factor(scaler.scaling_factor)
        if scaler.whitening is not None:
            sae.fold_activation_whitening(
                mean=scaler.whitening.mean,
                whitening_matrix=scaler.whitening.matrix,
                unwhitening_matrix=scaler.whitening.inverse_matrix,
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    sae.save_inference_model(out_dir)
    for name in (SPARSITY_FILENAME, RUNNER_CFG_FILENAME):
        if (path / name).is_file():
            shutil.copyfile(path / name, out_dir / name)
    return out_dir
