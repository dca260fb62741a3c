"""SAELens's runner and trainer, data-parallel over a ``torch.distributed`` process group.

:class:`DistributedTrainingRunner` is :class:`~sae_adaptive_plugin.training.runner.TrainingRunner`
changed in the runner's override points and on the trainer instance before ``fit`` (SAELens's own
loop runs unchanged): each rank reads a contiguous shard of the data and trains on
``train_batch_size_tokens / world_size`` rows per step while the trainer counts global samples;
parameters are broadcast from rank 0 and each gradient is averaged in a post-accumulate-grad hook
(before SAELens's clipping and Adam); firing counts are summed and steps-since-fired take the
minimum over ranks; the norm estimate averages the ranks'; BatchTopK-family selection and
threshold use the global batch; rank 0 writes checkpoints and the final SAE while every rank
writes its own data state (``resume_state.rank<R>.safetensors``); NaN/Inf checks are agreed by all
ranks. Semantics and measurements: docs/distributed.md.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sae_adaptive_plugin import distributed
from sae_adaptive_plugin.training.config import ConfigError
from sae_adaptive_plugin.training.runner import TrainingRunner


class DistributedTrainingRunner(TrainingRunner):
    """:class:`TrainingRunner` for one rank of a data-parallel run (see the module docstring)."""

    def __init__(self, cfg: Any, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self.world_size = distributed.world_size()
        self.rank = distributed.rank()
        self.rank_tokens = 0
        shard_activations_store(self.activations_store, self.rank, self.world_size)
        self.activations_store.train_batch_size_tokens = (
            cfg.train_batch_size_tokens // self.world_size
        )
        # SAELens restores one dataset position (rank 0's file); each rank restores its own
        self.activations_store.load_from_checkpoint = self._load_rank_position
        self.sae.cfg.metadata.world_size = self.world_size

    def resume_state_file(self, checkpoint: Path) -> Path:
        return checkpoint / f"resume_state.rank{self.rank}.safetensors"

    def resume_state(self) -> dict[str, torch.Tensor]:
        state = super().resume_state()
        store = self.activations_store
        state["n_dataset_processed"] = torch.tensor(store.n_dataset_processed)
        state["current_row_idx"] = torch.tensor(getattr(store, "current_row_idx", 0))
        state["rank_tokens"] = torch.tensor(self.rank_tokens)
        return state

    def _load_rank_position(self, checkpoint: str | Path) -> None:
        state_file = self.resume_state_file(Path(checkpoint))
        if not state_file.is_file():
            raise ConfigError(
                f"config key 'resume_from_checkpoint': {checkpoint} has no {state_file.name}: "
                f"it was not written by a {self.world_size}-process run of sae-adaptive train"
            )
        state = load_file(str(state_file))
        self.activations_store.load(str(state_file))  # fast-forwards to n_dataset_processed
        if hasattr(self.activations_store, "current_row_idx"):
            self.activations_store.current_row_idx = int(state["current_row_idx"])
        self.rank_tokens = int(state["rank_tokens"])

    def save_checkpoint(self, checkpoint_path: Path | None) -> None:
        if distributed.is_main():
            super().save_checkpoint(checkpoint_path)  # SAELens's files and rank 0's data state
        elif checkpoint_path is not None:
            self.save_resume_state(Path(checkpoint_path))

    def save_final_sae(self, sae: Any, output_path: str, log_feature_sparsity: Any = None):
        sae.cfg.metadata.world_size = self.world_size
        sae.cfg.metadata.tokens_per_rank = distributed.all_gather_object(self.rank_tokens)
        if distributed.is_main():
            super().save_final_sae(sae, output_path, log_feature_sparsity=log_feature_sparsity)
        distributed.barrier()

    def _check_non_finite(self, trainer: Any) -> None:
        """The NaN/Inf checks of :class:`TrainingRunner`, agreed by all ranks: a bad batch or loss
        on any rank stops every rank at the same step (before any checkpoint is written). Each
        check is one all_reduce of a device tensor and one host read."""
        step = trainer.step

        def on_any_rank(count: torch.Tensor) -> list[int]:
            counts = torch.zeros(self.world_size, dtype=torch.long, device=count.device)
            counts[self.rank] = count
            distributed.all_reduce_(counts)
            return [int(c) for c in counts.tolist()]

        def checked_step(batch: torch.Tensor) -> Any:
            bad = on_any_rank((~torch.isfinite(batch)).any(dim=-1).sum())
            if any(bad):
                where = ", ".join(f"rank {r}: {n}" for r, n in enumerate(bad) if n)
                self._stop(
                    trainer,
                    f"activation rows hold NaN or Inf ({where} of {batch.shape[0]} rows per rank)",
                )
            output = step(batch)
            bad = on_any_rank((~torch.isfinite(output.loss.detach())).any())
            if any(bad):
                ranks = ", ".join(str(r) for r, n in enumerate(bad) if n)
                self._stop(trainer, f"the loss is NaN or Inf on rank(s) {ranks}")
            return output

        trainer.step = checked_step

    def run_trainer_with_interruption_handling(self, trainer: Any):
        undo = make_data_parallel(trainer, self)
        try:
            sae = super().run_trainer_with_interruption_handling(trainer)
        finally:
            for restore in undo:
                restore()
        if distributed.is_main():  # rank 0 saves: its own held-out batches, no collective
            super().record_l0(sae)
        return sae

    def record_l0(self, sae: Any) -> None:
        """Nothing while the data-parallel patches are on (see above)."""


def shard_activations_store(store: Any, rank: int, world_size: int) -> None:
    """Give ``store`` (SAELens's ``ActivationsStore``, nothing read yet) this rank's contiguous
    shard of its token dataset or of its cached-activation dataset."""
    from datasets.distributed import split_dataset_by_node

    if store.dataset is not None:
        store.dataset = split_dataset_by_node(store.dataset, rank=rank, world_size=world_size)
        store.iterable_sequences = store._iterate_tokenized_sequences()
    if store.cached_activation_dataset is not None:
        store.cached_activation_dataset = split_dataset_by_node(
            store.cached_activation_dataset, rank=rank, world_size=world_size
        )


class GlobalBatchTopK(torch.nn.Module):
    """SAELens's ``BatchTopK`` selection over the global batch: keep the ReLU activations at or
    above the ``k · (global rows)``-th largest of all ranks'. That value is among each rank's own
    largest ``k · (global rows)``, so only those values are gathered."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = x.relu()
        ranks = distributed.world_size() if self.training else 1  # evaluation runs on rank 0 only
        n_keep = int(self.k * acts.shape[:-1].numel() * ranks)
        if n_keep == 0:
            return torch.zeros_like(acts)
        flat = acts.detach().flatten()
        candidates = flat.topk(min(n_keep, flat.numel())).values
        if ranks > 1:
            candidates = distributed.gather_rows(candidates)
        threshold = candidates.topk(n_keep).values[-1]
        return torch.where(acts >= threshold, acts, torch.zeros((), dtype=acts.dtype))


def _global_batchtopk(sae: Any) -> list[Any]:
    """Give a SAELens BatchTopK-family SAE (BatchTopK, Matryoshka) the global-batch selection and
    threshold update; returns the undo callables."""
    from sae_lens.saes.batchtopk_sae import BatchTopK

    if not isinstance(getattr(sae, "activation_fn", None), BatchTopK):
        return []
    local_fn = sae.activation_fn
    sae.activation_fn = GlobalBatchTopK(local_fn.k)
    update = sae.update_topk_threshold

    def update_with_global_min(acts_topk: torch.Tensor) -> None:
        # SAELens's own update, given the smallest selected activation of the global batch
        positive = acts_topk.detach()[acts_topk.detach() > 0]
        local = positive.min() if positive.numel() else acts_topk.new_tensor(math.inf)
        smallest = distributed.all_reduce_(local.reshape(1).clone(), "min")
        update(torch.where(torch.isfinite(smallest), smallest, torch.zeros_like(smallest)))

    sae.update_topk_threshold = update_with_global_min

    def undo() -> None:
        sae.activation_fn = local_fn
        del sae.update_topk_threshold

    return [undo]


def make_data_parallel(trainer: Any, runner: DistributedTrainingRunner) -> list[Any]:
    """Make SAELens's ``trainer`` one rank of a data-parallel run (module docstring); returns
    callables that undo the changes to the SAE (call them when training ends)."""
    sae = trainer.sae
    world = distributed.world_size()
    with torch.no_grad():
        for tensor in [*sae.parameters(), *sae.buffers()]:
            distributed.broadcast_(tensor)

    def average_grad(param: torch.Tensor) -> None:
        if param.grad is not None:
            distributed.all_reduce_(param.grad, "mean")

    undo = [
        p.register_post_accumulate_grad_hook(average_grad).remove
        for p in sae.parameters()
        if p.requires_grad
    ]
    undo += _global_batchtopk(sae)

    step = trainer.step

    def data_parallel_step(batch: torch.Tensor) -> Any:
        freq_before = trainer.act_freq_scores.clone()
        samples_before = trainer.n_training_samples
        output = step(batch)
        with torch.no_grad():
            fired = distributed.all_reduce_(trainer.act_freq_scores - freq_before)
            trainer.act_freq_scores = freq_before + fired
            distributed.all_reduce_(trainer.n_forward_passes_since_fired, "min")
        trainer.n_training_samples = samples_before + batch.shape[0] * world
        runner.rank_tokens += batch.shape[0]
        return output

    trainer.step = data_parallel_step

    scaler = trainer.activation_scaler
    mean_norm = scaler._calculate_mean_norm

    @functools.wraps(mean_norm)
    def global_mean_norm(*args: Any, **kwargs: Any) -> float:
        local = torch.tensor(mean_norm(*args, **kwargs), dtype=torch.float64)
        return float(distributed.all_reduce_(local, "mean"))  # every rank reads as many rows

    scaler._calculate_mean_norm = global_mean_norm

    save = trainer.save_checkpoint

    def save_on_rank_zero(
        checkpoint_name: str, base_path: Any = None, wandb_aliases: Any = None
    ) -> None:
        if distributed.is_main():
            save(checkpoint_name, base_path=base_path, wandb_aliases=wandb_aliases)
        else:
            base = base_path if base_path is not None else trainer.cfg.checkpoint_path
            if base is not None:
                path = Path(base) / checkpoint_name
                path.mkdir(parents=True, exist_ok=True)
                runner.save_checkpoint(path)
        distributed.barrier()

    trainer.save_checkpoint = save_on_rank_zero
    return undo


def runner_for_launch(cfg: Any) -> type[TrainingRunner]:
    """The runner class for this process: under torchrun (``WORLD_SIZE > 1``) join the process
    group, adapt ``cfg`` to this rank (its CUDA device, rank 0's checkpoint run id, wandb on rank
    0 only) and return :class:`DistributedTrainingRunner`; otherwise :class:`TrainingRunner`.
    Raises ``ConfigError`` for a config that cannot be split over the ranks."""
    env = distributed.init_from_env(cuda=str(cfg.device).startswith("cuda"))
    if cfg.resume_from_checkpoint is not None:
        check_resume_world_size(Path(cfg.resume_from_checkpoint), env.world_size)
    if env.world_size == 1:
        return TrainingRunner
    world = env.world_size
    if cfg.train_batch_size_tokens % world:
        raise ConfigError(
            f"config key 'train_batch_size_tokens': {cfg.train_batch_size_tokens} is the global "
            f"batch and must be a multiple of the number of processes ({world})"
        )
    if cfg.sae.normalize_activations == "covariance_whitening":
        raise ConfigError(
            "config key 'sae.normalize_activations': 'covariance_whitening' is not supported "
            f"with {world} processes; use 'expected_average_only_in' or 'none'"
        )
    for key in ("device", "llm_device", "act_store_device"):
        setattr(cfg, key, distributed.device_for_rank(getattr(cfg, key), env.local_rank))
    cfg.sae.device = distributed.device_for_rank(cfg.sae.device, env.local_rank)
    cfg.checkpoint_path = distributed.broadcast_object(cfg.checkpoint_path)
    if env.rank != 0:
        cfg.logger.log_to_wandb = False
    return DistributedTrainingRunner


def check_resume_world_size(checkpoint: Path, world_size: int) -> None:
    """Raise ``ConfigError`` unless ``checkpoint`` was written by a run of ``world_size`` ranks
    (each rank resumes from its own data state)."""
    import json

    from sae_lens.constants import SAE_CFG_FILENAME

    cfg_file = checkpoint / SAE_CFG_FILENAME
    saved = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    written_by = int((saved.get("metadata") or {}).get("world_size") or 1)
    if written_by != world_size:
        raise ConfigError(
            f"config key 'resume_from_checkpoint': {checkpoint} was written by a run of "
            f"{written_by} process(es); resume it with the same number (now {world_size})"
        )
