"""Run a training from a checked config: ``sae-adaptive train`` and :func:`train_from_yaml`.

Local models and datasets (:mod:`sae_adaptive_plugin.data.local_lm`) are loaded here and handed
to the runner as ``override_model`` / ``override_dataset``. The runner is
:class:`~sae_adaptive_plugin.training.runner.TrainingRunner`: a resumed run ends where the
uninterrupted one does, NaN/Inf activations or losses stop the run, and the final SAE is renamed
into ``output_path`` only when complete (a non-empty ``output_path`` needs ``--overwrite``).
Before the first step the schedules are checked against the run length and, once the model is
loaded, the hook name and ``d_in`` against the model (:mod:`.preflight`); ``--print-config`` runs
the checks that need no model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_adaptive_plugin.training.config import ConfigError, build_runner_config, check_devices
from sae_adaptive_plugin.training.config_sources import load_config_mapping
from sae_adaptive_plugin.training.preflight import check_hook_and_width, check_run_length

#: SAELens's warnings for a model / dataset handed to its runner: "... will override the one
#: specified in your configuration ... not reproducible". Untrue when the config names the folder.
_OVERRIDE_WARNINGS = {
    "model": "You just passed in a model which will override",
    "dataset": "You just passed in a dataset which will override",
}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: list[str]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(tuple(self.prefixes))


@contextlib.contextmanager
def _without_override_warnings(which: list[str]) -> Iterator[None]:
    """Drop SAELens's override warnings for ``which`` (``"model"``, ``"dataset"``): the model or
    dataset was loaded here from the path the config names, so the run is reproducible."""
    sae_lens_logger = logging.getLogger("sae_lens")
    drop = _DropMessages([_OVERRIDE_WARNINGS[w] for w in which])
    sae_lens_logger.addFilter(drop)
    try:
        yield
    finally:
        sae_lens_logger.removeFilter(drop)


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
    from sae_adaptive_plugin.training.distributed_runner import runner_for_launch

    check_devices(cfg)
    check_run_length(cfg)
    runner_cls = runner_for_launch(cfg)  # under torchrun: this rank's process group and config
    if cfg.output_path is not None:
        refuse_existing(cfg.output_path, overwrite, "output_path")

    from_config = []  # what is loaded here from the config's own paths
    if model is None:
        from_config.append("model")
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
        try:
            model = local_lm.load_model(
                cfg.model_name,
                device=cfg.llm_device or cfg.device,
                model_class_name="AutoModelForCausalLM",
                model_from_pretrained_kwargs=cfg.model_from_pretrained_kwargs,
                hook_names=[cfg.hook_name],
            )
        except ValueError as e:
            if "hook_names" not in str(e):
                raise
            raise ConfigError(
                f"config key 'hook_name': {cfg.hook_name!r} is not a module of the model "
                f"{cfg.model_name} (hook names of a Hugging Face model are its module names, "
                f"e.g. model.layers.6): {e}"
            ) from e
    if dataset is None and cfg.dataset_path and local_lm.is_local_dataset(cfg.dataset_path):
        try:
            dataset = local_lm.load_local_dataset(cfg.dataset_path)
        except ValueError as e:
            raise ConfigError(f"config key 'dataset_path': {e}") from e
        from_config.append("dataset")
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
    with _without_override_warnings(from_config):
        runner = runner_cls(cfg, override_model=model, override_dataset=dataset)
    check_hook_and_width(runner.model, cfg.hook_name, cfg.sae.d_in, cfg.hook_head_index)
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
        return _print_config(cfg)
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
    from sae_adaptive_plugin.distributed import is_main

    if not is_main():  # under torchrun rank 0 reports
        return 0
    if result.start_samples:
        print(f"resumed at {result.start_samples} of {result.total_samples} training tokens")
    meta = result.sae.cfg.metadata
    print(f"architecture: {result.sae.cfg.architecture()}  d_sae: {result.sae.cfg.d_sae}")
    print(_l0_line(meta))
    if result.output_path is not None:
        print(f"saved SAE: {result.output_path}")
    if result.checkpoint_dir is not None and result.checkpoint_dir.is_dir():
        ckpts = sorted(p for p in result.checkpoint_dir.iterdir() if p.is_dir())
        for p in ckpts:
            print(f"checkpoint: {p}")
    return 0


def _print_config(cfg: Any) -> int:
    """``train --print-config``: every check ``train`` makes before loading the model that does
    not depend on this machine; an unavailable device is a warning here (an error in ``train``)."""
    try:
        check_run_length(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        check_devices(cfg)
    except ConfigError as e:
        print(f"warning: {e} (train on this machine would stop here)", file=sys.stderr)
    print(json.dumps(cfg.to_dict(), indent=2, default=str))
    return 0


def _l0_line(meta: Any) -> str:
    """What ``train`` says about the trained SAE's L0 (``metadata.l0`` and its provenance)."""
    if meta.l0 is not None and meta.l0_heldout_tokens:
        held_out = f"(mean over {meta.l0_heldout_tokens} held-out tokens)"
        parts = [f"L0 of the saved SAE: {meta.l0:.3f} {held_out}"]
    else:
        parts = ["L0 of the saved SAE: not measured (no activation batch left after training)"]
    if meta.l0_training_window is not None:
        parts.append(f"training-window mean L0: {meta.l0_training_window:.3f}")
    if meta.num_dead_features is not None:
        parts.append(f"dead features: {meta.num_dead_features}")
    return "  ".join(parts)
