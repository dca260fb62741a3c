"""HierarchicalTopK for SAELens (``hierarchical_topk``): one SAE trained for every budget ``k' ≤ K``.

Training selects the sorted top-``K`` latents (``K = cfg.k``) of each row and minimises the mean over
all prefixes of their reconstruction error, ``mean_{j=1..K} ‖x − x̂_j‖²`` (exact ``B×K×K`` form,
:func:`~sae_adaptive_plugin.ops.hierarchical.prefix_reconstruction_errors`), logged as ``mse_loss``
(``j = K``) plus ``prefix_excess_loss``, with SAELens's AuxK. Inference is SAELens's ``TopKSAE`` at
a budget ``cfg.k`` that may change after loading (:meth:`HierarchicalTopKSAE.set_k`,
:func:`load_at_budget`); a trained SAE exports to a plain SAELens ``topk`` SAE at a chosen budget
(:func:`export_topk`). Usage and metrics: docs/notes_saes.md; design: docs/METHODS.md §1.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import SAEMetadata, TrainStepInput
from sae_lens.saes.topk_sae import (
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAEConfig,
)
from typing_extensions import override

from sae_adaptive_plugin.provenance import PROVIDER_METADATA_KEY, PROVIDER_VERSION_METADATA_KEY
from sae_adaptive_plugin.registration.hookspecs import Architecture
from sae_adaptive_plugin.saes.config_checks import (
    check_b_dec_init_method,
    check_int,
    check_sparse_training_code,
    resolve_sizes,
    warn_if_auxk_rare_tokens_too_few,
)
from sae_adaptive_plugin.saes.topk_family import (
    PREFIX_EXCESS_LOSS,
    StepEncoding,
    TopKEncoding,
    TopKFamilyMixin,
    TopKFamilySAE,
    TopKFamilyTrainingSAE,
    prefix_excess,
)

NAME = "hierarchical_topk"
#: Decay per step of the running training errors of the end-of-run budget check (≈ the last 10).
BUDGET_CHECK_DECAY = 0.9

#: ``prefix_weights`` values: how the loss weighs the error of prefix ``j`` (``w_j``, summing to 1).
PREFIX_WEIGHTS = ("uniform", "harmonic", "inverse_sqrt")

#: ``normalize_activations`` values whose output transform is the identity, so that prefix errors
#: in the SAE's reconstruction space are the errors of its real outputs.
_SUPPORTED_NORMALIZATION = ("none", "expected_average_only_in")


def _check_budget(k: Any, trained_k: int, d_sae: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int in [1, trained_k={trained_k}], got {k!r}")
    if not 1 <= k <= trained_k:
        raise ValueError(
            f"k={k} is outside the budgets this HierarchicalTopK SAE was trained for: "
            f"k must lie in [1, trained_k={trained_k}]"
        )
    if k > d_sae:
        raise ValueError(f"k={k} must be <= d_sae={d_sae}")
    return k


def _check_normalization(value: str) -> None:
    if value not in _SUPPORTED_NORMALIZATION:
        raise ValueError(
            f"normalize_activations={value!r} is not supported by hierarchical_topk "
            f"(its prefix losses need an identity output transform); use one of "
            f"{_SUPPORTED_NORMALIZATION}"
        )


def _check_prefix_weights(scheme: str) -> None:
    if scheme not in PREFIX_WEIGHTS:
        raise ValueError(f"prefix_weights must be one of {PREFIX_WEIGHTS}, got {scheme!r}")


def prefix_weights(scheme: str, K: int, device: torch.device) -> torch.Tensor | None:
    """The loss weights ``w_j`` of prefixes ``j = 1..K`` (``[K]``, summing to 1): ``"uniform"``
    → ``None`` (``w_j = 1/K``); ``"harmonic"`` → ``w_j ∝ 1/j``, which gives every doubling of
    the budget about the same weight, so the smallest budgets weigh more; ``"inverse_sqrt"`` →
    ``w_j ∝ 1/√j``, between the two."""
    _check_prefix_weights(scheme)
    if scheme == "uniform":
        return None
    j = torch.arange(1, K + 1, device=device, dtype=torch.float32)
    inverse = j.reciprocal() if scheme == "harmonic" else j.rsqrt()
    return inverse / inverse.sum()


def metric_budgets(k_max: int) -> list[int]:
    """The budgets reported in training metrics: ``K/4, K/2, K`` (rounded down, ≥ 1, distinct)."""
    return sorted({max(1, k_max // 4), max(1, k_max // 2), k_max})


class _Budgets(TopKFamilyMixin):
    """One budget for every row; prefix errors of every budget up to the trained ``K``."""

    @property
    def trained_k(self) -> int:
        """The largest budget ``K`` the SAE was (is being) trained with."""
        return self.cfg.trained_k

    @property
    def k_max(self) -> int:
        """The width of the selection: the largest trained budget ``K``."""
        return self.trained_k

    def current_k(self) -> int:
        """The budget used now (raises ``ValueError`` outside ``[1, K]``)."""
        return _check_budget(self.cfg.k, self.k_max, self.cfg.d_sae)

    def k_for_rows(self, x_in: torch.Tensor, sae_in: torch.Tensor) -> torch.Tensor:
        return torch.full(x_in.shape[:-1], self.current_k(), dtype=torch.long, device=x_in.device)

    @torch.no_grad()
    def prefix_errors(self, x: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
        """``‖x − x̂_j‖²`` for every budget ``j = 1..K`` at once: ``[N, K]``; column ``j−1`` is
        the squared error of the forward pass at ``cfg.k = j`` (``x`` flattened to ``[N, d_in]``)."""
        _check_normalization(self.cfg.normalize_activations)
        if self.cfg.reshape_activations != "none":
            raise ValueError("prefix_errors supports reshape_activations='none' only")
        x_in = self.read_input(x.reshape(-1, self.cfg.d_in))
        every_budget = torch.full(x_in.shape[:-1], self.k_max, device=x_in.device)
        _, selection = self.select_top_k(self.center_input(x_in), every_budget)
        return self.prefix_errors_from_selection(x_in, selection, chunk_size)


@dataclass
class HierarchicalTopKSAEConfig(TopKSAEConfig):
    """Inference config of a HierarchicalTopK SAE.

    Args:
        k: the budget used by ``encode`` now, any int in ``[1, trained_k]``; may be changed after
            loading (``cfg.k = …`` or :meth:`HierarchicalTopKSAE.set_k`).
        trained_k: the largest budget ``K`` the SAE was trained with (``None`` → ``k``).
        Other fields: as SAELens's ``TopKSAEConfig``.
    """

    trained_k: int | None = None

    def __post_init__(self) -> None:
        resolve_sizes(self, "d_in", "d_sae")
        resolve_sizes(self, "k", "trained_k", lo=None)
        super().__post_init__()
        if self.trained_k is None:
            self.trained_k = self.k
        self.trained_k = check_int("trained_k", self.trained_k, 1, self.d_sae, hi_name="d_sae")
        _check_budget(self.k, self.trained_k, self.d_sae)

    @override
    @classmethod
    def architecture(cls) -> str:
        return NAME


class HierarchicalTopKSAE(_Budgets, TopKFamilySAE):
    """Inference HierarchicalTopK SAE: a SAELens ``TopKSAE`` whose budget ``cfg.k`` may change."""

    cfg: HierarchicalTopKSAEConfig  # type: ignore[assignment]

    def set_k(self, k: int) -> HierarchicalTopKSAE:
        """Set the inference budget (``1 ≤ k ≤ trained_k``); returns ``self``."""
        self.cfg.k = _check_budget(k, self.trained_k, self.cfg.d_sae)
        self.activation_fn.k = k
        return self

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        # SAELens's own TopK encode, so that a plain topk export gives bit-identical outputs
        self.activation_fn.k = self.current_k()
        return TopKSAE.encode(self, x)

    def to_topk_sae(self, k: int | None = None) -> TopKSAE:
        """A plain SAELens ``TopKSAE`` with the same weights at budget ``k`` (default ``cfg.k``)."""
        k = _check_budget(self.cfg.k if k is None else k, self.trained_k, self.cfg.d_sae)
        names = {f.name for f in fields(TopKSAEConfig)} - {"metadata"}
        kwargs = {name: getattr(self.cfg, name) for name in names}
        kwargs["k"] = k
        meta = copy.deepcopy(self.cfg.metadata.to_dict())
        meta["exported_from_architecture"] = NAME
        for key in (PROVIDER_METADATA_KEY, PROVIDER_VERSION_METADATA_KEY):  # plain SAELens loads it
            meta.pop(key, None)
        meta["hierarchical_topk_trained_k"] = self.trained_k
        topk_cfg = TopKSAEConfig(**kwargs, metadata=SAEMetadata(**meta))
        device = topk_cfg.device
        topk_cfg.device = "meta"
        out = TopKSAE(topk_cfg)
        out.cfg.device = device
        state = {name: t.detach().clone() for name, t in self.state_dict().items()}
        out.load_state_dict(state, assign=True)
        return out

    def export_topk(self, path: str | Path, k: int | None = None) -> Path:
        """Save as a plain SAELens ``topk`` SAE at budget ``k`` into ``path``; returns ``path``."""
        path = Path(path)
        self.to_topk_sae(k).save_model(path)
        return path


def load_at_budget(
    path: str | Path, k: int | None = None, **load_kwargs: Any
) -> HierarchicalTopKSAE:
    """``SAE.load_from_disk(path, **load_kwargs)`` of a ``hierarchical_topk`` SAE, at budget ``k``."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(path, **load_kwargs)
    if not isinstance(sae, HierarchicalTopKSAE):
        raise ValueError(f"{path} holds a {type(sae).__name__}, not a hierarchical_topk SAE")
    if k is not None:
        sae.set_k(k)
    return sae


def export_topk(source: str | Path | HierarchicalTopKSAE, path: str | Path, k: int) -> Path:
    """Export a ``hierarchical_topk`` SAE (object or saved folder) as a plain SAELens ``topk`` SAE."""
    sae = source if isinstance(source, HierarchicalTopKSAE) else load_at_budget(source)
    return sae.export_topk(path, k)


@dataclass
class HierarchicalTopKTrainingSAEConfig(TopKTrainingSAEConfig):
    """Training config of a HierarchicalTopK SAE.

    Args:
        k: the largest budget ``K``; the loss averages the reconstruction errors of all prefixes
            ``1..K`` of the sorted top-``K``. Must lie in ``[1, d_sae]``. Unset, it is SAELens
            TopK's default (100): every budget up to it is trained, so set it to the largest
            budget you will use.
        loss_chunk_size: rows whose ``K`` decoder rows are gathered at once by the loss (memory
            knob only; ``None`` = automatic, at most ``2**22`` gathered elements).
        decoder_unit_norm: keep decoder rows at unit norm during training and remove the
            gradient component parallel to each row (EleutherAI sparsify's decoder handling).
        b_dec_init_method: how training starts the decoder bias: ``"zeros"`` (SAELens's
            start, default) or ``"mean"`` (the first training batch's mean, over every rank;
            EleutherAI sparsify's start). A ``b_dec`` that is not all zeros at the first step
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
        prefix_weights: how the loss weighs the prefixes' errors: ``"uniform"`` (the method's
            ``mean_j``, default), ``"harmonic"`` (``w_j ∝ 1/j``: more weight on the smallest
            budgets) or ``"inverse_sqrt"`` (``w_j ∝ 1/√j``); measured in docs/compare.md.
        Other fields: as SAELens's ``TopKTrainingSAEConfig`` (``aux_loss_coefficient``,
        ``rescale_acts_by_decoder_norm``, ``use_sparse_activations``, ``decoder_init_norm``, …).
        ``normalize_activations`` must be ``"none"`` or ``"expected_average_only_in"``.
    """

    loss_chunk_size: int | None = None
    decoder_unit_norm: bool = False
    b_dec_init_method: str = "zeros"
    auxk_rare_tokens: int | None = None
    prefix_weights: str = "uniform"
    sparse_training_code: bool | None = None

    def __post_init__(self) -> None:
        resolve_sizes(self, "d_in", "d_sae", "auxk_rare_tokens")
        self.k = check_int("k", self.k, 1, self.d_sae, hi_name="d_sae")
        _check_prefix_weights(self.prefix_weights)
        check_b_dec_init_method(self.b_dec_init_method)
        check_sparse_training_code(self.sparse_training_code)
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be >= 1 or None, got {self.loss_chunk_size}")
        _check_normalization(self.normalize_activations)
        warn_if_auxk_rare_tokens_too_few(self, "hierarchical_topk")
        super().__post_init__()

    @property
    def trained_k(self) -> int:
        """The largest trained budget, written into the inference config as ``trained_k``."""
        return self.k

    @override
    @classmethod
    def architecture(cls) -> str:
        return NAME


class HierarchicalTopKTrainingSAE(_Budgets, TopKFamilyTrainingSAE):
    """SAELens ``TopKTrainingSAE`` trained with the HierarchicalTopK all-prefix loss.

    At the last step of a run of known length (``bind_run_length``, which SAELens's trainer
    calls) it warns if the training batches' mean per-row explained variance ``1 − ‖x − x̂‖² /
    ‖x − mean‖²`` with all ``K`` latents, a running mean over the last steps
    (:data:`BUDGET_CHECK_DECAY`), is below the one with ``K // 2``: the largest budgets would
    make reconstructions worse."""

    cfg: HierarchicalTopKTrainingSAEConfig  # type: ignore[assignment]
    total_training_steps: int | None = None
    #: running means of the per-row relative errors at ``K // 2`` and ``K`` (on the device)
    _budget_errors: torch.Tensor | None = None

    @property
    def prefix_loss_chunk_size(self) -> int | None:
        return self.cfg.loss_chunk_size

    def bind_run_length(self, total_steps: int) -> None:
        """The run's length, for the end-of-run budget check (SAELens's trainer calls this)."""
        self.total_training_steps = total_steps

    def record_training_step(self, step_input: TrainStepInput, encoding: StepEncoding) -> None:
        assert isinstance(encoding, TopKEncoding)
        K = self.cfg.k
        if K < 2:
            return
        with torch.no_grad():
            all_errors = self.prefix_errors_of(encoding).detach()
            errors = torch.stack([all_errors[:, K // 2 - 1], all_errors[:, -1]], dim=1)
            x = self.run_time_activation_norm_fn_in(encoding.x_in).reshape(-1, self.cfg.d_in)
            variance = (x - x.mean(0)).pow(2).sum(-1, keepdim=True).to(errors.dtype)
            pair = (errors / variance.clamp_min(torch.finfo(errors.dtype).tiny)).mean(0).float()
            if self._budget_errors is None:
                self._budget_errors = pair
            else:
                self._budget_errors.lerp_(pair, 1.0 - BUDGET_CHECK_DECAY)
        if step_input.n_training_steps + 1 == self.total_training_steps:
            self.check_full_budget()

    def check_full_budget(self) -> None:
        """Warn if the running explained variance at ``K`` is below the one at ``K // 2`` (one
        host read)."""
        if self._budget_errors is None:
            return
        half, full = (1.0 - e for e in self._budget_errors.tolist())
        K = self.cfg.k
        if full < half:
            warnings.warn(
                f"hierarchical_topk: at the end of this {self.total_training_steps}-step run the "
                f"training batches' mean explained variance with all k={K} latents ({full:.3f}) "
                f"is below the one with {K // 2} ({half:.3f}): its largest budgets make "
                f"reconstructions worse, so the SAE is undertrained for k={K}. Train for more "
                "steps, or set a smaller k (the largest budget you will use)",
                stacklevel=2,
            )

    def training_reconstruction(
        self, step_input: TrainStepInput, encoding: StepEncoding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix errors with the last prefix's residual, in one pass: ``mse_loss`` is the
        error at ``K``, ``sae_out = x − residual`` (no gradient; the loss carries it); no
        separate decode. Elsewhere (hooks, hook_z, another MSE): the decode."""
        assert isinstance(encoding, TopKEncoding)
        if not self.reconstructs_from_prefixes():
            return super().training_reconstruction(step_input, encoding)
        return self.reconstruction_from_prefixes(
            step_input, encoding, self.prefix_errors_of(encoding)
        )

    def extra_losses(
        self, step_input: TrainStepInput, encoding: StepEncoding, mse_loss: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        assert isinstance(encoding, TopKEncoding)
        errors = self.prefix_errors_of(encoding)
        weights = prefix_weights(self.cfg.prefix_weights, self.cfg.k, errors.device)
        return {PREFIX_EXCESS_LOSS: prefix_excess(errors, weights)}

    @torch.no_grad()
    def extra_metrics(self, step_input: TrainStepInput, encoding: StepEncoding) -> dict[str, Any]:
        """``mse_at_k{j}`` and ``explained_variance_at_k{j}`` at the budgets ``K/4, K/2, K``."""
        assert isinstance(encoding, TopKEncoding)
        errors = self.prefix_errors_of(encoding).detach().mean(0)
        x = step_input.sae_in.to(errors.dtype).reshape(-1, self.cfg.d_in)
        total_variance = (x - x.mean(0)).pow(2).sum(-1).mean()
        metrics: dict[str, Any] = {}
        for j in metric_budgets(self.cfg.k):
            metrics[f"mse_at_k{j}"] = errors[j - 1]
            metrics[f"explained_variance_at_k{j}"] = 1 - errors[j - 1] / total_variance
        return metrics


ARCHITECTURE = Architecture(
    name=NAME,
    sae_class=HierarchicalTopKSAE,
    sae_config_class=HierarchicalTopKSAEConfig,
    training_sae_class=HierarchicalTopKTrainingSAE,
    training_sae_config_class=HierarchicalTopKTrainingSAEConfig,
)
