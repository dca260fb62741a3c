"""Reading the reference checkpoints and converting them to ``adaptivek`` / ``softsae``
(the formats and their mapping: :mod:`sae_adaptive_plugin.hub.reference_import`)."""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from sae_lens.saes.sae import SAE
from safetensors import SafetensorError
from safetensors.torch import load_file

from sae_adaptive_plugin.saes.adaptivek import AdaptiveKSAE, AdaptiveKSAEConfig
from sae_adaptive_plugin.saes.softsae import SoftSAE
from sae_adaptive_plugin.saes.softsae_config import SoftSAEConfig

#: The reference ``LinearProbe``'s score range and sigmoid steepness (constants of its code).
ADAPTIVEK_REF_SCORE_RANGE = (0.0, 10.0)
ADAPTIVEK_REF_STEEPNESS = 6.0
#: Config files of a reference trainer folder, in the order they are looked for.
CONFIG_NAMES = ("config.json", "dynamic_config.json")


class ReferenceImportError(ValueError):
    """A reference checkpoint that cannot be read or converted exactly; the message names the
    file or field."""


@dataclass(frozen=True)
class ReferenceFiles:
    """The files of one reference checkpoint, local (downloaded ones from the Hub cache)."""

    weights: Path
    config: Path | None
    probe: Path | None = None


# -- reading ---------------------------------------------------------------------------------------


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A flat ``name → tensor`` dict from ``.safetensors``, or from ``.pt`` through
    ``torch.load(weights_only=True)``; anything else raises :class:`ReferenceImportError`."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise ReferenceImportError(f"{path}: not a readable safetensors file ({exc})") from exc
    if path.suffix not in (".pt", ".pth"):
        raise ReferenceImportError(f"{path}: not a .pt or .safetensors file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReferenceImportError(
            f"{path}: refused, torch.load(weights_only=True) cannot read it ({first}). Only a "
            "plain state dict of tensors or a .safetensors file is loaded; re-save it with "
            "torch.save(module.state_dict(), path) or safetensors.torch.save_file"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("ae"), dict):
        raise ReferenceImportError(
            f"{path}: a training backup (keys {sorted(obj)}), not a saved SAE: the reference "
            "writes the final ae.pt when its run ends"
        )
    if not isinstance(obj, dict):
        raise ReferenceImportError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ReferenceImportError(f"{path}: entry {key!r} is not a tensor")
    return dict(obj)


def read_trainer_config(path: Path | None) -> dict[str, Any]:
    """The ``trainer`` block of a reference ``config.json`` (or the whole file when it has none)."""
    if path is None:
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReferenceImportError(f"{path}: not readable JSON ({exc})") from exc
    trainer = cfg.get("trainer", cfg) if isinstance(cfg, dict) else None
    if not isinstance(trainer, dict):
        raise ReferenceImportError(f"{path}: expected a JSON object with a 'trainer' object")
    if isinstance(cfg.get("buffer"), dict):
        trainer = {**trainer, "_buffer": cfg["buffer"]}
    return trainer


def _tensor(sd: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], where: Path):
    if key not in sd:
        raise ReferenceImportError(f"{where}: missing {key!r} (has {sorted(sd)})")
    value = sd[key]
    if tuple(value.shape) != shape:
        raise ReferenceImportError(
            f"{where}: {key!r} has shape {tuple(value.shape)}, expected {shape}"
        )
    return value.detach().to(torch.float32)


def _linear_dims(sd: dict[str, torch.Tensor], where: Path) -> tuple[int, int]:
    weight = sd.get("encoder.weight")
    if weight is None or weight.ndim != 2:
        raise ReferenceImportError(f"{where}: no 2-D 'encoder.weight' (has {sorted(sd)})")
    d_sae, d_in = weight.shape
    return int(d_in), int(d_sae)


def _check_unused(sd: dict[str, torch.Tensor], used: set[str], where: Path) -> None:
    extra = sorted(set(sd) - used)
    if extra:
        raise ReferenceImportError(f"{where}: unexpected entries {extra}; not this format")


def _int_field(cfg: dict[str, Any], name: str, where: Path | None) -> int:
    value = cfg.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReferenceImportError(f"{where}: field {name!r} must be an int, got {value!r}")
    return value


def _metadata(fmt: str, source: str, trainer: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """SAELens metadata from the reference config: model, hook (``resid_post_layer_L`` is
    ``blocks.L.hook_resid_post``), context size, and what was imported."""
    metadata: dict[str, Any] = {"model_name": trainer.get("lm_name")}
    match = re.fullmatch(r"resid_post_layer_(\d+)", str(trainer.get("submodule_name", "")))
    if match:
        metadata["hook_name"] = f"blocks.{match.group(1)}.hook_resid_post"
    buffer = trainer.get("_buffer") or {}
    if isinstance(buffer.get("ctx_len"), int):
        metadata["context_size"] = buffer["ctx_len"]
    reference = {"format": fmt, "source": source, "dict_class": trainer.get("dict_class")}
    metadata["imported_from"] = {**reference, **extra}
    return metadata


# -- conversion ------------------------------------------------------------------------------------


def convert_adaptivek(files: ReferenceFiles, source: str) -> AdaptiveKSAE:
    """An ``adaptivek`` SAE computing the reference ``AutoEncoderDynamicTopK`` + probe forward."""
    sd = read_tensors(files.weights)
    d_in, d_sae = _linear_dims(sd, files.weights)
    probe_keys = {"probe.weights", "probe.bias"}
    if files.probe is not None:
        probe_sd, probe_where = read_tensors(files.probe), files.probe
        _check_unused(probe_sd, {"weights", "bias"}, probe_where)
    elif probe_keys <= set(sd):  # a probe attached to the AE before it was saved
        probe_sd = {k.removeprefix("probe."): sd[k] for k in probe_keys}
        probe_where = files.weights
    else:
        raise ReferenceImportError(
            f"{files.weights.parent / 'probe.pt'}: missing; the per-row k of an AdaptiveK SAE "
            "comes from its complexity probe (saved beside ae.pt)"
        )
    trainer = read_trainer_config(files.config)
    for name, value in (("activation_dim", d_in), ("dict_size", d_sae)):
        if name in trainer and trainer[name] != value:
            raise ReferenceImportError(
                f"{files.config}: {name}={trainer[name]} but {files.weights.name} has {value}"
            )
    k_min, k_max = (_int_field(trainer, name, files.config) for name in ("min_k", "max_k"))
    if not 1 <= k_min <= k_max <= d_sae:
        raise ReferenceImportError(
            f"{files.config}: need 1 <= min_k <= max_k <= dict_size={d_sae}, got min_k={k_min}, "
            f"max_k={k_max}; a max_k above dict_size (the reference then caps k at dict_size "
            "after the sigmoid map) is not expressible by adaptivek"
        )
    w = files.weights
    used = {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec"}
    _check_unused(sd, used | (probe_keys if files.probe is None else set()), w)
    cfg = AdaptiveKSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        k_min=k_min,
        k_max=k_max,
        steepness=ADAPTIVEK_REF_STEEPNESS,
        rescale_acts_by_decoder_norm=False,
    )
    sae = AdaptiveKSAE(cfg)
    state = {
        "W_enc": _tensor(sd, "encoder.weight", (d_sae, d_in), w).T,
        "b_enc": _tensor(sd, "encoder.bias", (d_sae,), w),
        "W_dec": _tensor(sd, "decoder.weight", (d_in, d_sae), w).T,
        "b_dec": _tensor(sd, "b_dec", (d_in,), w),
        "probe_weight": _tensor(probe_sd, "weights", (d_in, 1), probe_where)[:, 0],
        "probe_bias": _tensor(probe_sd, "bias", (1,), probe_where)[0],
        "probe_label_range": torch.tensor(ADAPTIVEK_REF_SCORE_RANGE),
        "probe_fitted": torch.tensor(1),
    }
    sae.load_state_dict({k: v.contiguous() for k, v in state.items()})
    extra = {"base_k": trainer.get("base_k"), "score_range": list(ADAPTIVEK_REF_SCORE_RANGE)}
    for key, value in _metadata("adaptivek-ref", source, trainer, **extra).items():
        sae.cfg.metadata[key] = value
    return sae


def convert_softsae(files: ReferenceFiles, source: str) -> SoftSAE:
    """A ``softsae`` SAE computing the reference ``SoftSAE`` hard-top-k forward (with
    ``1/norm_factor`` folded in: see the module docstring)."""
    w = files.weights
    sd = read_tensors(w)
    d_in, d_sae = _linear_dims(sd, w)
    hidden_w = sd.get("k_estimator.0.weight")
    if hidden_w is None or hidden_w.ndim != 2:
        raise ReferenceImportError(f"{w}: no 2-D 'k_estimator.0.weight' (has {sorted(sd)})")
    hidden = int(hidden_w.shape[0])
    scalars = {}
    for name in ("k", "k_max", "alpha", "norm_factor"):
        scalars[name] = _tensor(sd, name, (), w).item() if name in sd else None
    if scalars["k_max"] is None or scalars["k"] is None or scalars["norm_factor"] is None:
        raise ReferenceImportError(f"{w}: missing a buffer of 'k', 'k_max', 'norm_factor'")
    k, k_max, norm = int(scalars["k"]), int(scalars["k_max"]), float(scalars["norm_factor"])
    if not 1 <= k_max <= d_sae:
        raise ReferenceImportError(
            f"{w}: need 1 <= k_max <= dict_size={d_sae}, got k_max={k_max}; the reference "
            "then clamps k̂ to dict_size, which softsae (k̂ ≤ k_max) does not express"
        )
    if not (math.isfinite(norm) and norm > 0):
        raise ReferenceImportError(f"{w}: norm_factor={norm} must be finite and > 0")
    trainer = read_trainer_config(files.config)
    used = {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "k_max", "alpha"}
    used |= {"norm_factor"} | {f"k_estimator.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    _check_unused(sd, used, w)
    cfg = SoftSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        k=min(max(k, 1), k_max),  # the training target; no effect on the forward
        k_max=k_max,
        k_estimator_hidden=hidden,
        rescale_acts_by_decoder_norm=False,
    )
    sae = SoftSAE(cfg)
    state = {
        "W_enc": _tensor(sd, "encoder.weight", (d_sae, d_in), w).T,
        "b_enc": _tensor(sd, "encoder.bias", (d_sae,), w),
        "W_dec": _tensor(sd, "decoder.weight", (d_in, d_sae), w).T,
        "b_dec": _tensor(sd, "b_dec", (d_in,), w),
        "k_est_W_enc": _tensor(sd, "k_estimator.0.weight", (hidden, d_in), w).T,
        "k_est_b_enc": _tensor(sd, "k_estimator.0.bias", (hidden,), w),
        "k_est_w_out": _tensor(sd, "k_estimator.2.weight", (1, hidden), w)[0],
        "k_est_b_out": _tensor(sd, "k_estimator.2.bias", (1,), w),
    }
    sae.load_state_dict({key: value.contiguous() for key, value in state.items()})
    if norm != 1.0:  # the reference reads x / norm_factor: fold it in (decode in x's units)
        sae.fold_activation_norm_scaling_factor(1.0 / norm)
    extra = {"k": k, "alpha": scalars["alpha"], "norm_factor": norm}
    for key, value in _metadata("softsae-ref", source, trainer, **extra).items():
        sae.cfg.metadata[key] = value
    return sae


class ReferenceFormat(NamedTuple):
    """A ``--format``: its converter, whether a probe file belongs to it, whether a config file
    must be there."""

    convert: Callable[[ReferenceFiles, str], SAE[Any]]
    has_probe: bool
    needs_config: bool


#: ``--format`` → its :class:`ReferenceFormat` (AdaptiveK's config holds ``min_k``/``max_k``).
FORMATS: dict[str, ReferenceFormat] = {
    "adaptivek-ref": ReferenceFormat(convert_adaptivek, has_probe=True, needs_config=True),
    "softsae-ref": ReferenceFormat(convert_softsae, has_probe=False, needs_config=False),
}


def reference_format(fmt: str) -> ReferenceFormat:
    """The format named ``fmt``, or :class:`ReferenceImportError` listing the known ones."""
    if fmt not in FORMATS:
        raise ReferenceImportError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


def import_reference(files: ReferenceFiles, fmt: str, source: str) -> SAE[Any]:
    """The reference checkpoint ``files`` of format ``fmt`` as this package's inference SAE
    (float32, CPU); ``source`` is recorded in ``metadata.imported_from``."""
    spec = reference_format(fmt)
    if spec.needs_config and files.config is None:
        raise ReferenceImportError(
            f"{files.weights.parent / CONFIG_NAMES[0]}: missing; it holds min_k and max_k"
        )
    return spec.convert(files, source)
