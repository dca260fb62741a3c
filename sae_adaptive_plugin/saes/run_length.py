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


def install_trainer_hook() -> None:
    """Wrap ``sae_lens.training.sae_trainer.SAETrainer.__init__`` (idempotent)."""
    from sae_lens.training.sae_trainer import SAETrainer

    original = SAETrainer.__init__
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def __init__(self: Any, cfg: Any, sae: Any, *args: Any, **kwargs: Any) -> None:
        original(self, cfg, sae, *args, **kwargs)
        bind = getattr(sae, "bind_run_length", None)
        if callable(bind):
            bind(int(self.cfg.total_training_steps))

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
