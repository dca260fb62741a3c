"""``sae-adaptive train CONFIG.yaml``: a YAML file → SAELens ``LanguageModelSAETrainingRunner``.

The YAML maps one-to-one onto SAELens's ``LanguageModelSAERunnerConfig``: every top-level key is
one of its fields, ``logger:`` holds ``LoggingConfig`` fields, and ``sae:`` names a registered
training architecture (SAELens's own or a plugin's) plus that architecture's config fields::

    model_name: pythia-70m-deduped
    hook_name: blocks.3.hook_resid_post
    dataset_path: NeelNanda/pile-small-tokenized-2b
    context_size: 128
    training_tokens: 50_000_000
    sae:
      architecture: adaptivek
      d_in: 512
      d_sae: 8192
      k_min: 8
      k_max: 128
    logger:
      log_to_wandb: true

Every key and value is checked before anything heavy runs: an unknown key names itself and lists
the allowed ones, a wrong type names the key and the expected type, an unknown architecture lists
the registered ones. Differences from constructing the dataclass directly, all for the command line:
``logger.log_to_wandb`` defaults to **false** (wandb is opt-in); ``sae.device``/``sae.dtype``
default to the top-level ``device``/``dtype``; a float field accepts ``3e-4`` (which YAML 1.1 reads
as a string) and an int field accepts an integral float such as ``5e6``.

``model_name`` may be a folder in this package's local model format, a ``.gguf`` file or a
Hugging Face model folder (SAELens's ``AutoModelForCausalLM`` path, hook names such as
``model.layers.6``), and ``dataset_path`` a local dataset (see :mod:`sae_adaptive_plugin.data.local_lm`); they are loaded here and handed to the runner as
``override_model`` / ``override_dataset`` (a local dataset is memory-mapped, so ``streaming`` does
not apply to it). Any other name goes through SAELens's loading unchanged.

Resume: ``--resume CHECKPOINT`` (or the ``resume_from_checkpoint`` key) resumes the SAELens trainer
state, SAE weights and activation-store position from a checkpoint folder written by SAELens
(``<checkpoint_path>/<run id>/<n_samples>/``); without CONFIG the run's config is read from the
checkpoint's ``runner_cfg.json``. The runner is
:class:`~sae_adaptive_plugin.training.runner.TrainingRunner`: a resumed run ends where the
uninterrupted one does, NaN/Inf activations or losses stop the run, and the final SAE is renamed
into ``output_path`` only when complete (a non-empty ``output_path`` needs ``--overwrite``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A training config key or value that SAELens's runner config cannot take."""


#: runner-config fields that the YAML may not set (computed by SAELens or nested blocks).
_NOT_SETTABLE = {"sae", "logger", "sae_lens_version", "sae_lens_training_version"}
#: SAE-config fields that the runner fills in.
_SAE_NOT_SETTABLE = {"metadata", "architecture"}

_FLOAT_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (possibly converted) or raise."""
    if tp is Any or tp is typing.Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        # try exact-type members first so that `bool | int` keeps a bool and `int | str` an int
        for member in sorted(args, key=lambda a: a in (float, str)):
            if member is type(None):
                continue
            try:
                return _coerce(value, member, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(
            f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(
            f"config key '{key}': {value!r} is not allowed; allowed values: "
            + ", ".join(repr(a) for a in args)
        )
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"config key '{key}': expected a list ({_type_name(tp)}), "
                f"got {type(value).__name__} {value!r}"
            )
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(
                    f"config key '{key}': expected {len(args)} items, got {len(value)}"
                )
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(
                f"config key '{key}': expected a mapping, got {type(value).__name__} {value!r}"
            )
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:  # an annotation we do not model (TypeVar, forward reference): let SAELens decide
        return value
    raise ConfigError(
        f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
    )


def _fields(cls: type) -> dict[str, Any]:
    """Settable dataclass fields of ``cls`` → resolved type annotation (``Any`` if unresolvable)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a forward reference we cannot resolve: fall back to no type checks
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _required(cls: type) -> set[str]:
    return {
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    }


def _check_block(
    block: Any,
    allowed: dict[str, Any],
    where: str,
    what: str,
    belongs_elsewhere: dict[str, str] | None = None,
) -> dict[str, Any]:
    if not isinstance(block, dict):
        raise ConfigError(
            f"config key '{where or 'top level'}': expected a mapping, got {type(block).__name__}"
        )
    out = {}
    prefix = f"{where}." if where else ""
    for key, value in block.items():
        if not isinstance(key, str) or key not in allowed:
            import difflib

            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            if belongs_elsewhere and key in belongs_elsewhere:
                hint = f" (it belongs in the {belongs_elsewhere[key]} block)"
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{hint} in {what}; allowed keys: "
                + ", ".join(sorted(allowed))
            )
        out[key] = _coerce(value, allowed[key], prefix + key)
    return out


def known_architectures() -> list[str]:
    """Names of every registered SAELens training architecture (built-in and plugins)."""
    import sae_lens  # noqa: F401  (importing registers the plugins)
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    from sae_adaptive_plugin.registration.loader import load_plugins

    load_plugins()
    return sorted(SAE_TRAINING_CLASS_REGISTRY)


#: (block, field, what it must be, check): values that pass the type check but defeat training.
_RANGE_CHECKS: tuple[tuple[str, str, str, Any], ...] = (
    ("", "training_tokens", "an integer > 0", lambda v: v > 0),
    ("", "train_batch_size_tokens", "an integer > 0", lambda v: v > 0),
    ("", "lr", "a finite number > 0", lambda v: math.isfinite(v) and v > 0),
    ("sae", "d_in", "an integer > 0", lambda v: v > 0),
    ("sae", "d_sae", "an integer > 0", lambda v: v > 0),
)


def _check_ranges(block: str, values: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the field and its range for the values of
    :data:`_RANGE_CHECKS` in ``values`` (the ``block`` block: ``""`` top level, ``"sae"``)."""
    for where, key, allowed, ok in _RANGE_CHECKS:
        if where == block and key in values and values[key] is not None and not ok(values[key]):
            name = f"{where}.{key}" if where else key
            raise ConfigError(f"config key '{name}': must be {allowed}, got {values[key]!r}")


def check_devices(cfg: Any) -> None:
    """Raise :class:`ConfigError` for a ``cuda``/``mps`` device of the runner config ``cfg`` that
    this torch cannot use (checked when training starts: ``--print-config`` works anywhere)."""
    import torch

    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    devices = [(k, getattr(cfg, k, None)) for k in ("device", "llm_device", "act_store_device")]
    devices.append(("sae.device", cfg.sae.device))
    for key, device in devices:
        kind = str(device).split(":")[0] if device else None
        if kind in available and not available[kind]:
            raise ConfigError(
                f"config key '{key}': device {device!r} is not available (torch "
                f"{torch.__version__}, torch.{kind} not available); use 'cpu' or install a "
                f"torch build with {kind} support"
            )


def build_runner_config(raw: dict[str, Any]) -> Any:
    """Validate a config mapping (parsed YAML) and build ``LanguageModelSAERunnerConfig``."""
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    if not isinstance(raw, dict):
        raise ConfigError(f"a training config must be a mapping, got {type(raw).__name__}")
    runner_fields = {
        k: v for k, v in _fields(LanguageModelSAERunnerConfig).items() if k not in _NOT_SETTABLE
    }
    top_allowed = {**runner_fields, "sae": dict, "logger": dict}
    elsewhere = {
        name: "sae:"
        for _, cfg_cls in SAE_TRAINING_CLASS_REGISTRY.values()
        for name in _fields(cfg_cls)
    }
    elsewhere["architecture"] = "sae:"
    elsewhere.update({name: "logger:" for name in _fields(LoggingConfig)})
    top = _check_block(
        raw, top_allowed, "", "the runner config (LanguageModelSAERunnerConfig)", elsewhere
    )
    _check_ranges("", top)

    if "sae" not in top:
        raise ConfigError(
            "missing required key 'sae' (a mapping with 'architecture' and that "
            "architecture's config fields)"
        )
    sae_raw = dict(top.pop("sae"))
    arch = sae_raw.pop("architecture", None)
    architectures = known_architectures()
    if arch is None:
        raise ConfigError(
            "missing required key 'sae.architecture'; registered architectures: "
            + ", ".join(architectures)
        )
    if arch not in SAE_TRAINING_CLASS_REGISTRY:
        from sae_adaptive_plugin.hub import missing_architecture_hint

        raise ConfigError(
            f"config key 'sae.architecture': unknown architecture {arch!r}; registered "
            "architectures: " + ", ".join(architectures) + ". " + missing_architecture_hint(arch)
        )
    sae_cfg_cls = SAE_TRAINING_CLASS_REGISTRY[arch][1]
    sae_allowed = {k: v for k, v in _fields(sae_cfg_cls).items() if k not in _SAE_NOT_SETTABLE}
    sae_kwargs = _check_block(
        sae_raw,
        sae_allowed,
        "sae",
        f"the sae block of architecture {arch!r} ({sae_cfg_cls.__name__})",
    )
    missing = sorted(_required(sae_cfg_cls) - set(sae_kwargs) - _SAE_NOT_SETTABLE)
    if missing:
        raise ConfigError(
            "missing required key(s) "
            + ", ".join(f"'sae.{m}'" for m in missing)
            + f" for architecture {arch!r}"
        )
    _check_ranges("sae", sae_kwargs)
    sae_kwargs.setdefault("device", top.get("device", "cpu"))
    sae_kwargs.setdefault("dtype", top.get("dtype", "float32"))
    try:
        sae_cfg = sae_cfg_cls(**sae_kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"sae block (architecture {arch!r}): {e}") from e

    logger_kwargs = _check_block(
        top.pop("logger", {}) or {},
        _fields(LoggingConfig),
        "logger",
        "the logger block (LoggingConfig)",
    )
    logger_kwargs.setdefault("log_to_wandb", False)
    try:
        return LanguageModelSAERunnerConfig(
            sae=sae_cfg, logger=LoggingConfig(**logger_kwargs), **top
        )
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"runner config: {e}") from e


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


@dataclass
class TrainResult:
    """What one ``sae-adaptive train`` run produced."""

    sae: Any
    output_path: Path | None
    checkpoint_dir: Path | None
    start_samples: int
    total_samples: int


def run_training(
    cfg: Any, model: Any = None, dataset: Any = None, overwrite: bool = False
) -> TrainResult:
    """Run SAELens's ``LanguageModelSAETrainingRunner`` (as
    :class:`~sae_adaptive_plugin.training.runner.TrainingRunner`: exact resume, NaN/Inf checks, the
    final SAE renamed into place) on ``cfg``.

    ``model`` / ``dataset`` override the config's; when not given, a local ``model_name`` /
    ``dataset_path`` is loaded here and anything else is left to SAELens. A non-empty
    ``output_path`` raises :class:`~sae_adaptive_plugin.outputs.OutputExistsError` unless
    ``overwrite``.
    """
    import torch

    from sae_adaptive_plugin.data import local_lm
    from sae_adaptive_plugin.outputs import refuse_existing
    from sae_adaptive_plugin.training.runner import TrainingRunner

    check_devices(cfg)
    if cfg.output_path is not None:
        refuse_existing(cfg.output_path, overwrite, "output_path")

    if model is None and local_lm.is_local_model(cfg.model_name):
        model = local_lm.load_local_model(cfg.model_name, device=cfg.llm_device or cfg.device)
    elif model is None and (
        cfg.model_class_name == "AutoModelForCausalLM"
        or local_lm.uses_hf_causal_lm(cfg.model_name, cfg.model_from_pretrained_kwargs)
    ):
        # a GGUF file / HF folder / Hub name as SAELens's HookedProxyLM, with the tokenizer read
        # through gguf_file too (SAELens's own loader reads it without)
        cfg.model_class_name = "AutoModelForCausalLM"
        # SAELens's runner default {"center_writing_weights": False} is TransformerLens-only
        cfg.model_from_pretrained_kwargs = {
            k: v
            for k, v in (cfg.model_from_pretrained_kwargs or {}).items()
            if k != "center_writing_weights"
        }
        model = local_lm.load_model(
            cfg.model_name,
            device=cfg.llm_device or cfg.device,
            model_class_name="AutoModelForCausalLM",
            model_from_pretrained_kwargs=cfg.model_from_pretrained_kwargs,
            hook_names=[cfg.hook_name],
        )
    if dataset is None and cfg.dataset_path and local_lm.is_local_dataset(cfg.dataset_path):
        try:
            dataset = local_lm.load_local_dataset(cfg.dataset_path)
        except ValueError as e:
            raise ConfigError(f"config key 'dataset_path': {e}") from e
    if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ConfigError("the dataset given to the runner has no rows")
    start = 0
    if cfg.resume_from_checkpoint is not None:
        ckpt = Path(cfg.resume_from_checkpoint)
        from sae_lens.constants import TRAINER_STATE_FILENAME

        state_file = ckpt / TRAINER_STATE_FILENAME
        if not state_file.is_file():
            raise ConfigError(
                f"config key 'resume_from_checkpoint': {ckpt} is not a SAELens checkpoint "
                f"(no {TRAINER_STATE_FILENAME})"
            )
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        start = int(state["n_training_samples"])
    torch.manual_seed(cfg.seed)
    runner = TrainingRunner(cfg, override_model=model, override_dataset=dataset)
    sae = runner.run()
    return TrainResult(
        sae=sae,
        output_path=Path(cfg.output_path) if cfg.output_path else None,
        checkpoint_dir=Path(cfg.checkpoint_path) if cfg.checkpoint_path else None,
        start_samples=start,
        total_samples=cfg.training_tokens,
    )


def train_from_yaml(
    path: str | Path | None,
    overrides: list[str] | None = None,
    resume: str | None = None,
    model: Any = None,
    dataset: Any = None,
    overwrite: bool = False,
) -> TrainResult:
    """Python entry point of ``sae-adaptive train``."""
    raw = load_config_mapping(path, overrides, resume)
    return run_training(build_runner_config(raw), model=model, dataset=dataset, overwrite=overwrite)


def train_command(args: argparse.Namespace) -> int:
    try:
        raw = load_config_mapping(args.config, args.overrides, args.resume)
        cfg = build_runner_config(raw)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2, default=str))
        return 0
    from sae_adaptive_plugin.outputs import OutputExistsError
    from sae_adaptive_plugin.training.runner import NonFiniteTrainingError

    try:
        result = run_training(cfg, overwrite=args.overwrite)
    except (ConfigError, OutputExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteTrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.start_samples:
        print(f"resumed at {result.start_samples} of {result.total_samples} training tokens")
    meta = result.sae.cfg.metadata
    print(f"architecture: {result.sae.cfg.architecture()}  d_sae: {result.sae.cfg.d_sae}")
    if getattr(meta, "l0", None) is not None:
        print(f"final-window mean L0: {meta.l0:.3f}  dead features: {meta.num_dead_features}")
    if result.output_path is not None:
        print(f"saved SAE: {result.output_path}")
    if result.checkpoint_dir is not None and result.checkpoint_dir.is_dir():
        ckpts = sorted(p for p in result.checkpoint_dir.iterdir() if p.is_dir())
        for p in ckpts:
            print(f"checkpoint: {p}")
    return 0
