"""SoftSAE for SAELens (``softsae``): a per-input number of latents, learned end-to-end.

A k-estimator ``k̂(x) = clamp(k_max · σ(v · ReLU(U (x − b_dec) + c) + c₀), 1, k_max)`` (parameters
``k_est_*``) says how many latents each input needs. Training (:class:`SoftSAETrainingSAE`):

- soft phase: code ``z ⊙ m`` with ``z = ReLU(pre-acts)`` and the LapSum soft top-k mask ``m``
  (``Σ m = k̂`` per row) at scale ``α_t`` (annealed, in units of the batch's mean largest
  pre-activation by default); loss ``‖x − x̂‖²`` + AuxK + ``softplus_β(mean k̂ − K_t)``, with the
  target ``K_t`` annealed from ``d_in`` to ``k``;
- hard phase (the last 10% of the run by default): per-row hard top-``⌊k̂⌋``, estimator frozen —
  what the saved inference SAE (:class:`SoftSAE`) computes.

Schedules are pure functions of SAELens's step count; unset step fields are fractions of the run
(``bind_run_length``, called by SAELens's trainer), and a schedule that does not fit the run is
refused before the first step. Folds of the input are folded into the estimator too.
Design choices and measurements: docs/METHODS.md §2.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import (
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from torch import nn

from sae_adaptive_plugin.hookspecs import Architecture
from sae_adaptive_plugin.ops.folding import fold_whitening_into_reader
from sae_adaptive_plugin.ops.lapsum import lapsum_topk
from sae_adaptive_plugin.ops.lapsum_decode import lapsum_decode
from sae_adaptive_plugin.ops.shifted_linear import shifted_linear
from sae_adaptive_plugin.ops.variable_topk import (
    TopKResult,
    decode_topk,
    scatter_topk,
    topk_encode,
    variable_topk,
)
from sae_adaptive_plugin.provenance import stamp_provider
from sae_adaptive_plugin.saes.input_checks import check_width, mark_not_finite, nan_where_not_finite
from sae_adaptive_plugin.saes.per_row_topk import PerRowTopK
from sae_adaptive_plugin.saes.run_length import fraction_of_run, unknown_run_length_error

#: softplus sharpness β and weight λ_k of the penalty on the batch-mean k̂ (docs/METHODS.md §2).
K_PENALTY_BETA = 5.0
K_PENALTY_COEFFICIENT = 1.0


def _check_int(name: str, value: Any, lo: int, hi: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        upper = "inf)" if hi == math.inf else f"{int(hi)}]"
        raise ValueError(f"{name} must be an integer in [{lo}, {upper}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (value > 0 and math.isfinite(value))
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _validate_common(cfg: Any) -> None:
    """Checks shared by the inference and training configs (fields resolved to ints)."""
    _check_int("d_sae", cfg.d_sae, 1)
    _check_int("k_max", cfg.k_max, 1, cfg.d_sae)
    _check_int("k", cfg.k, 1, cfg.k_max)
    _check_int("k_estimator_hidden", cfg.k_estimator_hidden, 1)


@dataclass
class SoftSAEConfig(TopKSAEConfig):
    """Inference config of ``softsae``.

    Args:
        k: the target mean number of active latents the SAE was trained for (informational;
            each row uses its own ``⌊k̂(x)⌋``).
        k_max: upper bound of ``k̂(x)``; ``1 ≤ k ≤ k_max ≤ d_sae``.
        k_estimator_hidden: hidden width of the k-estimator.
        rescale_acts_by_decoder_norm: as SAELens's TopK (selection on pre-acts × ‖W_dec‖).
    """

    k_max: int = 200
    k_estimator_hidden: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate_common(self)

    @classmethod
    def architecture(cls) -> str:
        return "softsae"


#: Below this std/mean of k̂ at the start of the hard phase the estimator has collapsed (warned).
MIN_K_SPREAD = 0.1
#: Default schedules, as fractions of the run's training steps (``bind_run_length``).
ALPHA_ANNEAL_FRACTION = 1 / 3
K_ANNEAL_FRACTION = 0.01
HARD_PHASE_FRACTION = 0.9


@dataclass(frozen=True)
class SoftSAESchedule:
    """SoftSAE's schedules with every step count resolved (pure functions of the step)."""

    alpha_start: float
    alpha_end: float
    alpha_anneal_steps: int
    k_start: float
    k: float
    k_anneal_steps: int
    hard_topk_start_step: int

    def alpha_at(self, step: int) -> float:
        """LapSum scale α at ``step``."""
        n = self.alpha_anneal_steps
        frac = 1.0 if n == 0 else min(step / n, 1.0)
        return self.alpha_start + (self.alpha_end - self.alpha_start) * frac

    def k_target_at(self, step: int) -> float:
        """Target ``K_t`` of the batch-mean k̂ at ``step``."""
        n = self.k_anneal_steps
        frac = 1.0 if n == 0 else min(step / n, 1.0)
        return self.k_start + (self.k - self.k_start) * frac

    def is_hard_phase(self, step: int) -> bool:
        """Whether ``step`` trains with hard top-``⌊k̂⌋`` and a frozen estimator."""
        return step >= self.hard_topk_start_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SoftSAETrainingConfig(TopKTrainingSAEConfig):
    """Training config of ``softsae`` (fields beyond SAELens's TopK training config).

    Step-keyed fields left ``None`` are fractions of the run, which SAELens's trainer tells the
    SAE (``bind_run_length``): ``alpha_anneal_steps`` 1/3, ``k_anneal_steps`` 1%,
    ``hard_topk_start_step`` 90% of the training steps.

    Args:
        k: target mean number of active latents (``1 ≤ k ≤ k_max``).
        k_max: upper bound of ``k̂(x)``; default ``min(2k, d_sae)``; at most ``d_sae``.
        k_estimator_hidden: hidden width of the k-estimator; default ``d_sae`` (the reference).
        alpha_start, alpha_end: LapSum scale at step 0 and after ``alpha_anneal_steps`` (> 0).
        alpha_relative: α is in units of the batch's mean largest pre-activation (so the same
            values suit activations of any scale); False: in units of the pre-activations (the
            reference).
        alpha_anneal_steps: steps of the linear α schedule (≥ 0; 0 = ``alpha_end`` throughout).
        k_anneal_steps: steps over which the penalty's target falls linearly from ``d_in`` to
            ``k`` (≥ 0; 0 = ``k`` throughout).
        hard_topk_start_step: first step of the hard phase (≥ 1, before the end of the run: the
            saved SAE always uses hard top-``⌊k̂⌋``, so the run must train it that way).
    """

    k_max: int | None = None
    k_estimator_hidden: int | None = None
    alpha_start: float = 0.99
    alpha_end: float = 0.02
    alpha_relative: bool = True
    alpha_anneal_steps: int | None = None
    k_anneal_steps: int | None = None
    hard_topk_start_step: int | None = None

    def __post_init__(self) -> None:
        _check_int("d_sae", self.d_sae, 1)
        _check_int("k", self.k, 1)
        if self.k_max is None:
            self.k_max = min(2 * self.k, self.d_sae)
        if self.k_estimator_hidden is None:
            self.k_estimator_hidden = self.d_sae
        _validate_common(self)
        _check_positive("alpha_start", self.alpha_start)
        _check_positive("alpha_end", self.alpha_end)
        if self.alpha_anneal_steps is not None:
            _check_int("alpha_anneal_steps", self.alpha_anneal_steps, 0)
        if self.k_anneal_steps is not None:
            _check_int("k_anneal_steps", self.k_anneal_steps, 0)
        if self.hard_topk_start_step is not None:
            # step 0 would freeze the k-estimator before it ever trained
            _check_int("hard_topk_start_step", self.hard_topk_start_step, 1)
        if self.use_sparse_activations:
            raise ValueError("use_sparse_activations must be False for softsae (not supported)")
        super().__post_init__()

    @classmethod
    def architecture(cls) -> str:
        return "softsae"

    def schedule(self, total_steps: int | None = None) -> SoftSAESchedule:
        """The schedules for a run of ``total_steps`` steps (``None``: the run length is unknown,
        so every step-keyed field must be set). Raises ``ValueError`` when the hard phase would
        start at or after the end of the run; warns when α or the k target are still annealing
        when it starts."""
        defaults = {
            "alpha_anneal_steps": ALPHA_ANNEAL_FRACTION,
            "k_anneal_steps": K_ANNEAL_FRACTION,
            "hard_topk_start_step": HARD_PHASE_FRACTION,
        }
        missing = [name for name in defaults if getattr(self, name) is None]
        if missing and total_steps is None:
            raise unknown_run_length_error("softsae", missing)
        steps = {
            name: getattr(self, name)
            if getattr(self, name) is not None
            else fraction_of_run(frac, int(total_steps or 0))
            for name, frac in defaults.items()
        }
        steps["hard_topk_start_step"] = max(1, steps["hard_topk_start_step"])
        schedule = SoftSAESchedule(
            alpha_start=float(self.alpha_start),
            alpha_end=float(self.alpha_end),
            k_start=float(self.d_in),
            k=float(self.k),
            **steps,
        )
        if total_steps is not None:
            _check_schedule_fits(schedule, total_steps)
        return schedule


def _check_schedule_fits(schedule: SoftSAESchedule, total_steps: int) -> None:
    hard = schedule.hard_topk_start_step
    if hard >= total_steps:
        raise ValueError(
            f"softsae: hard_topk_start_step={hard} is at or after the end of the run "
            f"({total_steps} training steps): the saved SAE uses hard top-⌊k̂⌋ but would never "
            f"have been trained with it. Set hard_topk_start_step in [1, {total_steps - 1}] or "
            f"leave it unset (default {HARD_PHASE_FRACTION:g} of the run)"
        )
    for name, value in (
        ("alpha_anneal_steps", schedule.alpha_anneal_steps),
        ("k_anneal_steps", schedule.k_anneal_steps),
    ):
        if value > hard:
            warnings.warn(
                f"softsae: {name}={value} ends after the hard phase starts "
                f"(hard_topk_start_step={hard}): the soft phase stops before its schedule has "
                f"finished; set {name} <= {hard} or leave it unset",
                UserWarning,
                stacklevel=3,
            )


class _KEstimatorMixin:
    """The k-estimator, its folds and the per-row hard top-k shared by both SoftSAE classes."""

    cfg: Any
    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    k_est_W_enc: nn.Parameter
    k_est_b_enc: nn.Parameter
    k_est_w_out: nn.Parameter
    k_est_b_out: nn.Parameter
    #: Hard top-k through :func:`~sae_adaptive_plugin.ops.variable_topk.topk_encode` (sparse
    #: backward) unless ``hook_sae_acts_pre`` has forward hooks; False = matmul + variable_topk.
    fused_encode: bool = True
    #: Soft phase through the blocked :func:`~sae_adaptive_plugin.ops.lapsum_decode.lapsum_decode`
    #: (False: the plain composition, its reference).
    fused_soft: bool = True

    def _init_k_estimator(self) -> None:
        """``U`` starts as a copy of the encoder's first ``k_estimator_hidden`` columns (the
        reference copies the whole encoder), ``c = 0``, and ``v, c₀`` as ``nn.Linear(H, 1)``;
        so ``k̂ ≈ k_max/2`` at the start."""
        hidden = self.cfg.k_estimator_hidden
        w_enc = self.W_enc.data
        d_in, d_sae = w_enc.shape
        if hidden <= d_sae:
            u = w_enc[:, :hidden].clone()
        else:
            u = torch.empty(d_in, hidden, dtype=w_enc.dtype, device=w_enc.device)
            nn.init.kaiming_uniform_(u)
        out = nn.Linear(hidden, 1, dtype=w_enc.dtype, device=w_enc.device)
        self.k_est_W_enc = nn.Parameter(u.contiguous())
        self.k_est_b_enc = nn.Parameter(torch.zeros(hidden, dtype=w_enc.dtype, device=w_enc.device))
        self.k_est_w_out = nn.Parameter(out.weight.data.reshape(hidden).clone())
        self.k_est_b_out = nn.Parameter(out.bias.data.reshape(1).clone())

    def estimate_k_from_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        """Continuous ``k̂ ∈ [1, k_max]``, shape ``sae_in.shape[:-1]``."""
        return self._k_hat(sae_in @ self.k_est_W_enc + self.k_est_b_enc)

    def _k_hat(self, hidden: torch.Tensor) -> torch.Tensor:
        """``k̂`` from the estimator's hidden layer before its ReLU, ``U·sae_in + c``."""
        h = torch.relu(hidden)
        logit = h @ self.k_est_w_out + self.k_est_b_out[0]
        return (self.cfg.k_max * torch.sigmoid(logit)).clamp(1.0, float(self.cfg.k_max))

    def _k_from_k_hat(self, k_hat: torch.Tensor) -> torch.Tensor:
        # a NaN k̂ (non-finite row) selects k_max (NaN) latents: the row's output is NaN
        k_hat = k_hat.detach().nan_to_num(nan=float(self.cfg.k_max))
        return k_hat.floor().long().clamp(1, self.cfg.k_max)

    def process_sae_in(self, x: torch.Tensor) -> torch.Tensor:
        check_width(self, self.reshape_fn_in(x))  # type: ignore[attr-defined, arg-type]
        return super().process_sae_in(x)  # type: ignore[misc]

    @torch.no_grad()
    def k_per_sample(self, x: torch.Tensor) -> torch.Tensor:
        """The number of latents (``⌊k̂(x)⌋``, ``long``, in ``[1, k_max]``) the SAE keeps for
        each row of ``x``; ``K_NOT_FINITE`` (−1) for a row holding NaN/Inf."""
        sae_in = self.process_sae_in(x)
        return mark_not_finite(self._k_from_k_hat(self.estimate_k_from_sae_in(sae_in)), sae_in)

    def _hidden_pre(self, sae_in: torch.Tensor) -> torch.Tensor:
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)  # type: ignore[attr-defined]
        if self.cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)
        return hidden_pre

    def _hard_encode(
        self, sae_in: torch.Tensor, k_hat: torch.Tensor
    ) -> tuple[torch.Tensor, TopKResult, torch.Tensor]:
        """``(hidden_pre, compact top-k result, dense feature acts)`` with per-row ``⌊k̂⌋``
        latents. Encoder and selection are one :func:`topk_encode` op (backward over the
        selected latents only) unless ``hook_sae_acts_pre`` has forward hooks, which may change
        what is selected: then the plain matmul + ``variable_topk`` path selects after them."""
        k = self._k_from_k_hat(k_hat)
        hook = self.hook_sae_acts_pre  # type: ignore[attr-defined]
        if self.fused_encode and not hook._forward_hooks:
            scale = self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
            hidden_pre, res = topk_encode(
                sae_in, self.W_enc, self.b_enc, k, self.cfg.k_max, scale=scale
            )
            hidden_pre = hook(hidden_pre)
        else:
            hidden_pre = self._hidden_pre(sae_in)
            res = variable_topk(hidden_pre, k, self.cfg.k_max)
        res = res._replace(values=nan_where_not_finite(res.values, sae_in))
        feature_acts = self.hook_sae_acts_post(scatter_topk(res, self.cfg.d_sae))  # type: ignore[attr-defined]
        return hidden_pre, res, feature_acts

    def get_activation_fn(self) -> PerRowTopK:  # encode selects (fused); same selection
        return PerRowTopK(self.cfg.k_max)

    # ---- SAELens folds: the estimator reads the same input as the encoder ----

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)  # type: ignore[misc]
        self.k_est_W_enc.data *= scaling_factor

    @torch.no_grad()
    def fold_activation_whitening(
        self,
        mean: torch.Tensor,
        whitening_matrix: torch.Tensor,
        unwhitening_matrix: torch.Tensor,
    ) -> None:
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)  # type: ignore[misc]
        # the estimator reads x − b_dec: with apply_b_dec_to_input the folded b_dec removes the mean
        fold_whitening_into_reader(
            self.k_est_W_enc.data,
            self.k_est_b_enc.data,
            mean,
            whitening_matrix,
            shift_bias=not self.cfg.apply_b_dec_to_input,
        )


class SoftSAE(_KEstimatorMixin, TopKSAE):
    """Inference SoftSAE: hard top-k with per-row ``k = ⌊k̂(x)⌋`` (see the module docstring)."""

    cfg: SoftSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: SoftSAEConfig, use_error_term: bool = False):
        stamp_provider(cfg)
        super().__init__(cfg, use_error_term)

    def initialize_weights(self) -> None:
        super().initialize_weights()
        self._init_k_estimator()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        sae_in = self.process_sae_in(x)
        return self._hard_encode(sae_in, self.estimate_k_from_sae_in(sae_in))[2]


class SoftSAETrainingSAE(_KEstimatorMixin, TopKTrainingSAE):
    """Training SoftSAE: LapSum soft phase, then hard phase (see the module docstring)."""

    cfg: SoftSAETrainingConfig  # type: ignore[assignment]

    def __init__(self, cfg: SoftSAETrainingConfig, use_error_term: bool = False):
        stamp_provider(cfg)
        super().__init__(cfg, use_error_term)
        self.total_training_steps: int | None = None
        self._schedule: SoftSAESchedule | None = None

    def initialize_weights(self) -> None:
        super().initialize_weights()
        self._init_k_estimator()

    def bind_run_length(self, total_steps: int) -> None:
        """Resolve the schedules for a run of ``total_steps`` steps (SAELens's trainer calls
        this); raises ``ValueError`` naming the field if they do not fit the run."""
        self._schedule = self.cfg.schedule(total_steps)
        self.total_training_steps = total_steps
        self.cfg.metadata.softsae_schedule = {
            "total_training_steps": total_steps,
            **self._schedule.to_dict(),
        }

    @torch.no_grad()
    def calibrate_k_estimator(self, sae_in: torch.Tensor) -> None:
        """Data-dependent start of the estimator (run on the first training batch): ``v ← |v|``,
        so ``k̂`` grows with the activation of the encoder copy ``U`` (more active latents, larger
        ``k̂``), then ``v`` and ``c₀`` rescaled so the batch's logits have unit spread around
        ``logit(k / k_max)`` (mean ``k̂`` near the target ``k``)."""
        h = torch.relu(sae_in.reshape(-1, self.cfg.d_in) @ self.k_est_W_enc + self.k_est_b_enc)
        v = self.k_est_w_out.abs()
        logit = (h @ v).float()
        spread = float(logit.std()) if logit.numel() > 1 else 0.0
        if not math.isfinite(spread) or spread <= 0:
            return
        p = min(max(self.cfg.k / self.cfg.k_max, 1e-3), 1 - 1e-3)
        self.k_est_w_out.copy_(v / spread)
        self.k_est_b_out.fill_(math.log(p / (1 - p)) - float(logit.mean()) / spread)

    def _check_k_spread(self, k_hat: torch.Tensor) -> None:
        """Warn when the frozen estimator gives (nearly) every input the same k."""
        k = k_hat.detach().float().reshape(-1)
        spread = float(k.std() / k.mean()) if k.numel() > 1 else 0.0
        self.cfg.metadata.softsae_k_spread_at_hard_phase = spread
        if spread < MIN_K_SPREAD:
            warnings.warn(
                f"softsae: at the hard phase (hard_topk_start_step={self.schedule.hard_topk_start_step}) "
                f"k̂ barely varies across inputs (std/mean {spread:.3f} < {MIN_K_SPREAD}, mean "
                f"{float(k.mean()):.1f}): the per-input k is not adapting. Seen with short runs "
                "whose lr warm-up takes a large share of the soft phase; try a longer run, a "
                "shorter lr_warm_up_steps, or a later hard_topk_start_step",
                UserWarning,
                stacklevel=3,
            )

    @property
    def schedule(self) -> SoftSAESchedule:
        """The resolved schedules (from ``bind_run_length``, or the config's step fields)."""
        if self._schedule is None:
            self._schedule = self.cfg.schedule(None)
        return self._schedule

    @staticmethod
    def _alpha_unit(hidden_pre: torch.Tensor) -> torch.Tensor:
        """The batch's mean largest ReLU'd pre-activation (detached; ``alpha_relative``)."""
        top = hidden_pre.detach().amax(dim=-1).clamp(min=0)  # max ReLU(h) = ReLU(max h)
        return top.mean().clamp(min=torch.finfo(hidden_pre.dtype).tiny)

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference behaviour (hard per-row top-``⌊k̂⌋``), used by ``encode``/``forward``."""
        sae_in = self.process_sae_in(x)
        hidden_pre, _, feature_acts = self._hard_encode(sae_in, self.estimate_k_from_sae_in(sae_in))
        return feature_acts, hidden_pre

    def _decode_compact(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            values = values / self.W_dec.norm(dim=-1)[indices]
        sae_out_pre = decode_topk(values, indices, self.W_dec) + self.b_dec
        sae_out_pre = self.hook_sae_recons(sae_out_pre)
        sae_out_pre = self.run_time_activation_norm_fn_out(sae_out_pre)
        return self.reshape_fn_out(sae_out_pre, self.d_head)

    def _sae_in_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``process_sae_in(x) = x_in − shift`` as ``(x_in, shift)``, ``shift = b_dec ·
        apply_b_dec_to_input``: SAELens's steps up to that subtraction."""
        check_width(self, self.reshape_fn_in(x))
        x_in = self.reshape_fn_in(x.to(self.dtype))
        x_in = self.run_time_activation_norm_fn_in(self.hook_sae_input(x_in))
        return x_in, self.b_dec * self.cfg.apply_b_dec_to_input

    def _soft_blocked(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether the soft phase takes the blocked ops (see :meth:`_soft_decode`)."""
        return (
            self.fused_soft
            and not self.hook_sae_acts_pre._forward_hooks
            and not self.hook_sae_acts_post._forward_hooks
            and not torch.is_autocast_enabled(device.type)
            and dtype in (torch.float32, torch.float64)
        )

    def _soft_encode(
        self, x_in: torch.Tensor, shift: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft phase: ``(hidden_pre, k̂)`` of ``sae_in = x_in − shift``. The blocked path reads
        ``x_in − shift`` through :func:`~sae_adaptive_plugin.ops.shifted_linear.shifted_linear`
        in the encoder (with the decoder-norm rescale) and the estimator: ``∂L/∂b_dec`` from a
        vector product, not from two ``[B, d_in]`` input gradients, and no unscaled copy of the
        pre-activations kept; else the plain composition."""
        if not self._soft_blocked(x_in.dtype, x_in.device):
            sae_in = x_in - shift
            return self._hidden_pre(sae_in), self.estimate_k_from_sae_in(sae_in)
        flat = x_in.reshape(-1, self.cfg.d_in)
        lead = x_in.shape[:-1]
        scale = self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
        hidden_pre = shifted_linear(flat, shift, self.W_enc, self.b_enc, scale)
        hidden = shifted_linear(flat, shift, self.k_est_W_enc, self.k_est_b_enc)
        return hidden_pre.reshape(*lead, -1), self._k_hat(hidden.reshape(*lead, -1))

    def _soft_decode(
        self, hidden_pre: torch.Tensor, k_hat: torch.Tensor, alpha: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Soft phase: ``(sae_out, feature_acts, nonzero code entries per row)`` of the code
        ``z ⊙ m`` (``z = ReLU(hidden_pre)``, ``m`` the LapSum mask, ``Σ m = k̂``). One blocked op
        (:func:`~sae_adaptive_plugin.ops.lapsum_decode.lapsum_decode`, no ``[B, d_sae]`` code,
        mask or their gradients held) unless ``fused_soft`` is False, ``hook_sae_acts_pre`` or
        ``hook_sae_acts_post`` has forward hooks, autocast is on or the dtype is not
        float32/64: then the plain composition.
        ``feature_acts`` holds the latents the soft top-k selects (``m > ½``): SAELens counts
        firings (dead latents → AuxK, logged L0) from it."""
        scaled_alpha = alpha * self._alpha_unit(hidden_pre) if self.cfg.alpha_relative else alpha
        dec_scale = 1 / self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
        if self._soft_blocked(hidden_pre.dtype, hidden_pre.device):
            # τ is solved from each row's top 2·k_max + 2 pre-activations
            res = lapsum_decode(
                hidden_pre.reshape(-1, self.cfg.d_sae),
                k_hat.reshape(-1),
                scaled_alpha,
                self.W_dec,
                k_max=self.cfg.k_max,
                dec_scale=dec_scale,
            )
            sae_out_pre = self.hook_sae_recons(
                res.out.reshape(*hidden_pre.shape[:-1], -1) + self.b_dec
            )
            sae_out_pre = self.run_time_activation_norm_fn_out(sae_out_pre)
            sae_out = self.reshape_fn_out(sae_out_pre, self.d_head)
            return (
                sae_out,
                res.feature_acts.reshape(hidden_pre.shape),
                res.nonzero.reshape(k_hat.shape),
            )
        z = hidden_pre.relu()
        mask = lapsum_topk(z, k_hat, scaled_alpha, k_max=self.cfg.k_max)
        code = self.hook_sae_acts_post(z * mask)
        sae_out = self.decode(code)
        feature_acts = torch.where(mask > 0.5, code, torch.zeros((), dtype=code.dtype))
        return sae_out, feature_acts, (code.detach() != 0).sum(dim=-1)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        step = step_input.n_training_steps
        schedule = self.schedule
        x_in, shift = self._sae_in_parts(step_input.sae_in)
        sae_in = x_in - shift  # process_sae_in(step_input.sae_in)
        if step == 0:
            self.calibrate_k_estimator(sae_in.detach())
        metrics: dict[str, Any] = {}
        if schedule.is_hard_phase(step):
            with torch.no_grad():
                k_hat = self.estimate_k_from_sae_in(sae_in)
            if step == schedule.hard_topk_start_step:
                self._check_k_spread(k_hat)
            hidden_pre, res, feature_acts = self._hard_encode(sae_in, k_hat)
            sae_out = self._decode_compact(res.values, res.indices)
            k_used = res.mask.sum(dim=-1).float()
            penalty = None
        else:
            alpha = schedule.alpha_at(step)
            hidden_pre, k_hat = self._soft_encode(x_in, shift)
            sae_out, feature_acts, soft_l0 = self._soft_decode(hidden_pre, k_hat, alpha)
            k_used = k_hat.detach().float()
            k_target = schedule.k_target_at(step)
            penalty = K_PENALTY_COEFFICIENT * F.softplus(
                k_hat.float().mean() - k_target, beta=K_PENALTY_BETA
            )
            metrics["soft_l0"] = soft_l0.float().mean()
            metrics["alpha"] = alpha
            metrics["k_target"] = k_target
        metrics["mean_k"] = k_used.mean()
        metrics["std_k"] = k_used.std(correction=0)

        mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
        losses: dict[str, torch.Tensor] = {"mse_loss": mse_loss}
        losses.update(
            self.calculate_aux_loss(
                step_input=step_input,
                feature_acts=feature_acts,
                hidden_pre=hidden_pre,
                sae_out=sae_out,
            )
        )
        if penalty is not None:
            losses["k_penalty"] = penalty
        total = mse_loss
        for name, value in losses.items():
            if name != "mse_loss":
                total = total + value
        return TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=total,
            losses=losses,
            metrics=metrics,
        )


ARCHITECTURE = Architecture(
    name="softsae",
    sae_class=SoftSAE,
    sae_config_class=SoftSAEConfig,
    training_sae_class=SoftSAETrainingSAE,
    training_sae_config_class=SoftSAETrainingConfig,
)
