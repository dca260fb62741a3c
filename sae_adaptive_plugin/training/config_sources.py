"""Where a training config mapping comes from: a YAML file, ``--set KEY=VALUE`` overrides, and a
SAELens checkpoint's ``runner_cfg.json`` (for ``--resume`` without a YAML file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sae_adaptive_plugin.training.config import (
    _NOT_SETTABLE,
    ConfigError,
    _fields,
    known_architectures,
)


def _parse_override(text: str) -> tuple[list[str], Any]:
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE (e.g. sae.k=64 or lr=1e-4)")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def load_config_mapping(
    path: str | Path | None, overrides: list[str] | None = None, resume: str | None = None
) -> dict[str, Any]:
    """The raw config mapping: the YAML file (or the checkpoint's saved runner config), ``--set``
    overrides applied, ``resume_from_checkpoint`` set from ``resume``."""
    import yaml

    if path is not None:
        path = Path(path)
        if path.is_dir():
            from sae_lens.constants import RUNNER_CFG_FILENAME

            hint = (
                f"; it holds {RUNNER_CFG_FILENAME}: to continue that run use --resume {path}"
                if (path / RUNNER_CFG_FILENAME).is_file()
                else ""
            )
            raise ConfigError(f"CONFIG {path} is a folder, not a YAML file{hint}")
        if not path.is_file():
            raise ConfigError(f"CONFIG {path}: no such file")
        text = path.read_text()
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a training config must be a mapping of keys to values")
    elif resume is not None:
        raw = _config_from_checkpoint(resume)
    else:
        raise ConfigError("give a CONFIG.yaml, or --resume CHECKPOINT to reuse its saved config")
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{k}' is not a mapping")
        node[keys[-1]] = value
    if resume is not None:
        raw["resume_from_checkpoint"] = str(resume)
    return raw


def _config_from_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    from sae_lens.constants import RUNNER_CFG_FILENAME

    cfg_path = Path(checkpoint) / RUNNER_CFG_FILENAME
    if not cfg_path.is_file():
        raise ConfigError(f"--resume {checkpoint}: no {RUNNER_CFG_FILENAME} in that folder")
    try:
        saved = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(saved, dict) or not isinstance(saved.get("sae"), dict):
        raise ConfigError(f"{cfg_path} is not a SAELens runner config (no 'sae' mapping)")
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    known_architectures()
    arch = saved["sae"].get("architecture")
    if arch not in SAE_TRAINING_CLASS_REGISTRY:
        from sae_adaptive_plugin.hub import missing_architecture_hint

        raise ConfigError(
            f"checkpoint {checkpoint}: architecture {arch!r} is not registered (registered: "
            + ", ".join(known_architectures())
            + "). "
            + missing_architecture_hint(str(arch))
        )
    sae_fields = set(_fields(SAE_TRAINING_CLASS_REGISTRY[arch][1])) - {"metadata"}
    runner_fields = set(_fields(LanguageModelSAERunnerConfig)) - _NOT_SETTABLE
    raw = {k: v for k, v in saved.items() if k in runner_fields}
    raw["sae"] = {k: v for k, v in saved["sae"].items() if k in sae_fields}
    raw["sae"]["architecture"] = arch
    raw["logger"] = {
        k: v for k, v in saved.get("logger", {}).items() if k in _fields(LoggingConfig)
    }
    # the saved checkpoint_path already carries the old run id: SAELens appends a fresh one
    if raw.get("checkpoint_path"):
        raw["checkpoint_path"] = str(Path(raw["checkpoint_path"]).parent)
    for key in ("llm_device", "act_store_device"):
        if raw.get(key) == "None":
            raw[key] = None
    return raw
