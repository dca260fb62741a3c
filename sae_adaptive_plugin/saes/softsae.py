"""SoftSAE for SAELens (``softsae``): a per-input number of latents, learned end-to-end.

A k-estimator ``k̂(x) = clamp(k_max · σ(v · ReLU(U (x − b_dec) + c) + c₀), 1, k_max)`` (parameters
``k_est_*``) says how many latents each input needs. Training (:class:`SoftSAETrainingSAE`):

- soft phase: code ``z ⊙ m`` with ``z = ReLU(pre-acts)`` and the LapSum soft top-k mask ``m``
  (``Σ m = k̂`` per row) at scale ``α_t``; losses ``mse_loss``, AuxK and
  ``k_penalty = λ_k · (softplus_β(e) + softplus_β(−e) − 2 ln 2 / β)`` with ``e = mean k̂ − K_t``
  (two-sided: it holds the mean at the target ``K_t``, annealed from ``min(d_in, k_max)`` to
  ``k``, from above and below) and ``λ_k = k_penalty_coefficient · mse_loss / K_t`` (the step's
  loss, detached; ``k_penalty_scale="constant"``: the coefficient alone);
- hard phase (the last three quarters of the run by default): per-row hard top-``⌊k̂⌋`` with the estimator
  frozen (``k_penalty`` 0) — what the saved inference SAE (:class:`SoftSAE`) computes; ``k̂`` is then
  read with autocast off, so a row's k does not follow the encoder's precision. The estimator reads
  ``x − b_dec``, and ``b_dec`` still trains: before every hard step (and any save) ``c`` moves by
  ``U·Δb_dec`` so that ``k̂(x)`` stays what it was when the estimator was frozen;
- restarts (``resample_below``): at the start of the hard phase and every
  ``resample_interval_steps`` after it, the latents that fired on fewer than ``resample_below`` ×
  the mean latent's count of rows since the previous restart start again along the batch's
  residuals (:mod:`~sae_adaptive_plugin.saes.switch_resample`); the counts ride in checkpoints.

Schedules are pure functions of SAELens's step count; unset step fields are fractions of the run
(``bind_run_length``). Design and measurements: docs/METHODS.md §2, docs/notes_saes.md.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from sae_lens.saes.sae import TrainStepInput
from torch import nn

from sae_adaptive_plugin.distributed import all_reduce_, gather_rows, global_mean
from sae_adaptive_plugin.ops.dispatch import (
    accumulation_dtype,
    autocast_dtype,
    full_precision,
    linear_weight,
)
from sae_adaptive_plugin.ops.lapsum import lapsum_topk
from sae_adaptive_plugin.ops.lapsum_decode import lapsum_decode
from sae_adaptive_plugin.ops.shifted_linear import shifted_linear
from sae_adaptive_plugin.ops.variable_topk import TopKResult, scatter_topk, topk_encode
from sae_adaptive_plugin.registration.hookspecs import Architecture
from sae_adaptive_plugin.saes.input_checks import nan_where_not_finite
from sae_adaptive_plugin.saes.per_row_topk import PerRowTopK
from sae_adaptive_plugin.saes.softsae_config import (
    SoftSAEConfig,
    SoftSAESchedule,
    SoftSAETrainingSAEConfig,
)
from sae_adaptive_plugin.saes.switch_resample import fires_in_selection, resample_rarely_used
from sae_adaptive_plugin.saes.topk_family import (
    InputReader,
    StepEncoding,
    TopKEncoding,
    TopKFamilyMixin,
    TopKFamilySAE,
    TopKFamilyTrainingSAE,
    sparse_code,
)

#: softplus sharpness β of the penalty on the batch-mean k̂ (docs/METHODS.md §2).
K_PENALTY_BETA = 5.0


def two_sided_softplus(x: torch.Tensor, beta: float) -> torch.Tensor:
    """``softplus_β(x) + softplus_β(−x) − 2 ln 2 / β``: 0 at ``x = 0``, about ``|x|`` beyond ``1/β``."""
    return F.softplus(x, beta=beta) + F.softplus(-x, beta=beta) - 2 * math.log(2) / beta


#: Below this std/mean of k̂ at the start of the hard phase the estimator has collapsed (warned).
MIN_K_SPREAD = 0.1
#: State-dict key of the firing counts since the last restart (``resample_below``; training only).
RESAMPLE_FIRES_KEY = "resample_fires"
#: State-dict key of the ``b_dec`` the frozen estimator's bias matches (hard phase; training only).
K_EST_SHIFT_KEY = "k_est_shift"


class _KEstimator(TopKFamilyMixin):
    """The k-estimator of both SoftSAE classes: each row keeps ``⌊k̂(x)⌋`` latents."""

    k_est_W_enc: nn.Parameter
    k_est_b_enc: nn.Parameter
    k_est_w_out: nn.Parameter
    k_est_b_out: nn.Parameter

    def initialize_weights(self) -> None:
        """``U`` starts as a copy of the encoder's first ``k_estimator_hidden`` columns (the
        reference copies the whole encoder), ``c = 0``, and ``v, c₀`` as ``nn.Linear(H, 1)``;
        so ``k̂ ≈ k_max/2`` at the start."""
        super().initialize_weights()  # type: ignore[misc]
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

    def get_activation_fn(self) -> PerRowTopK:  # encode selects (fused); the same selection
        return PerRowTopK(self.cfg.k_max)

    def estimate_k_from_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        """Continuous ``k̂ ∈ [1, k_max]``, shape ``sae_in.shape[:-1]``."""
        return self._k_hat(self._estimator_hidden(sae_in))

    def _estimator_hidden(self, sae_in: torch.Tensor) -> torch.Tensor:
        """``U·sae_in + c``; under autocast ``U`` cast in ``nn.Linear``'s layout
        (:func:`~sae_adaptive_plugin.ops.dispatch.linear_weight`), as the encoder's is."""
        low = autocast_dtype(sae_in.device.type)
        weight = self.k_est_W_enc if low is None else linear_weight(self.k_est_W_enc, low)
        return sae_in @ weight + self.k_est_b_enc

    def _k_hat(self, hidden: torch.Tensor) -> torch.Tensor:
        """``k̂`` from the estimator's hidden layer before its ReLU, ``U·sae_in + c``."""
        h = torch.relu(hidden)
        logit = h @ self.k_est_w_out + self.k_est_b_out[0]
        return (self.cfg.k_max * torch.sigmoid(logit)).clamp(1.0, float(self.cfg.k_max))

    def k_for_rows(self, x_in: torch.Tensor, sae_in: torch.Tensor) -> torch.Tensor:
        """``⌊k̂⌋`` per row, no gradient, read in the SAE's dtype with autocast off: each row's
        integer k does not depend on the precision a caller's autocast runs the encoder in."""
        # k is an integer: no gradient reaches the estimator here
        with torch.no_grad(), full_precision(sae_in.device.type):
            k_hat = self.estimate_k_from_sae_in(sae_in.to(self.k_est_W_enc.dtype))
        return k_hat.nan_to_num(nan=float(self.cfg.k_max)).floor().long().clamp(1, self.cfg.k_max)

    def input_reader(self) -> InputReader:
        return InputReader(self.k_est_W_enc.data, self.k_est_b_enc.data, reads_sae_in=True)


class SoftSAE(_KEstimator, TopKFamilySAE):
    """Inference SoftSAE: hard top-k with per-row ``k = ⌊k̂(x)⌋`` (see the module docstring)."""

    cfg: SoftSAEConfig  # type: ignore[assignment]


@dataclass(kw_only=True)
class SoftFields:
    """What a soft-phase step adds to its encoding: ``sae_out`` (the batch decoded with its soft
    code), ``k̂`` with its gradient, the step's (unscaled) ``α``, and per row the number of
    latents with any weight in the code ``z ⊙ m``. The encoding's ``feature_acts`` are the
    code's latents with ``m > ½``, what SAELens counts as firing."""

    sae_out: torch.Tensor
    k_hat: torch.Tensor
    alpha: float
    soft_l0: torch.Tensor


@dataclass(kw_only=True)
class SoftEncoding(StepEncoding, SoftFields):
    """A soft-phase batch over every latent (:meth:`SoftSAETrainingSAE.soft_decode`)."""


@dataclass(kw_only=True)
class CandidateSoftEncoding(TopKEncoding, SoftFields):
    """A soft-phase batch over each row's top ``soft_candidates`` latents
    (:meth:`SoftSAETrainingSAE.candidate_soft_encoding`): its ``selection`` holds the code's
    latents with ``m > ½`` (mask) among the candidates, so AuxK and the firing counts take the
    hard phase's sparse paths."""


class SoftSAETrainingSAE(_KEstimator, TopKFamilyTrainingSAE):
    """Training SoftSAE: LapSum soft phase, then hard phase (see the module docstring)."""

    cfg: SoftSAETrainingSAEConfig  # type: ignore[assignment]
    #: Soft phase through the blocked ops (:meth:`soft_decode`); False: the plain composition,
    #: their reference.
    fused_soft: bool = True

    def __init__(self, cfg: SoftSAETrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.total_training_steps: int | None = None
        self._schedule: SoftSAESchedule | None = None
        #: the global batches' firings per latent since the last restart (``resample_below``)
        self._fires: torch.Tensor | None = None
        #: hard phase: the input shift (``b_dec``) the frozen estimator's bias ``c`` matches
        self._k_est_shift: torch.Tensor | None = None

    def bind_run_length(self, total_steps: int) -> None:
        """Resolve the schedules for a run of ``total_steps`` steps (SAELens's trainer calls
        this); raises ``ValueError`` naming the field if they do not fit the run."""
        self._schedule = self.cfg.schedule(total_steps)
        self.total_training_steps = total_steps
        self.cfg.metadata.softsae_schedule = {
            "total_training_steps": total_steps,
            **self._schedule.to_dict(),
        }

    @property
    def schedule(self) -> SoftSAESchedule:
        """The resolved schedules (from ``bind_run_length``, or the config's step fields)."""
        if self._schedule is None:
            self._schedule = self.cfg.schedule(None)
        return self._schedule

    @torch.no_grad()
    def calibrate_k_estimator(self, sae_in: torch.Tensor) -> None:
        """Data-dependent start of the estimator (run on the first training batch): ``v ← |v|``,
        so ``k̂`` grows with the activation of the encoder copy ``U`` (more active latents, larger
        ``k̂``), then ``v`` and ``c₀`` rescaled so the batch's logits have unit spread around
        ``logit(k / k_max)`` (mean ``k̂`` near the target ``k``)."""
        h = torch.relu(self._estimator_hidden(sae_in.reshape(-1, self.cfg.d_in)))
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
                f"{float(k.mean()):.1f}): the per-input k is not adapting (the estimator's "
                "logits lost their spread in the soft phase); try a longer run, a shorter "
                "lr_warm_up_steps, or a different hard_topk_start_step",
                UserWarning,
                stacklevel=4,
            )

    # -- the training step's hooks (TopKFamilyTrainingSAE) ---------------------------------------

    def prepare_training_step(self, step_input: TrainStepInput) -> None:
        step = step_input.n_training_steps
        if step == 0:
            self.calibrate_k_estimator(gather_rows(self.process_sae_in(step_input.sae_in)))
        elif step == self.schedule.hard_topk_start_step:
            with torch.no_grad():
                k_hat = self.estimate_k_from_sae_in(self.process_sae_in(step_input.sae_in))
            self._check_k_spread(gather_rows(k_hat))
        if self.schedule.is_hard_phase(step):
            self.hold_k_estimator()
        if step in self.schedule.resample_steps:
            self.resample(gather_rows(step_input.sae_in.to(self.dtype)), step)

    def _input_shift(self) -> torch.Tensor:
        """What the estimator subtracts from its input: ``b_dec`` (0 without
        ``apply_b_dec_to_input``), float32, no gradient."""
        return (self.b_dec.detach() * self.cfg.apply_b_dec_to_input).float()

    @torch.no_grad()
    def hold_k_estimator(self) -> None:
        """Keep the frozen estimator's ``k̂(x)`` as it was at the hard phase's first step: its
        input ``x − b_dec`` moves with ``b_dec``, so ``c`` moves by ``U·Δb_dec`` (every rank
        alike, ``b_dec`` being the same on all). The first call only records ``b_dec``."""
        shift = self._input_shift()
        if self._k_est_shift is not None:
            delta = (shift - self._k_est_shift.to(shift.device)) @ self.k_est_W_enc.float()
            self.k_est_b_enc.add_(delta.to(self.k_est_b_enc.dtype))
        self._k_est_shift = shift.clone()

    @torch.no_grad()
    def resample(self, batch: torch.Tensor, step: int) -> int:
        """Start again the latents that fired on fewer than ``resample_below`` × the mean
        latent's count of rows since the last restart, along the residuals of the global
        ``batch`` after the hard encode (rows drawn relative to their centred input; seeded by
        ``step``), then start counting again. Returns how many; appended to
        ``metadata.softsae_resampled_latents``."""
        fires, self._fires = self._fires, None
        below = self.cfg.resample_below
        if fires is None:
            n = 0
        else:
            n = resample_rarely_used(self, fires, below, batch, step, relative=True)
        done = getattr(self.cfg.metadata, "softsae_resampled_latents", None) or []
        self.cfg.metadata.softsae_resampled_latents = [*done, n]
        return n

    def record_training_step(self, step_input: TrainStepInput, encoding: StepEncoding) -> None:
        if not self.schedule.counts_fires_at(step_input.n_training_steps):
            return
        if isinstance(encoding, TopKEncoding):  # the hard phase, or soft over candidates
            local = fires_in_selection(encoding.selection, self.cfg.d_sae)
        else:  # a soft phase over every latent: its code is dense
            acts = encoding.feature_acts.detach()
            fired = (acts.to_dense() if acts.is_sparse else acts) != 0
            local = fired.reshape(-1, self.cfg.d_sae).sum(0).float()
        fires = all_reduce_(local)
        self._fires = fires if self._fires is None else self._fires + fires.to(self._fires.device)

    def training_encoding(self, step_input: TrainStepInput) -> StepEncoding:
        step = step_input.n_training_steps
        if self.schedule.is_hard_phase(step):  # hard top-⌊k̂⌋ (the inference encode)
            return super().training_encoding(step_input)
        return self.soft_encoding(step_input.sae_in, step)

    def soft_encoding(self, x: torch.Tensor, step: int) -> StepEncoding:
        """The soft phase at ``step``: with ``soft_candidates`` on the blocked path,
        :meth:`candidate_soft_encoding`; else pre-activations and ``k̂`` of the batch
        (:meth:`soft_encode`), then :meth:`soft_decode`."""
        x_read = self.read_input(x)
        x_in = self.run_time_activation_norm_fn_in(x_read)
        shift = self.b_dec * self.cfg.apply_b_dec_to_input  # process_sae_in(x) = x_in − shift
        if self.soft_width() is not None and self.soft_blocked() and self.encodes_fused:
            return self.candidate_soft_encoding(x_read, x_in, shift, step)
        hidden_pre, k_hat = self.soft_encode(x_in, shift)
        alpha = self.schedule.alpha_at(step)
        sae_out, feature_acts, soft_l0 = self.soft_decode(hidden_pre, k_hat, alpha)
        return SoftEncoding(
            hidden_pre=hidden_pre,
            feature_acts=feature_acts,
            k=k_hat.detach(),
            sae_out=sae_out,
            k_hat=k_hat,
            alpha=alpha,
            soft_l0=soft_l0,
        )

    def candidate_soft_encoding(
        self, x_read: torch.Tensor, x_in: torch.Tensor, shift: torch.Tensor, step: int
    ) -> CandidateSoftEncoding:
        """The soft phase over each row's top ``M = soft_candidates`` latents, sparse
        throughout: the fused encoder selects the top ``M`` ReLU'd pre-activations ``z`` of
        ``sae_in = x_in − shift`` (its backward touches those ``B·M`` latents only), the LapSum
        mask ``m`` is solved over them (``Σ m = k̂``), and the code ``z ⊙ m`` is decoded from
        the ``M`` decoder rows. ``x_read``: the rows as read, before the input normalisation
        ``x_in``. The same values and gradients as :meth:`soft_decode`'s plain path with
        ``soft_candidates``."""
        lead = x_in.shape[:-1]
        sae_in = x_in - shift
        flat = sae_in.reshape(-1, self.cfg.d_in)
        width = self.cfg.soft_candidates
        scale = self.decoder_norms() if self.cfg.rescale_acts_by_decoder_norm else None
        k_all = torch.full(flat.shape[:1], width, dtype=torch.long, device=flat.device)
        hidden_pre, top = topk_encode(flat, self.W_enc, self.b_enc, k_all, width, scale=scale)
        k_hat = self.blocked_k_hat(x_in.reshape(-1, self.cfg.d_in), shift)
        alpha = self.schedule.alpha_at(step)
        z = top.values.to(accumulation_dtype(top.values.dtype))  # ReLU'd, sorted descending
        scaled_alpha = alpha * self._alpha_unit(z[:, 0]) if self.cfg.alpha_relative else alpha
        mask = lapsum_topk(z, k_hat, scaled_alpha)
        rows = x_read.reshape(-1, self.cfg.d_in)  # a row holding NaN/Inf: NaN code and output
        code = nan_where_not_finite(z * mask, rows)
        fires = ~(mask.detach() <= 0.5)  # m > ½, or NaN (kept: NaN in is never a clean code)
        acts = nan_where_not_finite(torch.where(fires, code, 0).detach(), rows)
        selection = TopKResult(*(t.reshape(*lead, width) for t in (acts, top.indices, fires)))
        sae_out = self.decode_compact(
            code.to(self.W_dec.dtype).reshape(*lead, width), selection.indices
        )
        if self.sparse_code_in_step():
            feature_acts = sparse_code(selection, self.cfg.d_sae)
        else:
            feature_acts = scatter_topk(selection, self.cfg.d_sae)
        return CandidateSoftEncoding(
            hidden_pre=self.hook_sae_acts_pre(hidden_pre.reshape(*lead, -1)),
            feature_acts=self.hook_sae_acts_post(feature_acts),
            k=k_hat.detach().reshape(lead),
            x_in=x_read,
            sae_in=sae_in,
            selection=selection,
            sae_out=sae_out,
            k_hat=k_hat.reshape(lead),
            alpha=alpha,
            soft_l0=(code.detach() != 0).sum(dim=-1).reshape(lead),
        )

    def soft_width(self) -> int | None:
        """The soft phase's candidates per row, ``soft_candidates``; ``None`` when every latent
        is one (``soft_candidates = d_sae``: the soft phase as published)."""
        width = self.cfg.soft_candidates
        return None if width is None or width >= self.cfg.d_sae else width

    def soft_blocked(self) -> bool:
        """Whether the soft phase takes the blocked ops: ``fused_soft`` and no forward hooks on
        ``hook_sae_acts_pre``/``hook_sae_acts_post``. Every dtype and autocast take them (the
        ops compute the code in float32 and run the matmuls in the autocast dtype)."""
        return (
            self.fused_soft
            and not self.hook_sae_acts_pre._forward_hooks
            and not self.hook_sae_acts_post._forward_hooks
        )

    def soft_encode(
        self, x_in: torch.Tensor, shift: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden_pre, k̂)`` of ``sae_in = x_in − shift``. The estimator reads ``sae_in`` with
        ``shift`` detached: ``k̂``'s gradients (the penalty's included) train the estimator only,
        never ``b_dec``. Blocked: the encoder (with the decoder-norm rescale) and the estimator
        read ``x_in − shift`` through :func:`~sae_adaptive_plugin.ops.shifted_linear.shifted_linear`
        (``∂L/∂b_dec`` from a vector product, not a ``[B, d_in]`` input gradient); else the plain
        composition."""
        if not self.soft_blocked():
            sae_in = x_in - shift
            return self.plain_hidden_pre(sae_in), self.estimate_k_from_sae_in(x_in - shift.detach())
        flat = x_in.reshape(-1, self.cfg.d_in)
        lead = x_in.shape[:-1]
        scale = self.decoder_norms() if self.cfg.rescale_acts_by_decoder_norm else None
        hidden_pre = shifted_linear(flat, shift, self.W_enc, self.b_enc, scale)
        k_hat = self.blocked_k_hat(flat, shift)
        return hidden_pre.reshape(*lead, -1), k_hat.reshape(lead)

    def blocked_k_hat(self, flat: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``k̂`` ``[N]`` of the rows ``flat − shift`` (``flat`` ``[N, d_in]``, after the input
        normalisation), read through :func:`shifted_linear` with ``shift`` detached."""
        return self._k_hat(shifted_linear(flat, shift.detach(), self.k_est_W_enc, self.k_est_b_enc))

    def soft_decode(
        self, hidden_pre: torch.Tensor, k_hat: torch.Tensor, alpha: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sae_out, feature_acts, latents with weight per row)`` of the code
        ``hook_sae_acts_post(z ⊙ m)``, ``z = ReLU(hidden_pre)``, ``m`` the LapSum mask
        (``Σ m = k̂``) at scale α; ``feature_acts`` keeps the latents with ``m > ½``. With
        ``soft_candidates`` below ``d_sae``, ``m`` is solved over each row's top
        ``soft_candidates`` latents and is 0 on the others. Blocked (:meth:`soft_blocked`, every
        latent a candidate): one op,
        :func:`~sae_adaptive_plugin.ops.lapsum_decode.lapsum_decode`, that holds no
        ``[B, d_sae]`` mask, code or their gradients."""
        if self.cfg.alpha_relative:
            scaled_alpha = alpha * self._alpha_unit(hidden_pre.detach().amax(dim=-1))
        else:
            scaled_alpha = alpha
        width = self.soft_width()
        if self.soft_blocked() and width is None:
            # τ is solved from each row's top 2·k_max + 2 pre-activations
            dec_scale = 1 / self.decoder_norms() if self.cfg.rescale_acts_by_decoder_norm else None
            res = lapsum_decode(
                hidden_pre.reshape(-1, self.cfg.d_sae),
                k_hat.reshape(-1),
                scaled_alpha,
                self.W_dec,
                k_max=self.cfg.k_max,
                dec_scale=dec_scale,
            )
            out = res.out.reshape(*hidden_pre.shape[:-1], -1) + self.b_dec
            sae_out = self.reshape_fn_out(
                self.run_time_activation_norm_fn_out(self.hook_sae_recons(out)), self.d_head
            )
            feature_acts = res.feature_acts.reshape(hidden_pre.shape)
            return sae_out, feature_acts, res.nonzero.reshape(k_hat.shape)
        z = hidden_pre.relu()
        if width is None:
            mask = lapsum_topk(z, k_hat, scaled_alpha, k_max=self.cfg.k_max)
        else:  # the mask over each row's top soft_candidates latents, 0 elsewhere
            top = z.topk(width, dim=-1)
            on_top = lapsum_topk(top.values, k_hat, scaled_alpha)
            mask = torch.zeros_like(z).scatter(-1, top.indices, on_top)
        code = self.hook_sae_acts_post(z * mask)
        # SAELens counts firings (dead latents → AuxK, logged L0) from feature_acts: report
        # the latents the soft top-k selects (m > ½), not every latent with a tiny weight
        feature_acts = torch.where(mask > 0.5, code, 0)
        return self.decode(code), feature_acts, (code.detach() != 0).sum(dim=-1)

    @staticmethod
    def _alpha_unit(row_max: torch.Tensor) -> torch.Tensor:
        """The batch's mean largest ReLU'd pre-activation, from each row's largest one (detached;
        ``alpha_relative``; the global batch under data parallelism, as are the k̂ penalty and
        the estimator's calibration)."""
        top = row_max.detach().clamp(min=0)  # max ReLU(h) = ReLU(max h)
        return global_mean(top).clamp(min=torch.finfo(row_max.dtype).tiny)

    def training_decode(self, encoding: StepEncoding) -> torch.Tensor:
        if isinstance(encoding, SoftFields):  # decoded with its code
            return encoding.sae_out
        return super().training_decode(encoding)

    def batch_mean_k_hat(self, k_hat: torch.Tensor) -> torch.Tensor:
        """The batch's mean ``k̂``: what the penalty holds near its target (rows are free)."""
        return global_mean(k_hat.float())

    def extra_losses(
        self, step_input: TrainStepInput, encoding: StepEncoding, mse_loss: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if not isinstance(encoding, SoftFields):  # hard phase: the estimator is frozen
            return {"k_penalty": encoding.hidden_pre.new_zeros(())}
        target = self.schedule.k_target_at(step_input.n_training_steps)
        excess = self.batch_mean_k_hat(encoding.k_hat) - target
        penalty = two_sided_softplus(excess, K_PENALTY_BETA)
        return {"k_penalty": self.k_penalty_weight(mse_loss, target) * penalty}

    def k_penalty_weight(self, mse_loss: torch.Tensor, target: float) -> torch.Tensor | float:
        """``λ_k`` of the step: ``k_penalty_coefficient`` times, for ``k_penalty_scale = "mse"``,
        the global batch's ``mse_loss`` (detached) over the target ``K_t`` (the reconstruction
        error per latent of the target budget: the same pull at any activation scale), or 1
        for ``"constant"``."""
        if self.cfg.k_penalty_scale == "constant":
            return self.cfg.k_penalty_coefficient
        return self.cfg.k_penalty_coefficient * global_mean(mse_loss.detach().float()) / target

    # -- checkpoints -----------------------------------------------------------------------------

    # SAELens's folds keep k̂(x) as it is: bring c up to b_dec first, then match the folded b_dec

    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        self._fold_holding_k_estimator(super().fold_activation_norm_scaling_factor, scaling_factor)

    def fold_activation_whitening(
        self,
        mean: torch.Tensor,
        whitening_matrix: torch.Tensor,
        unwhitening_matrix: torch.Tensor,
    ) -> None:
        self._fold_holding_k_estimator(
            super().fold_activation_whitening, mean, whitening_matrix, unwhitening_matrix
        )

    def _fold_holding_k_estimator(self, fold: Any, *args: Any) -> None:
        held = self._k_est_shift is not None
        if held:
            self.hold_k_estimator()
        fold(*args)
        if held:
            self._k_est_shift = self._input_shift().clone()

    def _held_estimator_bias(self, state_dict: dict[str, Any]) -> None:
        """In the hard phase, bring ``c`` up to the current ``b_dec`` (:meth:`hold_k_estimator`)
        before it is saved."""
        if self._k_est_shift is not None:
            self.hold_k_estimator()
            state_dict["k_est_b_enc"] = self.k_est_b_enc.detach().clone()

    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving(state_dict)
        self._held_estimator_bias(state_dict)
        if self._fires is not None:
            state_dict[RESAMPLE_FIRES_KEY] = self._fires.detach().clone()
        if self._k_est_shift is not None:
            state_dict[K_EST_SHIFT_KEY] = self._k_est_shift.clone()

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_loading(state_dict)
        fires = state_dict.pop(RESAMPLE_FIRES_KEY, None)
        if fires is not None:
            self._fires = fires.float()
        shift = state_dict.pop(K_EST_SHIFT_KEY, None)
        if shift is not None:
            self._k_est_shift = shift.float()

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)  # holds c (for_saving)
        state_dict.pop(RESAMPLE_FIRES_KEY, None)
        state_dict.pop(K_EST_SHIFT_KEY, None)

    def extra_metrics(self, step_input: TrainStepInput, encoding: StepEncoding) -> dict[str, Any]:
        if not isinstance(encoding, SoftFields):
            return {}
        return {
            "soft_l0": encoding.soft_l0.float().mean(),
            "alpha": encoding.alpha,
            "k_target": self.schedule.k_target_at(step_input.n_training_steps),
        }


ARCHITECTURE = Architecture(
    name="softsae",
    sae_class=SoftSAE,
    sae_config_class=SoftSAEConfig,
    training_sae_class=SoftSAETrainingSAE,
    training_sae_config_class=SoftSAETrainingSAEConfig,
)
