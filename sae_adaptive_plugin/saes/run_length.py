"""The run's length, told to SAEs whose schedules default to fractions of it.

SAELens's ``SAETrainer`` knows ``cfg.total_training_steps`` but never passes it to the SAE. Importing
this module wraps ``SAETrainer.__init__`` once so that, right after the trainer is built, an SAE
with a ``bind_run_length(total_steps)`` method receives it (and can refuse a schedule that does
not fit the run before the first step). Training loops other than SAELens's call
``sae.bind_run_length(n)`` themselves.
"""

from __future__ import annotations

import functools
from typing import Any

_MARK = "_sae_adaptive_binds_run_length"


def _sae_lens_mismatch(what: str) -> RuntimeError:
    """The error for a SAELens whose ``SAETrainer`` no longer looks as the hook expects."""
    from importlib import metadata

    try:
        version = metadata.version("sae-lens")
    except metadata.PackageNotFoundError:
        version = "(version unknown)"
    try:
        wanted = next(
            r.split(";")[0]
            for r in metadata.requires("sae-adaptive-plugin") or []
            if r.replace("_", "-").startswith("sae-lens")
        )
    except (metadata.PackageNotFoundError, StopIteration):
        wanted = "the sae-lens range in sae-adaptive-plugin's pyproject.toml"
    return RuntimeError(
        f"sae-adaptive-plugin cannot tell the SAE the run's length: in the installed SAELens "
        f"{version}, {what}. Its trainer hook (saes/run_length.py) was written for {wanted}; "
        f"install a SAELens in that range, or call sae.bind_run_length(total_steps) yourself "
        f"with a training loop of your own"
    )


def install_trainer_hook() -> None:
    """Wrap ``sae_lens.training.sae_trainer.SAETrainer.__init__`` (idempotent). The wrap reads
    ``trainer.sae`` and ``trainer.cfg.total_training_steps`` after SAELens's own ``__init__``;
    where either is missing it raises ``RuntimeError`` naming the installed SAELens version."""
    from sae_lens.training.sae_trainer import SAETrainer

    original = SAETrainer.__init__
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        sae = getattr(self, "sae", None)
        if sae is None:
            given = [*args, *kwargs.values()]
            if any(callable(getattr(a, "bind_run_length", None)) for a in given):
                raise _sae_lens_mismatch("SAETrainer keeps no .sae after __init__")
            return
        bind = getattr(sae, "bind_run_length", None)
        if not callable(bind):
            return
        total = getattr(getattr(self, "cfg", None), "total_training_steps", None)
        if total is None:
            raise _sae_lens_mismatch("SAETrainer has no cfg.total_training_steps")
        bind(int(total))

    setattr(__init__, _MARK, True)
    SAETrainer.__init__ = __init__  # type: ignore[method-assign]


def fraction_of_run(fraction: float, total_steps: int) -> int:
    """``round(fraction · total_steps)`` as a step index."""
    return round(fraction * total_steps)


def unknown_run_length_error(architecture: str, fields: list[str]) -> RuntimeError:
    """The error for a schedule that defaults to fractions of a run whose length is unknown."""
    names = ", ".join(fields)
    verb = "defaults" if len(fields) == 1 else "default"
    return RuntimeError(
        f"{architecture}: {names} {verb} to fractions of the run, but the run length is "
        "unknown. Train through SAELens's SAETrainer (it tells the SAE), call "
        f"sae.bind_run_length(total_steps) first, or set {names} to step counts"
    )


install_trainer_hook()
