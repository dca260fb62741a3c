"""SAEs saved by the papers' reference code, as this package's SAELens architectures.

Formats (a trainer folder ``…/trainer_0/`` of ``dictionary_learning``, ``ae.pt`` or
``ae.safetensors`` beside ``config.json``; state dicts of ``nn.Linear``, weights ``[out, in]``):

- ``adaptivek-ref`` (hiyukie/adaptiveK, ``AutoEncoderDynamicTopK``): ``encoder.weight [F, D]``,
  ``encoder.bias``, ``decoder.weight [D, F]``, ``b_dec``; the ``LinearProbe`` in ``probe.pt``
  (``weights [D, 1]``, ``bias [1]``, scores clamped to ``[0, 10]``); ``min_k``/``max_k`` from the
  config. → ``adaptivek``, label range ``[0, 10]``, steepness 6: the same k per row and code.
- ``softsae-ref`` (St0pien/SoftSAE, ``SoftSAE``): the same four tensors, the buffers ``k``,
  ``k_max``, ``alpha``, ``norm_factor`` and ``k_estimator.{0,2}.{weight,bias}``. → ``softsae``
  (``k = ⌊k̂⌋``). The reference divides its input by ``norm_factor`` and decodes in those units;
  the import folds ``1/norm_factor`` in (SAELens's fold): same code and k, and ``decode`` returns
  ``norm_factor ×`` the reference's, the reconstruction of the input in its own units.

What the architectures cannot express (a k range above ``dict_size``) is refused naming the field.
Only safetensors and ``torch.load(weights_only=True)`` are read. docs/hub.md has the details.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import SAE
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
        return load_file(str(path))
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


#: ``--format`` → (SAELens loader name, converter, whether a probe file belongs to it).
FORMATS: dict[str, tuple[str, Callable[[ReferenceFiles, str], SAE[Any]], bool]] = {
    "adaptivek-ref": ("adaptivek_ref", convert_adaptivek, True),
    "softsae-ref": ("softsae_ref", convert_softsae, False),
}


def _format(fmt: str) -> tuple[str, Callable[[ReferenceFiles, str], SAE[Any]], bool]:
    if fmt not in FORMATS:
        raise ReferenceImportError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


def import_reference(files: ReferenceFiles, fmt: str, source: str) -> SAE[Any]:
    """The reference checkpoint ``files`` of format ``fmt`` as this package's inference SAE
    (float32, CPU); ``source`` is recorded in ``metadata.imported_from``."""
    _, convert, _ = _format(fmt)
    if fmt == "adaptivek-ref" and files.config is None:
        raise ReferenceImportError(
            f"{files.weights.parent / CONFIG_NAMES[0]}: missing; it holds min_k and max_k"
        )
    return convert(files, source)


# -- where the files are ---------------------------------------------------------------------------


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def local_files(path: str | Path, fmt: str) -> ReferenceFiles:
    """The files of a local trainer folder, or of the folder of a given weights file."""
    with_probe = _format(fmt)[2]
    path = Path(path)
    folder = path.parent if path.is_file() else path
    weights = path if path.is_file() else _first_existing(folder, ("ae.safetensors", "ae.pt"))
    if weights is None:
        raise ReferenceImportError(f"{folder}: no ae.safetensors or ae.pt in this folder")
    probe = _first_existing(folder, ("probe.safetensors", "probe.pt")) if with_probe else None
    return ReferenceFiles(weights, _first_existing(folder, CONFIG_NAMES), probe)


def hub_files(repo_id: str, folder: str, fmt: str, force_download: bool = False) -> ReferenceFiles:
    """The files of the trainer folder ``folder`` (``""`` or ``"."``: the repo's root) of a Hub
    repo, downloaded into the Hugging Face cache."""
    from huggingface_hub import errors, hf_hub_download

    # a file absent from the repo (not one absent from an offline cache: that error propagates)
    not_in_repo = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)

    with_probe = _format(fmt)[2]
    prefix = folder.strip("/")
    prefix = "" if prefix in ("", ".") else prefix + "/"

    def fetch(names: tuple[str, ...]) -> Path | None:
        for name in names:
            try:
                return Path(hf_hub_download(repo_id, prefix + name, force_download=force_download))
            except not_in_repo:
                continue
        return None

    weights = fetch(("ae.safetensors", "ae.pt"))
    if weights is None:
        raise ReferenceImportError(f"{repo_id}: no {prefix}ae.safetensors or {prefix}ae.pt")
    probe = fetch(("probe.safetensors", "probe.pt")) if with_probe else None
    return ReferenceFiles(weights, fetch(CONFIG_NAMES), probe)


# -- SAELens's loader protocols (NAMED_PRETRAINED_SAE_LOADERS and the config getters) -------------


def _for_saelens(
    sae: SAE[Any], device: str | None, overrides: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(cfg dict, state dict)`` as SAELens's loaders return them: ``device``/``dtype`` and the
    config's fields from ``overrides`` at the top level, other keys (``hook_name``,
    ``neuronpedia_id``, …) into ``metadata``."""
    cfg = sae.cfg.to_dict()
    fields = set(cfg) - {"metadata", "architecture"}
    for key, value in {**(overrides or {}), **({"device": device} if device else {})}.items():
        if key in fields:
            cfg[key] = value
        else:
            cfg["metadata"][key] = value
    dtype = getattr(torch, str(cfg["dtype"]).removeprefix("torch."))
    state = {
        key: value.to(device=cfg["device"], dtype=dtype if value.is_floating_point() else None)
        for key, value in sae.state_dict().items()
    }
    return cfg, state


def _from_hub(fmt, repo_id, folder_name, device, force_download, cfg_overrides):
    files = hub_files(repo_id, folder_name, fmt, force_download)
    sae = import_reference(files, fmt, f"{repo_id}:{folder_name}")
    return _for_saelens(sae, device, cfg_overrides)


def adaptivek_ref_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], None]:
    """SAELens converter (``converter=`` / ``conversion_func: adaptivek_ref``) of a Hub folder
    saved by hiyukie/adaptiveK."""
    args = ("adaptivek-ref", repo_id, folder_name, device, force_download, cfg_overrides)
    return (*_from_hub(*args), None)


def softsae_ref_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], None]:
    """SAELens converter (``converter=`` / ``conversion_func: softsae_ref``) of a Hub folder
    saved by St0pien/SoftSAE."""
    args = ("softsae-ref", repo_id, folder_name, device, force_download, cfg_overrides)
    return (*_from_hub(*args), None)


def get_adaptivek_ref_config_from_hf(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """SAELens config getter of ``adaptivek_ref`` (converts the checkpoint: its k range and
    probe decide the config)."""
    args = ("adaptivek-ref", repo_id, folder_name, device, force_download, cfg_overrides)
    return _from_hub(*args)[0]


def get_softsae_ref_config_from_hf(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """SAELens config getter of ``softsae_ref`` (converts the checkpoint: ``k_max`` and
    ``norm_factor`` live in its state dict)."""
    args = ("softsae-ref", repo_id, folder_name, device, force_download, cfg_overrides)
    return _from_hub(*args)[0]


def adaptivek_ref_disk_loader(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``SAE.load_from_disk(folder, converter=adaptivek_ref_disk_loader)``."""
    sae = import_reference(local_files(path, "adaptivek-ref"), "adaptivek-ref", str(path))
    return _for_saelens(sae, device, cfg_overrides)


def softsae_ref_disk_loader(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``SAE.load_from_disk(folder, converter=softsae_ref_disk_loader)``."""
    sae = import_reference(local_files(path, "softsae-ref"), "softsae-ref", str(path))
    return _for_saelens(sae, device, cfg_overrides)


#: SAELens loader name → (Hub loader, config getter).
SAELENS_LOADERS = {
    "adaptivek_ref": (adaptivek_ref_huggingface_loader, get_adaptivek_ref_config_from_hf),
    "softsae_ref": (softsae_ref_huggingface_loader, get_softsae_ref_config_from_hf),
}


def register_reference_loaders() -> list[str]:
    """Add the loaders to SAELens's ``NAMED_PRETRAINED_SAE_LOADERS`` and
    ``NAMED_PRETRAINED_SAE_CONFIG_GETTERS`` (a name already taken is left alone); returns the
    names now mapped to these loaders."""
    from sae_lens.loading import pretrained_sae_loaders as loaders

    mine = []
    for name, (loader, getter) in SAELENS_LOADERS.items():
        loaders.NAMED_PRETRAINED_SAE_LOADERS.setdefault(name, loader)
        loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS.setdefault(name, getter)
        if loaders.NAMED_PRETRAINED_SAE_LOADERS[name] is loader:
            mine.append(name)
    return mine


# -- sae-adaptive import ---------------------------------------------------------------------------


def import_command(args: Any) -> int:
    """``sae-adaptive import SOURCE --format F --out DIR``: a local trainer folder (or weights
    file) or a Hub repo (``--folder`` inside it) → a SAELens folder for ``SAE.load_from_disk``."""
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"sae-adaptive import: --out {out} exists and is not empty; choose a new folder")
        return 2
    try:
        if Path(args.source).exists():
            files = local_files(args.source, args.format)
            source = str(Path(args.source).resolve())
        else:
            files = hub_files(args.source, args.folder, args.format, args.force_download)
            source = f"{args.source}:{args.folder}"
        sae = import_reference(files, args.format, source)
    except (ReferenceImportError, OSError) as exc:
        print(f"sae-adaptive import: {exc}")
        return 2
    for key in ("hook_name", "model_name"):
        if getattr(args, key, None):
            sae.cfg.metadata[key] = getattr(args, key)
    sae.save_model(out)
    cfg = sae.cfg
    print(
        f"imported {args.format} {source} -> {out}: {cfg.architecture()} d_in={cfg.d_in} "
        f"d_sae={cfg.d_sae} k in [{getattr(cfg, 'k_min', 1)}, {cfg.k_max}], "
        f"hook {cfg.metadata.hook_name or '(unknown: pass --hook-name)'}"
    )
    print(f"load it with SAE.load_from_disk({str(out)!r})")
    return 0
