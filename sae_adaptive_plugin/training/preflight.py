"""Checks run before the first training step, so that a mistake costs no model load or no step.

- :func:`check_run_length`: the SAE's schedules fit the run (SoftSAE's hard phase, AdaptiveK's
  warm-up), by the training config's ``check_run_length``.
- :func:`check_hook_and_width`: the hook exists in the loaded model (else the nearest hook names)
  and its activations are ``d_in`` wide (one forward pass over two tokens).

Both raise :class:`~sae_adaptive_plugin.training.config.ConfigError` naming the config key.
"""

from __future__ import annotations

import difflib
from typing import Any

from sae_adaptive_plugin.training.config import ConfigError


def check_run_length(cfg: Any) -> None:
    """Raise :class:`ConfigError` when the SAE's schedules do not fit a run of
    ``cfg.total_training_steps`` steps (configs with a ``check_run_length`` method)."""
    import warnings

    check = getattr(cfg.sae, "check_run_length", None)
    if not callable(check):
        return
    total = int(cfg.total_training_steps)
    if total < 1:
        raise ConfigError(
            f"config key 'training_tokens': {cfg.training_tokens} tokens make no training step "
            f"of train_batch_size_tokens={cfg.train_batch_size_tokens}; raise training_tokens"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the SAE warns again when the trainer binds it
        try:
            check(total)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"sae block (architecture {cfg.sae.architecture()!r}): {e}") from e


def nearest_hooks(model: Any, hook_name: str, n: int = 3) -> list[str]:
    """The ``n`` hook names of ``model`` closest to ``hook_name`` (difflib's ratio)."""
    names = list(getattr(model, "hook_dict", {}))
    close = difflib.get_close_matches(hook_name, names, n=n, cutoff=0.0)
    return close


def unknown_hook_error(model: Any, hook_name: str, key: str) -> ConfigError:
    """The error for a hook name the model does not have: the nearest names it does have."""
    near = ", ".join(repr(h) for h in nearest_hooks(model, hook_name))
    count = len(getattr(model, "hook_dict", {}))
    return ConfigError(
        f"{key}: hook {hook_name!r} is not a hook point of the model (nearest of its {count} "
        f"hook points: {near})"
    )


def hook_width(model: Any, hook_name: str, hook_head_index: int | None = None) -> int:
    """Width of one token's activation at ``hook_name`` as SAELens's activation store reads it
    (heads flattened for ``[.., head, d_head]`` hooks, one head with ``hook_head_index``)."""
    import torch

    params = next(iter(model.parameters()), None)
    device = params.device if params is not None else "cpu"
    tokens = torch.zeros((1, 2), dtype=torch.long, device=device)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook_name])
    act = cache[hook_name]
    if act.ndim == 4:
        return int(act.shape[-1]) if hook_head_index is not None else int(act.shape[-2:].numel())
    return int(act.shape[-1])


def check_hook_and_width(
    model: Any,
    hook_name: str,
    d_in: int,
    hook_head_index: int | None = None,
    *,
    hook_key: str = "config key 'hook_name'",
    d_in_key: str = "config key 'sae.d_in'",
    advice: str | None = None,
) -> None:
    """Raise :class:`ConfigError` unless ``model`` has ``hook_name`` and its activations there
    are ``d_in`` wide; ``hook_key`` / ``d_in_key`` say where the values came from, ``advice``
    what to do about a width mismatch (default: set d_in or choose another hook)."""
    if hook_name not in getattr(model, "hook_dict", {}):
        raise unknown_hook_error(model, hook_name, hook_key)
    width = hook_width(model, hook_name, hook_head_index)
    if width != d_in:
        advice = advice or f"set d_in to {width} or choose a hook whose width is {d_in}"
        raise ConfigError(
            f"{d_in_key}: d_in={d_in} but the model's activations at hook {hook_name!r} are "
            f"{width} wide; {advice}"
        )
