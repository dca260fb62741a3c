"""AdaptiveK for SAELens (``adaptivek``): hard top-k per row, k from a linear complexity probe.

Each row ``x`` keeps its top ``k(x)`` latents, ``k(x) = round(k_min + σ(γ(s − ½))(k_max − k_min))``
with ``s`` the probe output ``ĉ = wᵀx + b`` (clamped to its label range) scaled to ``[0, 1]``
(:func:`~sae_adaptive_plugin.ops.adaptive_k.complexity_to_k`). The probe lives in buffers
(``probe_weight``, ``probe_bias``, ``probe_label_range``, ``probe_fitted``), saved with the weights,
and SAELens's folds of the input are folded into it.

The probe comes from ``probe_path`` or from a warm-up at ``k_max`` (a prefix loss by default)
whose second half labels each row with ``k*``, the fewest sorted latents whose prefix error is at
most ``τ`` times the batch's mean variance (:mod:`~sae_adaptive_plugin.saes.adaptivek_warmup`).
Design and measurements: docs/METHODS.md §3, docs/notes_saes.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.sae import SAEConfig, TrainingSAEConfig
from typing_extensions import override

from sae_adaptive_plugin.ops.adaptive_k import complexity_to_k
from sae_adaptive_plugin.probe import ComplexityProbe
from sae_adaptive_plugin.registration.hookspecs import Architecture
from sae_adaptive_plugin.saes.adaptivek_warmup import ACC_PREFIX as ACC_PREFIX
from sae_adaptive_plugin.saes.adaptivek_warmup import WARMUP_FRACTION, AdaptiveKWarmup
from sae_adaptive_plugin.saes.config_checks import (
    check_b_dec_init_method,
    check_int,
    check_number,
    check_share,
    check_sparse_training_code,
    missing_k_error,
    resolve_sizes,
    warn_if_auxk_rare_tokens_too_few,
)
from sae_adaptive_plugin.saes.per_row_topk import PerRowTopK
from sae_adaptive_plugin.saes.run_length import fraction_of_run, unknown_run_length_error
from sae_adaptive_plugin.saes.topk_family import (
    InputReader,
    TopKFamilyMixin,
    TopKFamilySAE,
    TopKFamilyTrainingSAE,
)

NAME = "adaptivek"

#: Trainer-side normalisations a pre-fitted (raw-activation) probe cannot follow.
_TRAINER_SIDE_NORMALIZATION = ("expected_average_only_in", "covariance_whitening")
#: Losses of the warm-up phase (see ``AdaptiveKTrainingSAEConfig.warmup_loss``).
_WARMUP_LOSSES = ("hierarchical", "block_ends", "mse")
#: Scales of the ``k*`` threshold (see ``AdaptiveKTrainingSAEConfig.kstar_scale``).
KSTAR_SCALES = ("dataset", "row")
#: Defaults of ``k_min`` and of ``k_max / k`` (``k_max = min(4k, d_sae)``) for a target ``k``.
DEFAULT_K_MIN, DEFAULT_K_MAX_FACTOR = 1, 4
#: Default ``resample_below``: latents used inside ``k*`` under a tenth as often as the mean.
DEFAULT_RESAMPLE_BELOW = 0.1


def _check_int(name: str, value: Any, lo: int, hi: int, hi_name: str = "") -> int:
    return check_int(name, value, lo, hi, hi_name=hi_name)


def _validate_k_fields(cfg: Any) -> None:
    resolve_sizes(cfg, "d_in", "d_sae")
    cfg.k_max = _check_int("k_max", cfg.k_max, 1, cfg.d_sae, "d_sae")  # k_max <= d_sae
    number = isinstance(cfg.k_min, (int, float)) and not isinstance(cfg.k_min, bool)
    if number and cfg.k_min > cfg.k_max:
        raise ValueError(f"k_min={cfg.k_min} must be <= k_max={cfg.k_max} (k_min in [1, k_max])")
    cfg.k_min = _check_int("k_min", cfg.k_min, 1, cfg.k_max, "k_max")
    check_number("steepness", cfg.steepness)


class _ProbeK(TopKFamilyMixin):
    """Each row's k from the probe buffers (``k_max`` until a probe is fitted)."""

    probe_weight: torch.Tensor
    probe_bias: torch.Tensor
    probe_label_range: torch.Tensor
    probe_fitted: torch.Tensor

    def initialize_weights(self) -> None:
        super().initialize_weights()  # type: ignore[misc]
        dev, f32 = self.device, torch.float32  # type: ignore[attr-defined]
        reg = self.register_buffer  # type: ignore[attr-defined]
        reg("probe_weight", torch.zeros(self.cfg.d_in, dtype=f32, device=dev))
        reg("probe_bias", torch.zeros((), dtype=f32, device=dev))
        reg("probe_label_range", torch.zeros(2, dtype=f32, device=dev))
        reg("probe_fitted", torch.zeros((), dtype=torch.long, device=dev))
        self._probe_on = False
        # the flag follows the buffer through load_state_dict (resume, load_from_disk)
        self.register_load_state_dict_post_hook(_ProbeK._read_probe_flag)  # type: ignore[attr-defined]

    def _read_probe_flag(self, incompatible_keys: Any = None) -> None:
        """Set :attr:`is_adaptive` from the ``probe_fitted`` buffer (one host read)."""
        fitted = self.probe_fitted
        self._probe_on = fitted.device.type != "meta" and bool(fitted.item())

    def get_activation_fn(self) -> PerRowTopK:  # encode selects (fused); the same selection
        return PerRowTopK(self.cfg.k_max)

    @property
    def is_adaptive(self) -> bool:
        """True once a probe is in place (before that every row uses ``k_max``): a Python bool,
        set with the ``probe_fitted`` buffer (no host read per step)."""
        return self._probe_on

    @torch.no_grad()
    def set_probe(self, probe: ComplexityProbe) -> None:
        """Copy ``probe`` into the SAE's buffers and switch to adaptive k."""
        probe.check_d_in(self.cfg.d_in, what=f"this adaptivek SAE (d_in={self.cfg.d_in})")
        dev = self.probe_weight.device
        if dev.type == "meta":
            return
        self.probe_weight.copy_(probe.weight.to(dev))
        self.probe_bias.fill_(probe.bias)
        label_range = [probe.label_min, probe.label_max]
        self.probe_label_range.copy_(torch.tensor(label_range, dtype=torch.float32, device=dev))
        self.probe_fitted.fill_(1)
        self._probe_on = True

    def get_probe(self) -> ComplexityProbe | None:
        """The stored probe as a :class:`ComplexityProbe` (``None`` before one is fitted)."""
        if not self.is_adaptive:
            return None
        lo, hi = (float(v) for v in self.probe_label_range.float().cpu())
        weight = self.probe_weight.detach().float().cpu()
        return ComplexityProbe(weight, float(self.probe_bias), lo, hi)

    def complexity(self, x_in: torch.Tensor) -> torch.Tensor:
        """Clamped probe output for rows of the SAE's (un-normalised) input ``[..., d_in]``."""
        c = x_in.to(torch.float32) @ self.probe_weight.float() + self.probe_bias.float()
        lo, hi = self.probe_label_range.float()
        return torch.maximum(torch.minimum(c, hi), lo)

    def k_for_rows(self, x_in: torch.Tensor, sae_in: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if not self.is_adaptive:
            return torch.full(x_in.shape[:-1], cfg.k_max, dtype=torch.long, device=x_in.device)
        lo, hi = self.probe_label_range
        return complexity_to_k(
            self.complexity(x_in).detach(), lo, hi, cfg.k_min, cfg.k_max, float(cfg.steepness)
        )

    def input_reader(self) -> InputReader:
        return InputReader(self.probe_weight, self.probe_bias, reads_sae_in=False)


@dataclass
class AdaptiveKSAEConfig(SAEConfig):
    """Inference config of an AdaptiveK SAE.

    Args:
        k_min: smallest per-row k, in ``[1, k_max]``.
        k_max: largest per-row k (and the warm-up k), in ``[k_min, d_sae]``.
        steepness: ``γ`` of the sigmoid map, > 0 (reference 6).
        rescale_acts_by_decoder_norm: as SAELens's TopK (already folded in a saved SAE).
        Other fields: as SAELens's ``SAEConfig``.
    """

    k_min: int = 20
    k_max: int = 320
    steepness: float = 6.0
    rescale_acts_by_decoder_norm: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate_k_fields(self)

    @override
    @classmethod
    def architecture(cls) -> str:
        return NAME


class AdaptiveKSAE(_ProbeK, TopKFamilySAE):
    """Inference AdaptiveK SAE: SAELens ``TopKSAE`` with per-row k from the stored probe."""

    cfg: AdaptiveKSAEConfig  # type: ignore[assignment]


@dataclass
class AdaptiveKTrainingSAEConfig(TrainingSAEConfig):
    """Training config of an AdaptiveK SAE (``architecture="adaptivek"``).

    Args:
        k: target mean number of active latents (required, no default); must lie in
            ``[k_min, k_max]``, which default to ``1`` and ``min(4k, d_sae)``.
        k_min: smallest per-row k, in ``[1, k]``.
        k_max: largest per-row k and the warm-up k, in ``[k, d_sae]``.
        steepness: ``γ`` of the sigmoid map, > 0 (reference 6).
        probe_path: a pre-fitted probe file (``ComplexityProbe.save``); ``None`` = fit one during
            a warm-up from ``k*`` labels.
        probe_warmup_steps: warm-up steps at ``k_max`` before the probe is fitted (``>= 1``
            and before the end of the run, without ``probe_path``; ignored with it); ``None``:
            a quarter of the run (``bind_run_length``). ``k*`` statistics are gathered in the
            second half of the warm-up.
        target_fvu: ``τ`` of the ``k*`` label, in ``(0, 1)``: the fraction of the variance
            (see ``kstar_scale``) a row's first ``k*`` latents must leave unexplained at most.
            ``None`` (default): chosen on the first labelled warm-up batch so that the median
            ``k*`` is ``k``; recorded in the probe report.
        kstar_scale: what ``τ`` multiplies in the ``k*`` threshold: ``"dataset"`` (default),
            the batch's mean variance ``mean_rows ‖x − batch mean‖²``; ``"row"``, each row's own
            ``‖x − batch mean‖²`` (non-monotone in complexity on anisotropic data).
        probe_min_r2: the fitted probe's held-out R² must reach this, or training stops with an
            error (the per-row k would be noise); ``-inf`` disables the check.
        probe_n_folds: cross-validation folds of the probe's ridge fit, ``>= 2``.
        warmup_loss: loss of the warm-up at ``k_max``: ``"block_ends"`` (default; the mean
            of the prefix errors at the prefixes 8, 16, …, ``k_max``, so that the prefix
            reconstructions ``k*`` is read from are good at every length; plain MSE when
            ``k_max ≤ 8``), ``"hierarchical"`` (HierarchicalTopK's mean over all prefixes: the
            same training, with a Gram matrix per block of 8 prefixes) or ``"mse"`` (plain TopK
            at ``k_max``).
        aux_loss_coefficient: weight of SAELens's TopK AuxK loss.
        rescale_acts_by_decoder_norm: as SAELens's TopK (select on ``hidden_pre·‖W_dec‖``).
        decoder_unit_norm: keep decoder rows at unit norm during training and remove the
            gradient component parallel to each row (EleutherAI sparsify's decoder handling).
        b_dec_init_method: how training starts the decoder bias: ``"mean"`` (default: the
            first training batch's mean, over every rank; EleutherAI sparsify's start) or
            ``"zeros"`` (SAELens's start). A ``b_dec`` that is not all zeros at the first step
            (a loaded SAE) is kept.
        auxk_rare_tokens: a latent firing less than once per this many training tokens (a
            moving estimate over the last 4× as many) also counts as dead for the AuxK loss, as
            well as those SAELens's dead-feature window marks (``None``, default: that window
            only; SAELens counts one firing in the window as alive).
        sparse_training_code: training steps hand SAELens's trainer the code as a COO tensor
            built from the selection (``True``), so no dense ``[batch, d_sae]`` code is built for
            its firing counts, or the dense code (``False``, as SAELens's TopK). ``None``
            (default): COO on the CPU, dense elsewhere (SAELens's sums over a COO code make a
            GPU's host wait). COO only where nothing hooks ``hook_sae_acts_pre``/
            ``hook_sae_acts_post``; ``encode`` is unaffected.
        resample_below: at the switch, every latent that fired inside its rows' first ``k*``
            slots less than this fraction of the mean latent's count over the labelled
            warm-up steps starts again along a residual of the switch batch
            (:mod:`~sae_adaptive_plugin.saes.switch_resample`), in ``[0, 1]``; 0: none. Not
            used with ``probe_path`` (no warm-up).
        Other fields: as SAELens's ``TrainingSAEConfig``.
    """

    k: int | None = None
    k_min: int | None = None
    k_max: int | None = None
    steepness: float = 6.0
    probe_path: str | None = None
    probe_warmup_steps: int | None = None
    target_fvu: float | None = None
    kstar_scale: str = "dataset"
    probe_min_r2: float = 0.05
    probe_n_folds: int = 5
    warmup_loss: str = "block_ends"
    aux_loss_coefficient: float = 1.0
    rescale_acts_by_decoder_norm: bool = True
    decoder_unit_norm: bool = False
    b_dec_init_method: str = "mean"
    auxk_rare_tokens: int | None = None
    sparse_training_code: bool | None = None
    resample_below: float = DEFAULT_RESAMPLE_BELOW

    def __post_init__(self) -> None:
        resolve_sizes(self, "d_in", "d_sae", "auxk_rare_tokens")
        check_b_dec_init_method(self.b_dec_init_method)
        check_sparse_training_code(self.sparse_training_code)
        if self.k is None:
            raise missing_k_error(
                NAME, "k_min and k_max default to 1 and min(4k, d_sae) (per-row k in between)"
            )
        self.k = _check_int("k", self.k, 1, self.d_sae, "d_sae")
        if self.k_min is None:
            self.k_min = DEFAULT_K_MIN
        if self.k_max is None:
            self.k_max = min(DEFAULT_K_MAX_FACTOR * self.k, self.d_sae)
        _validate_k_fields(self)
        self.k = check_int(
            "k",
            self.k,
            self.k_min,
            self.k_max,
            lo_name="k_min",
            hi_name="k_max",
            why="outside it the per-row k is pinned at one bound and nothing adaptive is left; "
            "set k inside, or leave k_min/k_max unset (defaults 1 and min(4k, d_sae))",
        )
        if self.probe_path is None and self.probe_warmup_steps is not None:
            self.probe_warmup_steps = _check_int(
                "probe_warmup_steps", self.probe_warmup_steps, 1, 2**62
            )
        if (
            self.probe_path is not None
            and self.normalize_activations in _TRAINER_SIDE_NORMALIZATION
        ):
            raise ValueError(
                f"probe_path with normalize_activations={self.normalize_activations!r} is not "
                "supported: the pre-fitted probe reads raw activations but the SAE is trained on "
                "normalised ones; leave probe_path=None (the warm-up fits the probe on what the "
                "SAE sees and the fold maps it back) or use normalize_activations='none'"
            )
        if self.target_fvu is not None and not (
            isinstance(self.target_fvu, (int, float)) and 0.0 < self.target_fvu < 1.0
        ):
            raise ValueError(f"target_fvu must lie in (0, 1) or be None, got {self.target_fvu!r}")
        if not isinstance(self.probe_min_r2, (int, float)) or math.isnan(self.probe_min_r2):
            raise ValueError(f"probe_min_r2 must be a number <= 1, got {self.probe_min_r2!r}")
        self.probe_n_folds = _check_int("probe_n_folds", self.probe_n_folds, 2, 100)
        if self.kstar_scale not in KSTAR_SCALES:
            raise ValueError(f"kstar_scale must be one of {KSTAR_SCALES}, got {self.kstar_scale!r}")
        if self.warmup_loss not in _WARMUP_LOSSES:
            raise ValueError(
                f"warmup_loss must be one of {_WARMUP_LOSSES}, got {self.warmup_loss!r}"
            )
        self.resample_below = check_share(
            "resample_below", self.resample_below, " (0 = no resampling at the switch)"
        )
        warn_if_auxk_rare_tokens_too_few(self, NAME)
        super().__post_init__()

    @override
    @classmethod
    def architecture(cls) -> str:
        return NAME

    def resolved_warmup_steps(self, total_steps: int | None) -> int:
        """``probe_warmup_steps``, or a quarter of a ``total_steps`` run when it is ``None``."""
        if self.probe_warmup_steps is not None:
            return self.probe_warmup_steps
        if total_steps is None:
            raise unknown_run_length_error(NAME, ["probe_warmup_steps"])
        return max(2, fraction_of_run(WARMUP_FRACTION, total_steps))

    def check_run_length(self, total_steps: int) -> None:
        """Raise ``ValueError`` if the warm-up (without ``probe_path``) would not end before a
        run of ``total_steps`` steps does (checked before the model is loaded)."""
        if self.probe_path is not None:
            return
        warmup = self.resolved_warmup_steps(total_steps)
        if warmup >= total_steps:
            raise ValueError(
                f"adaptivek: probe_warmup_steps={warmup} is at or after the end of the run "
                f"({total_steps} training steps): the probe would never be fitted and every row "
                f"would use k_max. Set probe_warmup_steps in [1, {total_steps - 1}], leave it "
                f"unset (default {WARMUP_FRACTION:g} of the run) or give probe_path"
            )


class AdaptiveKTrainingSAE(AdaptiveKWarmup, _ProbeK, TopKFamilyTrainingSAE):
    """SAELens ``TopKTrainingSAE`` with per-row k from a probe fitted before or during training
    (the warm-up: :class:`~sae_adaptive_plugin.saes.adaptivek_warmup.AdaptiveKWarmup`)."""

    cfg: AdaptiveKTrainingSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: AdaptiveKTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.start_warmup()
        if cfg.probe_path is not None and str(cfg.device) != "meta":
            self.set_probe(ComplexityProbe.load(cfg.probe_path))


ARCHITECTURE = Architecture(
    name=NAME,
    sae_class=AdaptiveKSAE,
    sae_config_class=AdaptiveKSAEConfig,
    training_sae_class=AdaptiveKTrainingSAE,
    training_sae_config_class=AdaptiveKTrainingSAEConfig,
)
