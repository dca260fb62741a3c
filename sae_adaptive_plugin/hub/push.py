"""Publish SAEs to the Hugging Face Hub in SAELens's layout, and check them before loading.

:func:`push_to_hub` uploads one inference SAE folder (``cfg.json``, ``sae_weights.safetensors``,
``sparsity.safetensors`` and ``runner_cfg.json`` where present) under the folder ``sae_id`` of a
Hub model repo, creating the repo (and the branch ``revision``) if needed, together with a model
card (``README.md``: ``library_name: saelens``, tags, a training summary read from ``cfg.json``
and a loading snippet) — all in one commit, so a failed upload changes nothing on the Hub, and
the local folder is only ever read. A SAELens training checkpoint (a trainer checkpoint folder, or
a ``cfg.json`` of a training config) is first converted to its inference form in a temporary
directory. SAELens then loads the result with ``SAE.from_pretrained("USER/REPO", "SAE_ID")``
(a repo id absent from its ``pretrained_saes.yaml`` is used as the repo and ``sae_id`` as the
folder; weights are read from safetensors only).

:func:`check_architecture` / :func:`load_from_hub` turn SAELens's bare ``KeyError`` for an
architecture it does not know into an :class:`UnknownArchitectureError` naming the package that
provides it. The ``sae-adaptive push`` sub-command wraps :func:`push_to_hub`.

Nothing heavy is imported at module level (this module is a CLI command module).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_adaptive_plugin.provenance import (
    PACKAGE_NAME,
    PROVIDER_METADATA_KEY,
    PROVIDER_VERSION_METADATA_KEY,
)
from sae_adaptive_plugin.registration.plugin import PACKAGE_ARCHITECTURES

#: Architectures provided by this package (also when it is not installed, to name it in errors).

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
RUNNER_CFG_FILENAME = "runner_cfg.json"
TRAINER_STATE_FILENAME = "trainer_state.pt"
ACTIVATION_SCALER_FILENAME = "activation_scaler.json"
#: What a published SAE folder holds (SAELens's own layout).
SAE_FILES = (CFG_FILENAME, WEIGHTS_FILENAME, SPARSITY_FILENAME, RUNNER_CFG_FILENAME)
README_FILENAME = "README.md"

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_CARD_MARK = "<!-- sae-adaptive-plugin:card -->"
_BASE_CFG_FIELDS = {
    "architecture",
    "d_in",
    "d_sae",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
    "metadata",
}


class UnknownArchitectureError(ValueError):
    """A ``cfg.json`` names an architecture that SAELens has no class for in this interpreter."""


class HubPushError(RuntimeError):
    """An upload to the Hub failed; the local files are untouched and the message says what to retry."""


@dataclass
class PushResult:
    """What :func:`push_to_hub` published."""

    repo_id: str
    sae_id: str
    revision: str
    commit_oid: str | None
    commit_url: str | None
    files: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    converted_from_training: bool = False


# ------------------------------------------------------------------------------------------------
# architectures
# ------------------------------------------------------------------------------------------------


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


def check_architecture(cfg: dict[str, Any], source: str = "cfg.json") -> str:
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
    cfg_path = hf_hub_download(hub_repo, f"{folder}/{CFG_FILENAME}", force_download=force_download)
    cfg = json.loads(Path(cfg_path).read_text())
    check_architecture(cfg, source=f"{hub_repo}/{folder}/{CFG_FILENAME}")
    return SAE.from_pretrained(
        repo_id, sae_id, device=device, dtype=dtype, force_download=force_download, **kwargs
    )


# ------------------------------------------------------------------------------------------------
# local folder → inference folder
# ------------------------------------------------------------------------------------------------


def _read_cfg(path: Path) -> dict[str, Any]:
    cfg_path = path / CFG_FILENAME
    if not path.is_dir():
        raise FileNotFoundError(f"PATH {path} is not a directory (expected an SAE folder)")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"PATH {path} has no {CFG_FILENAME}: not a SAELens SAE folder")
    if not (path / WEIGHTS_FILENAME).is_file():
        found = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"PATH {path} has no {WEIGHTS_FILENAME} (only safetensors weights are published); "
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
    check_architecture(cfg, source=str(path / CFG_FILENAME))
    check_weights(path / WEIGHTS_FILENAME)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*model_from_pretrained_kwargs")
            return SAE.load_from_disk(str(path), device=device)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(
            f"{path}: {CFG_FILENAME} and {WEIGHTS_FILENAME} do not make an SAE: "
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
            f"{path / CFG_FILENAME} is a training checkpoint of architecture {architecture!r}, "
            "which has no SAELens training class in this interpreter; install "
            + (f"the package {provider!r}" if provider else "the plugin package that provides it")
        )
    with warnings.catch_warnings():  # SAELens's advice on loading the LM, irrelevant here
        warnings.filterwarnings("ignore", message=".*model_from_pretrained_kwargs")
        sae = TrainingSAE.load_from_disk(path, device="cpu")
    scaler_path = path / ACTIVATION_SCALER_FILENAME
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


# ------------------------------------------------------------------------------------------------
# model card
# ------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def training_summary(
    cfg: dict[str, Any], sparsity_path: str | Path | None = None
) -> dict[str, Any]:
    """The facts the model card shows, from ``cfg.json`` (and ``sparsity.safetensors``)."""
    meta = cfg.get("metadata") or {}
    details = meta.get("training_architecture_details") or {}
    summary: dict[str, Any] = {
        "architecture": cfg.get("architecture"),
        "training_architecture": meta.get("training_architecture"),
        "model": meta.get("model_name"),
        "hook": meta.get("hook_name"),
        "hook_head_index": meta.get("hook_head_index"),
        "dataset": meta.get("dataset_path"),
        "context_size": meta.get("context_size"),
        "d_in": cfg.get("d_in"),
        "d_sae": cfg.get("d_sae"),
        "dtype": cfg.get("dtype"),
        "normalize_activations": cfg.get("normalize_activations"),
        "sae_lens_version": meta.get("sae_lens_training_version") or meta.get("sae_lens_version"),
        "provider_version": meta.get(PROVIDER_VERSION_METADATA_KEY),
    }
    # architecture settings: every inference field beyond SAELens's base ones (k, k_max, …)
    settings = {k: v for k, v in cfg.items() if k not in _BASE_CFG_FIELDS}
    # k settings of the training config that the inference config does not carry
    for key, value in details.items():
        if key not in settings and (key == "k" or key.startswith("k_") or "_k" in key):
            settings[key] = value
    summary["settings"] = settings
    summary["l0"], summary["l0_source"] = meta.get("l0"), "from training, final sparsity window"
    summary["dead_features"] = meta.get("num_dead_features")
    summary["dead_source"] = "from training: not fired within the dead-feature window"
    if sparsity_path is not None and Path(sparsity_path).is_file():
        from safetensors.torch import load_file

        log_sparsity = load_file(str(sparsity_path)).get("sparsity")
        if log_sparsity is not None:
            freq = 10.0 ** log_sparsity.double()
            if summary["l0"] is None:
                summary["l0"] = float(freq.sum())
                summary["l0_source"] = "sum of feature firing frequencies in sparsity.safetensors"
            if summary["dead_features"] is None:
                summary["dead_features"] = int((log_sparsity <= -9.999).sum())
                summary["dead_source"] = "zero firing frequency in sparsity.safetensors"
    return summary


def _section(repo_id: str, sae_id: str, summary: dict[str, Any], provider: str | None) -> str:
    rows: list[tuple[str, str]] = []
    arch = f"`{summary['architecture']}`"
    if summary.get("training_architecture") not in (None, summary["architecture"]):
        arch += f" (trained as `{summary['training_architecture']}`)"
    rows.append(("architecture", arch))
    if provider:
        version = summary.get("provider_version")
        rows.append(("provided by", f"`{provider}`" + (f" {version}" if version else "")))
    for key, label in (
        ("model", "model"),
        ("hook", "hook"),
        ("hook_head_index", "hook head index"),
        ("dataset", "dataset"),
        ("context_size", "context size"),
    ):
        if summary.get(key) is not None:
            rows.append((label, f"`{summary[key]}`"))
    rows.append(("d_in / d_sae", f"{summary['d_in']} / {summary['d_sae']}"))
    if summary["settings"]:
        settings = ", ".join(f"`{k}={_fmt(v)}`" for k, v in summary["settings"].items())
        rows.append(("settings (k …)", settings))
    if summary.get("l0") is not None:
        rows.append(("L0", f"{_fmt(float(summary['l0']))} ({summary['l0_source']})"))
    if summary.get("dead_features") is not None:
        dead = int(summary["dead_features"])
        share = f", {100.0 * dead / summary['d_sae']:.2f}%" if summary.get("d_sae") else ""
        rows.append(("dead features", f"{dead}{share} ({summary['dead_source']})"))
    for key, label in (("dtype", "dtype"), ("normalize_activations", "normalize_activations")):
        if summary.get(key) is not None:
            rows.append((label, f"`{summary[key]}`"))
    if summary.get("sae_lens_version"):
        rows.append(("SAELens", summary["sae_lens_version"]))
    if summary.get("converted_from"):
        rows.append(("published from", summary["converted_from"]))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    install = f"pip install {provider}" if provider else "pip install sae-lens"
    note = (
        f"  # {provider} registers `{summary['architecture']}` into SAELens when installed"
        if provider
        else ""
    )
    return (
        f"<!-- sae-adaptive-plugin:begin {sae_id} -->\n"
        f"## `{sae_id}`\n\n"
        f"```bash\n{install}\n```\n\n"
        f"| | |\n|---|---|\n{table}\n\n"
        f"```python\nfrom sae_lens import SAE{note}\n\n"
        f'sae = SAE.from_pretrained("{repo_id}", "{sae_id}")\n```\n'
        f"<!-- sae-adaptive-plugin:end {sae_id} -->\n"
    )


def _split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    import yaml

    if text.startswith("---"):
        parts = text.split("\n---", 1)
        if len(parts) == 2:
            try:
                meta = yaml.safe_load(parts[0][3:]) or {}
            except yaml.YAMLError:
                meta = None
            if isinstance(meta, dict):
                return meta, parts[1].lstrip("-").lstrip("\n")
    return {}, text


def model_card(
    repo_id: str,
    sae_id: str,
    summary: dict[str, Any],
    existing: str | None = None,
    provider: str | None = None,
) -> str:
    """The repo's ``README.md`` with this SAE's section added or replaced.

    Sections of other SAEs in ``existing`` (and any text a person wrote there) are kept; the YAML
    front matter keeps its keys, gets ``library_name: saelens`` and the union of the tags.
    """
    import yaml

    meta, body = _split_front_matter(existing or "")
    tags = meta.get("tags") or []
    tags = [str(tags)] if isinstance(tags, str) else [str(t) for t in tags]
    for tag in ("saelens", "sparse-autoencoder", PACKAGE_NAME, summary["architecture"]):
        if tag and tag not in tags:
            tags.append(tag)
    meta["library_name"] = "saelens"
    meta["tags"] = tags
    if _CARD_MARK not in body and body.strip():
        body = body.rstrip("\n") + f"\n\n{_CARD_MARK}\n"  # a person's README: append below it
    elif _CARD_MARK not in body:
        body = (
            f"{_CARD_MARK}\n# Sparse autoencoders for SAELens\n\n"
            f"```bash\npip install {PACKAGE_NAME}\n```\n\n"
            f"Sparse autoencoders (SAEs) in [SAELens](https://github.com/decoderesearch/SAELens)'s "
            f"format, published with [{PACKAGE_NAME}](https://pypi.org/project/{PACKAGE_NAME}/). "
            "Each folder below is one SAE (`cfg.json`, `sae_weights.safetensors`, and "
            "`sparsity.safetensors` / `runner_cfg.json` where available); load it with "
            '`SAE.from_pretrained("REPO", "FOLDER")`. Adaptive architectures (`adaptivek`, '
            f"`softsae`, `hierarchical_topk`) need `pip install {PACKAGE_NAME}` — SAELens then "
            "finds them without any import.\n"
        )
    section = _section(repo_id, sae_id, summary, provider)
    pattern = re.compile(
        rf"<!-- sae-adaptive-plugin:begin {re.escape(sae_id)} -->.*?"
        rf"<!-- sae-adaptive-plugin:end {re.escape(sae_id)} -->\n?",
        re.S,
    )
    if pattern.search(body):
        body = pattern.sub(lambda _: section, body, count=1)
    else:
        body = body.rstrip("\n") + "\n\n" + section
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n{body}"


# ------------------------------------------------------------------------------------------------
# push
# ------------------------------------------------------------------------------------------------


def _check_ids(repo_id: str, sae_id: str, revision: str | None) -> None:
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise ValueError(
            f"--repo-id must look like USER/REPO (letters, digits, '-', '_', '.'), got {repo_id!r}"
        )
    parts = sae_id.split("/") if isinstance(sae_id, str) else [""]
    if (
        not sae_id
        or sae_id.startswith("/")
        or "\\" in sae_id
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ValueError(
            f"--sae-id must be a relative folder name such as 'blocks.8.hook_resid_post' "
            f"(no empty, '.' or '..' parts, no backslashes), got {sae_id!r}"
        )
    if revision is not None and (not revision or revision.startswith("/")):
        raise ValueError(f"--revision must be a branch name, got {revision!r}")


def _retry_hint(path: Path, repo_id: str, sae_id: str, revision: str, private: bool) -> str:
    q = shlex.quote
    cmd = f"sae-adaptive push {q(str(path))} --repo-id {q(repo_id)} --sae-id {q(sae_id)}"
    if private:
        cmd += " --private"
    if revision != "main":
        cmd += f" --revision {q(revision)}"
    return cmd


def push_to_hub(
    path: str | Path,
    repo_id: str,
    sae_id: str,
    private: bool = False,
    revision: str | None = None,
    *,
    commit_message: str | None = None,
    token: str | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> PushResult:
    """Publish the SAE folder ``path`` to ``repo_id`` under the folder ``sae_id``.

    Args:
        path: a SAELens SAE folder (inference, or a training checkpoint, converted first).
        repo_id: ``USER/REPO`` (created if missing, ``private`` applies only then).
        sae_id: the folder inside the repo; ``SAE.from_pretrained(repo_id, sae_id)`` loads it.
        revision: branch to commit to (created from ``main`` if missing); default ``main``.
        commit_message: defaults to ``"Upload SAE <sae_id>"``.
        token: Hub token (defaults to huggingface_hub's usual lookup).

    Returns a :class:`PushResult`; raises :class:`HubPushError` when the Hub refused or the
    connection failed (the SAE is then not committed, and the local folder is untouched).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from tqdm.auto import tqdm

    say = log or (lambda _msg: None)
    path = Path(path)
    _check_ids(repo_id, sae_id, revision)
    branch = revision or "main"
    cfg = _read_cfg(path)
    retry = _retry_hint(path, repo_id, sae_id, branch, private)

    steps = tqdm(total=4, desc=f"push {sae_id}", unit="step", disable=not show_progress)
    with tempfile.TemporaryDirectory(prefix="sae-adaptive-push-") as tmp:
        source, converted = path, False
        steps.set_postfix_str("checking")
        if is_training_checkpoint(path, cfg):
            say(f"{path} is a training checkpoint: converting to the inference SAE first")
            source, converted = convert_to_inference(path, Path(tmp) / "inference"), True
            cfg = _read_cfg(source)
        architecture = check_architecture(cfg, source=str(source / CFG_FILENAME))
        load_sae_folder(source)  # complete, finite weights and a valid config; else nothing is sent
        provider = architecture_provider(architecture, cfg)
        files = {name: source / name for name in SAE_FILES if (source / name).is_file()}
        cfg_bytes = files[CFG_FILENAME].read_bytes()
        if provider and (cfg.get("metadata") or {}).get(PROVIDER_METADATA_KEY) != provider:
            cfg_out = dict(cfg)
            cfg_out["metadata"] = {**(cfg.get("metadata") or {}), PROVIDER_METADATA_KEY: provider}
            cfg_bytes = json.dumps(cfg_out).encode()
        summary = training_summary(cfg, files.get(SPARSITY_FILENAME))
        if converted:
            summary["converted_from"] = "a training checkpoint, converted to the inference SAE"
        steps.update()

        api = HfApi(token=token)
        try:
            steps.set_postfix_str("creating repo")
            api.create_repo(repo_id, private=private, exist_ok=True)
            if branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            existing_files = set(api.list_repo_files(repo_id, revision=branch))
            steps.update()

            steps.set_postfix_str("model card")
            readme = None
            if README_FILENAME in existing_files:
                try:
                    readme_path = hf_hub_download(
                        repo_id, README_FILENAME, revision=branch, token=token
                    )
                    readme = Path(readme_path).read_text(encoding="utf-8")
                except (EntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError):
                    readme = None
            card = model_card(repo_id, sae_id, summary, existing=readme, provider=provider)
            steps.update()

            operations: list[Any] = [
                CommitOperationAdd(f"{sae_id}/{CFG_FILENAME}", cfg_bytes),
                *(
                    CommitOperationAdd(f"{sae_id}/{name}", str(file))
                    for name, file in files.items()
                    if name != CFG_FILENAME
                ),
                CommitOperationAdd(README_FILENAME, card.encode("utf-8")),
            ]
            stale = sorted(
                f"{sae_id}/{name}"
                for name in SAE_FILES
                if name not in files and f"{sae_id}/{name}" in existing_files
            )
            operations += [CommitOperationDelete(p) for p in stale]
            sizes = ", ".join(
                f"{name} ({(len(cfg_bytes) if name == CFG_FILENAME else file.stat().st_size):,} B)"
                for name, file in files.items()
            )
            say(f"uploading to {repo_id}@{branch}/{sae_id}: {sizes} + {README_FILENAME}")
            steps.set_postfix_str("uploading")
            info = api.create_commit(
                repo_id,
                operations,
                commit_message=commit_message or f"Upload SAE {sae_id}",
                revision=branch,
            )
            steps.update()
        except (HfHubHTTPError, OSError, ValueError) as e:
            steps.close()
            raise HubPushError(
                f"upload of {path} to {repo_id} (revision {branch!r}, folder {sae_id!r}) failed: "
                f"{type(e).__name__}: {e}\nThe SAE was not committed (the repo or branch may have been "
                f"created) and the local files in {path} are untouched. Retry with: {retry}"
            ) from e
        except Exception as e:  # network errors of httpx/requests, whatever the client uses
            steps.close()
            if type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "requests", "urllib3"):
                raise
            raise HubPushError(
                f"upload of {path} to {repo_id} (revision {branch!r}, folder {sae_id!r}) failed: "
                f"{type(e).__name__}: {e}\nThe SAE was not committed (the repo or branch may have been "
                f"created) and the local files in {path} are untouched. Retry with: {retry}"
            ) from e
        steps.close()
    return PushResult(
        repo_id=repo_id,
        sae_id=sae_id,
        revision=branch,
        commit_oid=getattr(info, "oid", None),
        commit_url=getattr(info, "commit_url", None),
        files=[f"{sae_id}/{name}" for name in files] + [README_FILENAME],
        deleted=stale,
        converted_from_training=converted,
    )


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def push_command(args: argparse.Namespace) -> int:
    try:
        result = push_to_hub(
            args.path,
            args.repo_id,
            args.sae_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
        )
    except HubPushError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"committed {result.commit_oid} to {result.repo_id}@{result.revision}")
    if result.commit_url:
        print(result.commit_url)
    print(
        "load with:\n    from sae_lens import SAE\n"
        f'    sae = SAE.from_pretrained("{result.repo_id}", "{result.sae_id}")'
    )
    return 0
