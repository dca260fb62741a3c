"""SAELens's ``LanguageModelSAETrainingRunner`` with exact resume, non-finite checks and safe saves.

:class:`TrainingRunner` changes four things, all in the runner's own override points:

- **Exact resume.** SAELens saves a mid-run checkpoint after a step's samples are counted but
  before ``n_training_steps`` is incremented, so a resumed trainer replays that step index for
  every step-keyed schedule (an upstream SAELens issue, docs/training.md). The step count is set
  back to ``n_training_samples / batch size`` after loading. SAELens also saves only the dataset
  position, not the activation mixing buffer nor the RNG that shuffles it; here the buffer is
  :class:`ResumableMixingBuffer` (SAELens's ``mixing_buffer`` with its state exposed) and its
  contents and the torch RNG state go into ``resume_state.safetensors`` in each checkpoint.
- **Non-finite values.** Each batch of activations and each loss is checked; a NaN/Inf stops the
  run with :class:`NonFiniteTrainingError` (step, bad rows, the last checkpoint kept) before any
  further checkpoint or the final SAE is written.
- **Safe final save.** The final SAE is written to a sibling temporary folder and renamed into
  ``output_path`` (:func:`sae_adaptive_plugin.outputs.replacing_dir`).
- **The SAE's own L0.** SAELens records the mean L0 of the last training window (for AdaptiveK
  partly its warm-up at ``k_max``, for SoftSAE partly its soft phase). After training, the
  trained SAE encodes :data:`HELDOUT_L0_BATCHES` further batches of the activation stream (never
  trained on); that mean is ``metadata.l0``, SAELens's value is kept as ``l0_training_window``
  (:func:`record_heldout_l0`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens import LanguageModelSAETrainingRunner
from safetensors.torch import load_file, save_file

from sae_adaptive_plugin.outputs import replacing_dir

logger = logging.getLogger("sae_adaptive_plugin")

#: this package's extra resume state in a SAELens checkpoint folder.
RESUME_STATE_FILENAME = "resume_state.safetensors"
#: batches of the activation stream, after training, on which the saved SAE's L0 is measured.
HELDOUT_L0_BATCHES = 4


@torch.no_grad()
def record_heldout_l0(sae: Any, batches: Iterator[torch.Tensor], n_batches: int) -> None:
    """Set ``sae.cfg.metadata.l0`` to the SAE's mean L0 on the next ``n_batches`` of ``batches``
    (raw activations: SAELens folds its activation scaling into the SAE when training ends),
    ``l0_heldout_tokens`` to their number of rows and ``l0_training_window`` to SAELens's
    training-window L0. A stream that has run out gives ``l0 = None`` (never the window mean)."""
    meta = sae.cfg.metadata
    meta.l0_training_window = meta.l0
    total, rows = 0.0, 0
    was_training = sae.training
    sae.eval()
    try:
        for _ in range(n_batches):
            try:
                batch = next(batches)
            except StopIteration:
                break
            code = sae.encode(batch)
            code = code.to_dense() if code.is_sparse else code  # use_sparse_activations
            active = (code != 0).sum(-1).reshape(-1)
            total += float(active.sum())
            rows += active.numel()
    finally:
        sae.train(was_training)
    meta.l0 = total / rows if rows else None
    meta.l0_heldout_tokens = rows


class NonFiniteTrainingError(RuntimeError):
    """Training met a NaN/Inf activation or loss and stopped."""


class ResumableMixingBuffer(Iterator[torch.Tensor]):
    """SAELens's ``mixing_buffer`` (same batches for the same RNG state) as an object whose
    state, the stored activations and the batches not served yet, can be saved and restored."""

    def __init__(
        self, loader: Iterator[torch.Tensor], buffer_size: int, batch_size: int, mix: float
    ) -> None:
        if buffer_size < batch_size:
            raise ValueError("Buffer size must be greater than or equal to batch size")
        self.loader = loader
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        self.mix = mix
        self.storage: torch.Tensor | None = None
        self.serving: torch.Tensor | None = None
        self.next_batch = 0

    @torch.no_grad()
    def __next__(self) -> torch.Tensor:
        bs = self.batch_size
        while True:
            if self.serving is not None and (self.next_batch + 1) * bs <= self.serving.shape[0]:
                batch = self.serving[self.next_batch * bs : (self.next_batch + 1) * bs]
                self.next_batch += 1
                return batch
            self.serving = None
            try:
                new = next(self.loader)
            except StopIteration:  # the rest of the storage, in whole batches, then the end
                if self.storage is None or self.storage.shape[0] < bs:
                    raise
                self.serving, self.storage, self.next_batch = self.storage, None, 0
                continue
            self.storage = new if self.storage is None else torch.cat([self.storage, new])
            if self.storage.shape[0] >= self.buffer_size:
                if self.mix > 0:
                    self.storage = self.storage[torch.randperm(self.storage.shape[0])]
                to_serve = self.storage.shape[0] - int(self.buffer_size * self.mix)
                cutoff = max(1, to_serve // bs) * bs
                self.serving, self.storage = self.storage[:cutoff], self.storage[cutoff:]
                self.next_batch = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stored activations and the batches not served yet (empty tensors for none)."""
        empty = torch.zeros(0)
        pending = (
            self.serving[self.next_batch * self.batch_size :] if self.serving is not None else None
        )
        return {
            "storage": (self.storage if self.storage is not None else empty).contiguous(),
            "pending": (pending if pending is not None else empty).contiguous(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.storage = state["storage"] if state["storage"].numel() else None
        self.serving = state["pending"] if state["pending"].numel() else None
        self.next_batch = 0


class TrainingRunner(LanguageModelSAETrainingRunner):
    """The SAELens runner with exact resume, non-finite checks and a safe final save."""

    last_checkpoint: Path | None = None

    def save_checkpoint(self, checkpoint_path: Path | None) -> None:
        super().save_checkpoint(checkpoint_path)
        if checkpoint_path is not None:
            self.save_resume_state(Path(checkpoint_path))

    def save_resume_state(self, checkpoint: Path) -> None:
        """Write :meth:`resume_state` into the checkpoint folder and remember the folder."""
        save_file(self.resume_state(), str(self.resume_state_file(checkpoint)))
        self.last_checkpoint = checkpoint

    def resume_state(self) -> dict[str, torch.Tensor]:
        """This process's data state: the mixing buffer's contents and the torch RNG state."""
        loader = self.activations_store._dataloader
        state = dict(loader.state_dict()) if isinstance(loader, ResumableMixingBuffer) else {}
        state["torch_rng_state"] = torch.get_rng_state()
        return state

    def resume_state_file(self, checkpoint: Path) -> Path:
        """Where :meth:`resume_state` is saved in a checkpoint folder."""
        return checkpoint / RESUME_STATE_FILENAME

    def save_final_sae(self, sae: Any, output_path: str, log_feature_sparsity: Any = None):
        with replacing_dir(output_path) as staging:
            super().save_final_sae(sae, str(staging), log_feature_sparsity=log_feature_sparsity)

    def run_trainer_with_interruption_handling(self, trainer: Any):
        store = self.activations_store
        buffer = ResumableMixingBuffer(
            store._iterate_filtered_activations(),
            buffer_size=store.n_batches_in_buffer * store.training_context_size,
            batch_size=store.train_batch_size_tokens,
            mix=store.activations_mixing_fraction,
        )
        store._dataloader = buffer
        if self.cfg.resume_from_checkpoint is not None:
            self._restore(trainer, buffer, Path(self.cfg.resume_from_checkpoint))
        self._check_non_finite(trainer)
        sae = super().run_trainer_with_interruption_handling(trainer)
        self.record_l0(sae)
        return sae

    def record_l0(self, sae: Any) -> None:
        """:func:`record_heldout_l0` on the next batches of this run's activation stream."""
        record_heldout_l0(sae, iter(self.activations_store), HELDOUT_L0_BATCHES)

    def _restore(self, trainer: Any, buffer: ResumableMixingBuffer, ckpt: Path) -> None:
        """Step count one behind in SAELens's mid-run checkpoints; buffer and RNG state."""
        batch = self.cfg.train_batch_size_tokens
        steps = trainer.n_training_samples // batch
        if trainer.n_training_samples % batch == 0 and trainer.n_training_steps == steps - 1:
            trainer.n_training_steps = steps
        state_file = self.resume_state_file(ckpt)
        if not state_file.is_file():
            logger.warning(
                "%s has no %s (not written by sae-adaptive train): the resumed run continues "
                "from the dataset position only, as SAELens does, and will not match an "
                "uninterrupted run exactly",
                ckpt,
                state_file.name,
            )
            return
        state = load_file(str(state_file))
        torch.set_rng_state(state.pop("torch_rng_state"))
        buffer_state = {k: state[k] for k in ("storage", "pending") if k in state}
        if buffer_state:
            buffer.load_state_dict(
                {k: v.to(self.activations_store.device) for k, v in buffer_state.items()}
            )
        self.last_checkpoint = ckpt

    def _check_non_finite(self, trainer: Any) -> None:
        """Wrap ``trainer.step``: a batch with NaN/Inf rows, or a NaN/Inf loss, stops the run."""
        step = trainer.step

        def checked_step(batch: torch.Tensor) -> Any:
            bad = int((~torch.isfinite(batch)).any(dim=-1).sum())
            if bad:
                self._stop(trainer, f"{bad} of {batch.shape[0]} activation rows hold NaN or Inf")
            output = step(batch)
            if not bool(torch.isfinite(output.loss.detach())):
                self._stop(trainer, f"the loss is {float(output.loss)}")
            return output

        trainer.step = checked_step

    def _stop(self, trainer: Any, what: str) -> None:
        kept = (
            f"the last good checkpoint is kept: {self.last_checkpoint} (resume with --resume)"
            if self.last_checkpoint is not None
            else "no checkpoint was written before it"
        )
        raise NonFiniteTrainingError(
            f"training stopped at step {trainer.n_training_steps} "
            f"({trainer.n_training_samples} samples trained): {what}; no SAE was saved to "
            f"output_path; {kept}"
        )
