"""SoftSAE for SAELens: a per-input number of active latents, learned end-to-end (arXiv 2605.06610).

A small k-estimator ``k̂(x) = clamp(k_max · σ(v · ReLU(U (x − b_dec) + c) + c₀), 1, k_max)`` says
how many latents each input needs (``U``: ``k_est_W_enc`` ``[d_in, k_estimator_hidden]``, ``c``:
``k_est_b_enc``, ``v``: ``k_est_w_out``, ``c₀``: ``k_est_b_out``; all persistent parameters).
The estimator reads the same input as the encoder (``process_sae_in``: ``x − b_dec`` unless
``apply_b_dec_to_input`` is False).

Training (:class:`SoftSAETrainingSAE`, a SAELens ``TopKTrainingSAE``), all schedule state a pure
function of SAELens's ``TrainStepInput.n_training_steps`` (nothing else is stored, so a run
resumed from a SAELens checkpoint continues the schedule from the checkpoint's step count —
exactly, for the final checkpoint; SAELens 6.54 writes its *mid-run* checkpoints before
advancing that counter, so a resume from one of those replays the schedule one step behind):

- soft phase (``step < hard_topk_start_step``): code ``f = z ⊙ m`` with ``z = ReLU(pre-acts)``
  and the LapSum soft top-k mask ``m`` (``ops/lapsum.py``, ``Σ m = k̂(x)`` per row, its threshold
  solved from each row's top ``2·k_max + 2`` pre-activations since ``k̂ ≤ k_max``) at scale
  ``α_t`` (linear from ``alpha_start`` to ``alpha_end`` over ``alpha_anneal_steps``). Loss:
  ``‖x − x̂‖²`` + SAELens's TopK AuxK loss + ``λ_k · softplus_β(mean_batch k̂ − K_t)`` with
  ``β = 5``, ``λ_k = 1``, and the target ``K_t`` linear from ``d_in`` to ``k`` over
  ``k_anneal_steps``. Gradients reach the estimator through ``m`` and the penalty.
- hard phase (``step ≥ hard_topk_start_step``): per-row hard top-``⌊k̂(x)⌋`` (``ops/variable_topk``:
  ``topk_encode``, encoder and selection in one op whose backward touches only the selected
  latents; the plain matmul + ``variable_topk`` path when ``hook_sae_acts_pre`` has forward hooks),
  the estimator frozen (computed without gradient, so Adam leaves it untouched), activations
  exactly zero outside the chosen latents.

In the soft phase the code ``f`` is decoded, but the ``feature_acts`` handed back to SAELens's
trainer (which counts firings from them: dead latents for AuxK, the logged L0) keep only the
latents the soft top-k selects (``m > ½``); with every latent carrying some weight, SAELens would
otherwise see no dead latent and AuxK would never act.

Measured on variable-complexity synthetic ground truth (``sae_adaptive_plugin.synthetic``: 128
true features in 32 dims with a shared component of cosine 0.3, per-sample true L0 ≈ 1–64,
mean ≈ 15; SAE width 128; batch 256; Adam
3e-3; TopK and BatchTopK from SAELens at ``k`` = SoftSAE's measured mean L0), mean over seeds
0, 1, 2, with ``python examples/softsae_ground_truth.py --steps 2000`` (and ``--steps 600``):

=========  ==========================  ==========================
SAE        2000 steps: EV / Spearman    600 steps: EV / Spearman
=========  ==========================  ==========================
SoftSAE    0.9649 / 0.986 (L0 13.5)    0.9368 / 0.986 (L0 14.4)
TopK       0.9398 / — (L0 13.7)        0.9304 / — (L0 14.3)
BatchTopK  0.9707 / 0.913 (L0 13.6)    0.9488 / 0.978 (L0 14.2)
=========  ==========================  ==========================

(Spearman: each sample's SAE L0 against its true L0.) Those runs use ``alpha_end=0.02``; with
the reference's ``alpha_end=1e-4`` (this config's default) the 600-step SoftSAE reaches only EV
0.9077 (< TopK's 0.9214; ``--steps 600 --alpha-end 1e-4``). A likely cause (not isolated): at tiny α the
mask's score gradient ``q ∝ 1/α`` spikes, and SAELens clips the gradient norm to 1, which then
shrinks every other update. Pick ``alpha_end`` relative to the scale of the pre-activations.

Metrics (logged by SAELens as ``metrics/...``): ``mean_k`` and ``std_k`` (of ``k̂`` in the soft
phase, of ``⌊k̂⌋`` in the hard phase), ``soft_l0`` (non-zero soft weights per row, soft phase),
``alpha`` and ``k_target``.

Inference (:class:`SoftSAE`, a SAELens ``TopKSAE``): hard top-k with per-row ``k = ⌊k̂(x)⌋``;
``k_per_sample(x)`` returns those k. SAELens's activation norm-scaling and whitening folds also fold
the estimator's input map (``U``, and ``c`` when ``apply_b_dec_to_input`` is False), so the chosen
k and the outputs do not change; the decoder-norm fold (and the one SAELens applies when saving
with ``rescale_acts_by_decoder_norm``) does not touch the estimator, which never reads ``W_dec``.
"""

from __future__ import annotations

import math
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
from sae_adaptive_plugin.ops.variable_topk import (
    TopKResult,
    decode_topk,
    scatter_topk,
    topk_encode,
    variable_topk,
)
from sae_adaptive_plugin.provenance import stamp_provider
from sae_adaptive_plugin.saes.per_row_topk import PerRowTopK

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


@dataclass
class SoftSAETrainingConfig(TopKTrainingSAEConfig):
    """Training config of ``softsae`` (fields beyond SAELens's TopK training config).

    Args:
        k: target mean number of active latents (``1 ≤ k ≤ k_max``).
        k_max: upper bound of ``k̂(x)``; default ``min(2k, d_sae)``; at most ``d_sae``.
        k_estimator_hidden: hidden width of the k-estimator; default ``d_sae`` (the reference).
        alpha_start, alpha_end: LapSum scale at step 0 and after ``alpha_anneal_steps`` (> 0).
        alpha_anneal_steps: steps of the linear α schedule (≥ 0; 0 = ``alpha_end`` throughout).
        k_anneal_steps: steps over which the penalty's target falls linearly from ``d_in`` to
            ``k`` (≥ 0; 0 = ``k`` throughout).
        hard_topk_start_step: first step of the hard phase (≥ 0); ``None`` = soft to the end
            (the reference switches 10,000 steps before the end).
    """

    k_max: int | None = None
    k_estimator_hidden: int | None = None
    alpha_start: float = 0.99
    alpha_end: float = 1e-4
    alpha_anneal_steps: int = 2500
    k_anneal_steps: int = 1000
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
        _check_int("alpha_anneal_steps", self.alpha_anneal_steps, 0)
        _check_int("k_anneal_steps", self.k_anneal_steps, 0)
        if self.hard_topk_start_step is not None:
            _check_int("hard_topk_start_step", self.hard_topk_start_step, 0)
        if self.use_sparse_activations:
            raise ValueError("use_sparse_activations must be False for softsae (not supported)")
        super().__post_init__()

    @classmethod
    def architecture(cls) -> str:
        return "softsae"

    # ---- schedules: pure functions of the step count SAELens passes in ----

    def alpha_at(self, step: int) -> float:
        """LapSum scale α at ``step``."""
        frac = 1.0 if self.alpha_anneal_steps == 0 else min(step / self.alpha_anneal_steps, 1.0)
        return self.alpha_start + (self.alpha_end - self.alpha_start) * frac

    def k_target_at(self, step: int) -> float:
        """Target ``K_t`` of the batch-mean k̂ at ``step``."""
        frac = 1.0 if self.k_anneal_steps == 0 else min(step / self.k_anneal_steps, 1.0)
        return self.d_in + (self.k - self.d_in) * frac

    def is_hard_phase(self, step: int) -> bool:
        """Whether ``step`` trains with hard top-``⌊k̂⌋`` and a frozen estimator."""
        return self.hard_topk_start_step is not None and step >= self.hard_topk_start_step


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
        h = torch.relu(sae_in @ self.k_est_W_enc + self.k_est_b_enc)
        logit = h @ self.k_est_w_out + self.k_est_b_out[0]
        return (self.cfg.k_max * torch.sigmoid(logit)).clamp(1.0, float(self.cfg.k_max))

    def _k_from_k_hat(self, k_hat: torch.Tensor) -> torch.Tensor:
        return k_hat.detach().floor().long().clamp(1, self.cfg.k_max)

    @torch.no_grad()
    def k_per_sample(self, x: torch.Tensor) -> torch.Tensor:
        """The number of latents (``⌊k̂(x)⌋``, ``long``) the SAE keeps for each row of ``x``."""
        sae_in = self.process_sae_in(x)  # type: ignore[attr-defined]
        return self._k_from_k_hat(self.estimate_k_from_sae_in(sae_in))

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

    def initialize_weights(self) -> None:
        super().initialize_weights()
        self._init_k_estimator()

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

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        step = step_input.n_training_steps
        sae_in = self.process_sae_in(step_input.sae_in)
        metrics: dict[str, Any] = {}
        if self.cfg.is_hard_phase(step):
            with torch.no_grad():
                k_hat = self.estimate_k_from_sae_in(sae_in)
            hidden_pre, res, feature_acts = self._hard_encode(sae_in, k_hat)
            sae_out = self._decode_compact(res.values, res.indices)
            k_used = res.mask.sum(dim=-1).float()
            penalty = None
        else:
            alpha = self.cfg.alpha_at(step)
            hidden_pre = self._hidden_pre(sae_in)
            k_hat = self.estimate_k_from_sae_in(sae_in)
            z = hidden_pre.relu()
            mask = lapsum_topk(z, k_hat, alpha, k_max=self.cfg.k_max)  # τ from the top 2k_max+2
            code = self.hook_sae_acts_post(z * mask)
            sae_out = self.decode(code)
            # SAELens counts firings (dead latents → AuxK, logged L0) from feature_acts: report
            # the latents the soft top-k selects (m > ½), not every latent with a tiny weight
            feature_acts = torch.where(mask > 0.5, code, torch.zeros((), dtype=code.dtype))
            k_used = k_hat.detach().float()
            k_target = self.cfg.k_target_at(step)
            penalty = K_PENALTY_COEFFICIENT * F.softplus(
                k_hat.float().mean() - k_target, beta=K_PENALTY_BETA
            )
            metrics["soft_l0"] = (code.detach() != 0).sum(dim=-1).float().mean()
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
