"""AdaptiveK's warm-up: train at ``k_max``, label rows with ``k*``, fit the probe, switch.

During the warm-up every row keeps ``k_max`` latents and the loss is a prefix loss
(``mse_loss`` + ``prefix_excess_loss``, i.e. ``mean_j ‖x − x̂_j‖²`` over the prefixes ``j`` = 8,
16, …, ``k_max``, or over all of them) or plain MSE (``warmup_loss``). In its second half each row gets the label
``k* = min { j : ‖x − x̂_j‖² ≤ τ · V }`` (``V``: the batch's mean variance, or the row's own with
``kstar_scale="row"``; ``τ`` chosen on the first labelled batch so the median ``k*`` is the target
``k``), and ``(x, k*)`` feeds a streaming ridge fit. At ``probe_warmup_steps`` the probe is fitted,
checked (label spread, held-out R² ≥ ``probe_min_r2``) and stored; the label range is shifted so
the switch batch's mean k is ``k``. At the switch the latents that fired inside their rows' ``k*``
less than ``resample_below`` × the mean count start again along the switch batch's residuals
(:mod:`~sae_adaptive_plugin.saes.switch_resample`). Checkpoints keep the ridge statistics, ``τ``
and those counts.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from sae_lens.saes.sae import TrainStepInput
from typing_extensions import override

from sae_adaptive_plugin.distributed import all_reduce_, gather_rows, local_rows
from sae_adaptive_plugin.ops.adaptive_k import (
    first_block_reaching,
    kstar_from_prefix_errors,
    kstar_in_block,
    shift_for_mean_k,
    threshold_for_median_kstar,
)
from sae_adaptive_plugin.probe import ComplexityProbe, RidgeAccumulator
from sae_adaptive_plugin.saes.switch_resample import fires_within_labels, resample_rarely_used
from sae_adaptive_plugin.saes.topk_family import (
    PREFIX_EXCESS_LOSS,
    StepEncoding,
    TopKEncoding,
    prefix_excess,
    refuse_deterministic_cuda_cumsum,
)

#: Prefix of the warm-up accumulator tensors in checkpoint state dicts.
ACC_PREFIX = "probe_acc."
#: State-dict key of the chosen ``k*`` threshold during the warm-up (not in the inference SAE).
KSTAR_TAU_KEY = "kstar_tau"
#: State-dict key of the warm-up's firing counts inside ``k*`` (``resample_below``; training only).
KSTAR_FIRES_KEY = "kstar_fires"
#: Default warm-up length, as a fraction of the run's training steps.
WARMUP_FRACTION = 0.25


class AdaptiveKWarmup:
    """The warm-up half of :class:`~sae_adaptive_plugin.saes.adaptivek.AdaptiveKTrainingSAE`."""

    # provided by the probe mixin and the TopK-family base it is combined with
    cfg: Any
    probe_weight: torch.Tensor
    probe_fitted: torch.Tensor
    is_adaptive: bool
    set_probe: Any
    prefix_errors_of: Any
    block_end_errors_of: Any
    errors_in_block_of: Any
    reconstructs_from_prefixes: Any
    reconstruction_from_prefixes: Any

    def start_warmup(self) -> None:
        """No statistics yet; the ``k*`` threshold is ``target_fvu`` (None: chosen later)."""
        self._acc: RidgeAccumulator | None = None
        self._pending_report: dict[str, float] | None = None
        self._kstar_tau: float | None = self.cfg.target_fvu
        #: the global batches' firings inside each row's k* over the labelled steps
        self._kstar_fires: torch.Tensor | None = None
        self.total_training_steps: int | None = None

    def bind_run_length(self, total_steps: int) -> None:
        """Resolve the warm-up for a run of ``total_steps`` steps (SAELens's trainer calls this);
        raises ``ValueError`` if a warm-up-fitted probe would come at or after the end."""
        self.total_training_steps = total_steps
        if self.cfg.probe_path is not None or self.is_adaptive:
            return
        warmup = self.cfg.resolved_warmup_steps(total_steps)
        if warmup >= total_steps:
            raise ValueError(
                f"adaptivek: probe_warmup_steps={warmup} is at or after the end of the run "
                f"({total_steps} training steps): the probe would never be fitted and every row "
                f"would use k_max. Set probe_warmup_steps in [1, {total_steps - 1}], leave it "
                f"unset (default {WARMUP_FRACTION:g} of the run) or give probe_path"
            )

    @property
    def warmup_steps(self) -> int:
        """Steps at ``k_max`` before the probe is fitted."""
        return self.cfg.resolved_warmup_steps(self.total_training_steps)

    def _is_labelling(self, step: int) -> bool:
        return not self.is_adaptive and step >= self.warmup_steps // 2

    # -- the training step's hooks (TopKFamilyTrainingSAE) ---------------------------------------

    def prepare_training_step(self, step_input: TrainStepInput) -> None:
        if not self.is_adaptive:  # the warm-up's labels need prefix errors: refuse from step 0
            refuse_deterministic_cuda_cumsum(step_input.sae_in.device, "adaptivek's warm-up")
        if not self.is_adaptive and step_input.n_training_steps >= self.warmup_steps:
            batch = gather_rows(step_input.sae_in.to(self.dtype))
            self.fit_probe_now(self.reshape_fn_in(batch))
            self.resample_at_switch(batch, seed=step_input.n_training_steps)

    def extra_losses(
        self, step_input: TrainStepInput, encoding: StepEncoding, mse_loss: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        assert isinstance(encoding, TopKEncoding)
        if self.is_adaptive or self.cfg.warmup_loss == "mse":
            return {PREFIX_EXCESS_LOSS: encoding.hidden_pre.new_zeros(())}
        return {PREFIX_EXCESS_LOSS: prefix_excess(self._warmup_errors(step_input, encoding))}

    def _warmup_errors(self, step_input: TrainStepInput, encoding: TopKEncoding) -> torch.Tensor:
        """The warm-up loss's prefix errors (once per step): at the block ends or at every
        prefix."""
        if self.cfg.warmup_loss == "block_ends":
            return self.block_end_errors_of(encoding)
        return self.prefix_errors_of(encoding)

    def training_reconstruction(
        self, step_input: TrainStepInput, encoding: StepEncoding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """During a prefix-loss warm-up, ``sae_out`` and ``mse_loss`` come from the warm-up's
        prefix pass (no separate decode) wherever the decode would give the same."""
        assert isinstance(encoding, TopKEncoding)
        if (
            self.is_adaptive
            or self.cfg.warmup_loss == "mse"
            or not self.reconstructs_from_prefixes()
        ):
            return super().training_reconstruction(step_input, encoding)  # type: ignore[misc]
        errors = self._warmup_errors(step_input, encoding)
        return self.reconstruction_from_prefixes(step_input, encoding, errors)

    def record_training_step(self, step_input: TrainStepInput, encoding: StepEncoding) -> None:
        assert isinstance(encoding, TopKEncoding)
        if not self._is_labelling(step_input.n_training_steps):
            return
        with torch.no_grad():
            # labels and ridge statistics from the global batch (every rank alike)
            labels = self._warmup_labels(encoding)
            rows = gather_rows(encoding.x_in.reshape(-1, self.cfg.d_in))
            if self.cfg.resample_below > 0:
                self._count_fires_within(encoding, labels)
        self.collect_warmup_labels(rows, labels)

    def _count_fires_within(self, encoding: TopKEncoding, labels: torch.Tensor) -> None:
        """Add the global batch's firings inside its rows' ``k*`` to :attr:`_kstar_fires`
        (every rank holds the same counts, so any rank's checkpoint has them all)."""
        width = encoding.selection.values.shape[-1]
        local = local_rows(labels, encoding.selection.values.numel() // width)
        fires = all_reduce_(fires_within_labels(encoding.selection, local, self.cfg.d_sae))
        if self._kstar_fires is None:
            self._kstar_fires = fires
        else:
            self._kstar_fires += fires.to(self._kstar_fires.device)

    @torch.no_grad()
    def _warmup_labels(self, encoding: TopKEncoding) -> torch.Tensor:
        """``k*`` of the global batch's rows. From every prefix's error on the first labelled
        batch (it also chooses ``τ``) or where the step has them anyway; otherwise by search
        (:func:`~sae_adaptive_plugin.ops.adaptive_k.kstar_in_block`): the block ends' errors,
        then the prefixes inside the first block whose end reaches ``τ·V``."""
        sae_in = gather_rows(encoding.sae_in)
        if self._kstar_tau is None or encoding.prefix_errors is not None:
            return self.kstar_from_errors(gather_rows(self.prefix_errors_of(encoding)), sae_in)
        threshold = self._kstar_tau * self._row_variance(sae_in)
        ends = gather_rows(self.block_end_errors_of(encoding).detach())
        block, reached = first_block_reaching(ends, threshold)
        width = encoding.selection.values.shape[-1]
        n_local = encoding.selection.values.numel() // width
        in_block = self.errors_in_block_of(encoding, local_rows(block, n_local))
        return kstar_in_block(gather_rows(in_block), block, reached, threshold, width)

    def extra_metrics(self, step_input: TrainStepInput, encoding: StepEncoding) -> dict[str, Any]:
        metrics: dict[str, Any] = {"probe_fitted": self.probe_fitted.detach().clone()}
        if self._pending_report is not None:
            metrics.update(self._pending_report)
            self._pending_report = None
        return metrics

    # -- k* labels and the ridge statistics --------------------------------------------------------

    def _acc_device(self) -> torch.device:
        dev = self.probe_weight.device
        return torch.device("cpu") if dev.type == "mps" else dev  # no float64 on mps

    def _new_accumulator(self) -> RidgeAccumulator:
        return RidgeAccumulator(
            self.cfg.d_in, n_folds=self.cfg.probe_n_folds, device=self._acc_device()
        )

    def collect_warmup_labels(self, x_in: torch.Tensor, labels: torch.Tensor) -> None:
        """Add this batch's rows ``x_in`` and their ``k*`` labels to the ridge statistics."""
        if self._acc is None:
            self._acc = self._new_accumulator()
        elif self._acc.device is not None and self._acc.device != self._acc_device():
            self._acc.to(self._acc_device())  # e.g. restored on the CPU, training on a GPU
        self._acc.update(x_in.reshape(-1, self.cfg.d_in), labels)

    @torch.no_grad()
    def _row_variance(self, sae_in: torch.Tensor) -> torch.Tensor:
        x = sae_in.reshape(-1, self.cfg.d_in)
        total_var = (x - x.mean(0)).pow(2).sum(-1)  # b_dec cancels: same as for the raw input
        if self.cfg.kstar_scale == "dataset":
            total_var = total_var.mean().expand_as(total_var)
        return total_var

    @torch.no_grad()
    def choose_kstar_threshold(self, errors: torch.Tensor, sae_in: torch.Tensor) -> float:
        """``τ`` that puts this batch's median ``k*`` at the target ``k`` (without one, at
        ``(k_min + k_max) / 2``)."""
        cfg = self.cfg
        middle = cfg.k if cfg.k is not None else round((cfg.k_min + cfg.k_max) / 2)
        return threshold_for_median_kstar(errors, self._row_variance(sae_in), middle)

    @torch.no_grad()
    def kstar_from_errors(self, errors: torch.Tensor, sae_in: torch.Tensor) -> torch.Tensor:
        """``k*`` of each row: the first prefix with error ``<= τ·V``, ``V`` the batch's mean
        variance ``mean_rows ‖x − batch mean‖²`` (``kstar_scale="dataset"``) or the row's own
        ``‖x − batch mean‖²`` (``"row"``); why the dataset scale: docs/notes_saes.md."""
        if self._kstar_tau is None:
            self._kstar_tau = self.choose_kstar_threshold(errors, sae_in)
        return kstar_from_prefix_errors(errors, self._row_variance(sae_in), self._kstar_tau)

    # -- the switch ----------------------------------------------------------------------------------

    @torch.no_grad()
    def fit_probe_now(self, x_in: torch.Tensor | None = None) -> ComplexityProbe:
        """Fit the probe from the warm-up statistics and switch to adaptive k. With a target
        ``k`` and a batch ``x_in``, the label range is shifted so that the batch's mean k is
        ``k`` (recorded as ``label_shift`` in the probe report)."""
        if self._acc is None or self._acc.n_samples < 2 * self.cfg.probe_n_folds:
            n = 0 if self._acc is None else self._acc.n_samples
            raise RuntimeError(
                f"adaptivek warm-up gathered {n} labelled rows, too few to fit the probe; "
                f"raise probe_warmup_steps (now {self.warmup_steps})"
            )
        probe = ComplexityProbe.from_accumulator(self._acc)
        assert probe.report is not None
        self._check_probe(probe)
        cfg, shift = self.cfg, 0.0
        if cfg.k is not None and x_in is not None:
            c = x_in.reshape(-1, cfg.d_in).float() @ probe.weight.to(x_in.device) + probe.bias
            shift = shift_for_mean_k(
                c, probe.label_min, probe.label_max, cfg.k_min, cfg.k_max, cfg.steepness, cfg.k
            )
        lo, hi = probe.label_min + shift, probe.label_max + shift
        self.set_probe(ComplexityProbe(probe.weight, probe.bias, lo, hi, report=probe.report))
        self._acc = None
        cfg.metadata.adaptivek_probe_report = {
            **probe.report.to_dict(),
            "target_fvu": self._kstar_tau,
            "label_min": probe.label_min,
            "label_max": probe.label_max,
            "label_shift": shift,
        }
        report = probe.report
        self._pending_report = {
            "probe_r2": report.r2,
            "probe_pearson": report.pearson,
            "probe_spearman": report.spearman,
            "probe_lambda": report.lam,
        }
        return probe

    @torch.no_grad()
    def resample_at_switch(self, batch: torch.Tensor, seed: int) -> int:
        """Start again the latents that fired inside their rows' ``k*`` less than
        ``resample_below`` × the mean latent's count over the labelled steps, along the
        residuals of the global ``batch`` after the adaptive encode
        (:mod:`~sae_adaptive_plugin.saes.switch_resample`). Returns how many; recorded as
        ``resampled_latents`` in the probe report."""
        fires, self._kstar_fires = self._kstar_fires, None
        below = self.cfg.resample_below
        n = 0 if fires is None else resample_rarely_used(self, fires, below, batch, seed)
        self.cfg.metadata.adaptivek_probe_report["resampled_latents"] = n
        if self._pending_report is not None:
            self._pending_report["resampled_latents"] = float(n)
        return n

    def _check_probe(self, probe: ComplexityProbe) -> None:
        """Refuse a probe whose per-row k would not follow the input."""
        assert probe.report is not None
        cfg = self.cfg
        tau = "auto" if cfg.target_fvu is None else cfg.target_fvu
        where = (
            f"target_fvu={tau} (threshold used {self._kstar_tau:.4g}), "
            f"k range [{cfg.k_min}, {cfg.k_max}], probe_warmup_steps={self.warmup_steps}"
        )
        other = (
            "a fixed target_fvu in (0, 1)"
            if cfg.target_fvu is None
            else "target_fvu=None (a threshold chosen from the warm-up's error curve)"
        )
        if probe.label_max - probe.label_min < 1:
            raise RuntimeError(
                f"adaptivek: every warm-up k* label is {probe.label_max:g}, so the probe cannot "
                f"tell inputs apart and every row would get the same k ({where}). Try {other}, "
                "a larger k_max, or a longer probe_warmup_steps"
            )
        r2 = probe.report.r2
        if not r2 >= cfg.probe_min_r2:
            raise RuntimeError(
                f"adaptivek: the complexity probe's held-out R² is {r2:.3f}, below "
                f"probe_min_r2={cfg.probe_min_r2:g}: its per-row k would be noise "
                f"({where}). Try a longer probe_warmup_steps, {other}, a pre-fitted "
                "probe_path, or a lower probe_min_r2"
            )

    # -- checkpoints -----------------------------------------------------------------------------------

    @override
    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving(state_dict)
        if self._acc is not None and not self.is_adaptive:
            state_dict.update(self._acc.state_tensors(ACC_PREFIX))
            if self._kstar_tau is not None:
                state_dict[KSTAR_TAU_KEY] = torch.tensor(self._kstar_tau, dtype=torch.float64)
            if self._kstar_fires is not None:
                state_dict[KSTAR_FIRES_KEY] = self._kstar_fires.detach().clone()

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_loading(state_dict)
        tau = state_dict.pop(KSTAR_TAU_KEY, None)
        if tau is not None:
            self._kstar_tau = float(tau)
        fires = state_dict.pop(KSTAR_FIRES_KEY, None)
        if fires is not None:
            self._kstar_fires = fires.float()
        acc_state = {k: state_dict.pop(k) for k in list(state_dict) if k.startswith(ACC_PREFIX)}
        if acc_state:
            self._acc = self._new_accumulator()
            self._acc.device = None  # follow the saved tensors' device
            self._acc.load_state_tensors(acc_state, ACC_PREFIX)

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        training_only = (KSTAR_TAU_KEY, KSTAR_FIRES_KEY)
        for key in [k for k in state_dict if k.startswith(ACC_PREFIX) or k in training_only]:
            del state_dict[key]
        if not self.is_adaptive:
            warnings.warn(
                "saving an adaptivek SAE whose probe is not fitted yet (training ended before "
                f"probe_warmup_steps={self.cfg.probe_warmup_steps or 'a quarter of the run'}): "
                f"every row will use k_max={self.cfg.k_max}",
                stacklevel=2,
            )
