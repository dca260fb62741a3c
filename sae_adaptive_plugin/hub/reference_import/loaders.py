"""Where reference checkpoints come from (a local trainer folder, a Hub repo), SAELens's loader
protocols over them, and ``sae-adaptive import``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import SAE

from sae_adaptive_plugin.hub.reference_import.checkpoints import (
    CONFIG_NAMES,
    ReferenceFiles,
    ReferenceImportError,
    import_reference,
    reference_format,
)

# -- where the files are ---------------------------------------------------------------------------


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def local_files(path: str | Path, fmt: str) -> ReferenceFiles:
    """The files of a local trainer folder, or of the folder of a given weights file."""
    with_probe = reference_format(fmt).has_probe
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

    with_probe = reference_format(fmt).has_probe
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


def _check_repo_id(source: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError as exc:
        raise ReferenceImportError(
            f"{source}: no such local path, and not a Hub repo id ({exc})"
        ) from exc


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
            _check_repo_id(args.source)
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
