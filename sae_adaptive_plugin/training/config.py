"""A YAML training config → a checked SAELens ``LanguageModelSAERunnerConfig``.

Every top-level key is a field of ``LanguageModelSAERunnerConfig``, ``logger:`` holds
``LoggingConfig`` fields and ``sae:`` names a registered training architecture (SAELens's own or
a plugin's) plus that architecture's config fields. Every key and value is checked before
anything heavy runs: an unknown key names itself and lists the allowed ones, a wrong type names
the key and the expected type, an unknown architecture lists the registered ones. For the command
line, ``logger.log_to_wandb`` defaults to false, ``sae.device``/``sae.dtype`` default to the
top-level ones, a float field accepts ``3e-4`` and an int field an integral float such as
``5e6``. The format, with an example, is in ``docs/training.md``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
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
