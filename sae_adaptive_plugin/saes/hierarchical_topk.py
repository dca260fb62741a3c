"""HierarchicalTopK for SAELens: one SAE trained for every sparsity budget ``k' ≤ K`` (docs/METHODS.md §1).

Architecture name ``hierarchical_topk``. Training (:class:`HierarchicalTopKTrainingSAE`, a SAELens
``TopKTrainingSAE``) selects the sorted top-``K`` latents (``K = cfg.k``) and minimises the mean over
all prefixes ``j = 1..K`` of ``‖x − x̂_j‖²`` (:func:`~sae_adaptive_plugin.ops.hierarchical.
prefix_reconstruction_errors`, exact ``B×K×K`` form), plus SAELens's TopK AuxK loss. Encoder and
selection run as one op whose backward touches only the selected latents
(:func:`~sae_adaptive_plugin.ops.variable_topk.topk_encode`), and the step's ``sae_out`` is decoded
from the compact top-K; forward hooks on ``hook_sae_acts_pre``/``_post`` switch back to the dense
path. The prefix coefficients are exactly what ``decode`` uses: with
``rescale_acts_by_decoder_norm`` (SAELens's training default) the selection is made on
``hidden_pre·‖W_dec‖`` and decoding divides by ``‖W_dec‖``, so the loss does the same and its
gradient reaches the norms.

Inference (:class:`HierarchicalTopKSAE`, a SAELens ``TopKSAE``) encodes with ``cfg.k`` read at every
call, so any budget ``1 ≤ k' ≤ cfg.trained_k`` can be set after loading::

    sae = SAE.load_from_disk(path)      # plugin autoloaded with sae_lens
    sae.set_k(16)                       # or sae.cfg.k = 16; checked at the next encode
    sae = load_at_budget(path, k=16)    # the same at load time

The saved inference weights have the decoder norms folded in (like SAELens's TopK). A trained SAE
exports to a plain SAELens ``topk`` SAE at a chosen ``k'`` (:meth:`HierarchicalTopKSAE.to_topk_sae`,
:func:`export_topk`), loadable by SAELens without this package.

Training metrics (``TrainStepOutput.metrics`` → ``metrics/…`` in SAELens's log): for the budgets
``K/4, K/2, K``: ``mse_at_k{j}`` (summed over ``d``, mean over the batch) and
``explained_variance_at_k{j}`` (SAELens's definition); and ``mean_k``/``std_k`` (``K``, ``0``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import SAEMetadata, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import (
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from typing_extensions import override

from sae_adaptive_plugin.ops.hierarchical import prefix_reconstruction_errors
from sae_adaptive_plugin.ops.variable_topk import decode_topk, topk_encode
from sae_adaptive_plugin.provenance import (
    PROVIDER_METADATA_KEY,
    PROVIDER_VERSION_METADATA_KEY,
    stamp_provider,
)
from sae_adaptive_plugin.registration.hookspecs import Architecture
from sae_adaptive_plugin.saes.input_checks import (
    check_width,
    mark_not_finite,
    nan_where_not_finite,
)

NAME = "hierarchical_topk"

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


def metric_budgets(k_max: int) -> list[int]:
    """The budgets reported in training metrics: ``K/4, K/2, K`` (rounded down, ≥ 1, distinct)."""
    return sorted({max(1, k_max // 4), max(1, k_max // 2), k_max})


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


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
        super().__post_init__()
        if self.trained_k is None:
            self.trained_k = self.k
        if isinstance(self.trained_k, bool) or not isinstance(self.trained_k, int):
            raise ValueError(f"trained_k must be an int in [1, d_sae={self.d_sae}]")
        if not 1 <= self.trained_k <= self.d_sae:
            raise ValueError(f"trained_k={self.trained_k} must lie in [1, d_sae={self.d_sae}]")
        _check_budget(self.k, self.trained_k, self.d_sae)

    @override
    @classmethod
    def architecture(cls) -> str:
        return NAME


class HierarchicalTopKSAE(TopKSAE):
    """Inference HierarchicalTopK SAE: a SAELens ``TopKSAE`` whose budget ``cfg.k`` may change."""

    cfg: HierarchicalTopKSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: HierarchicalTopKSAEConfig, use_error_term: bool = False):
        stamp_provider(cfg)
        super().__init__(cfg, use_error_term)

    @property
    def trained_k(self) -> int:
        """The largest budget ``K`` the SAE was trained with."""
        assert self.cfg.trained_k is not None
        return self.cfg.trained_k

    def current_k(self) -> int:
        """``cfg.k``, checked against ``[1, trained_k]`` (raises ``ValueError`` otherwise)."""
        return _check_budget(self.cfg.k, self.trained_k, self.cfg.d_sae)

    def set_k(self, k: int) -> HierarchicalTopKSAE:
        """Set the inference budget (``1 ≤ k ≤ trained_k``); returns ``self``."""
        self.cfg.k = _check_budget(k, self.trained_k, self.cfg.d_sae)
        self.activation_fn.k = k
        return self

    @override
    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        check_width(self, self.reshape_fn_in(sae_in))
        return super().process_sae_in(sae_in)

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.activation_fn.k = self.current_k()
        return super().encode(x)

    def k_per_sample(self, x: torch.Tensor) -> torch.Tensor:
        """The budget used for each row of ``x`` (constant ``cfg.k``): long tensor
        ``x.shape[:-1]``; ``K_NOT_FINITE`` (−1) for a row holding NaN/Inf."""
        x_in = self.reshape_fn_in(x)
        check_width(self, x_in)
        k = torch.full(x_in.shape[:-1], self.current_k(), dtype=torch.long, device=x.device)
        return mark_not_finite(k, x_in)

    @torch.no_grad()
    def prefix_errors(self, x: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
        """``‖x − x̂_j‖²`` for every budget ``j = 1..trained_k`` at once: ``[N, trained_k]``.

        Column ``j−1`` equals the squared error of this SAE's forward pass at ``cfg.k = j``
        (``x`` flattened to ``[N, d_in]``).
        """
        return _prefix_errors(self, x, self.trained_k, chunk_size)

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


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class HierarchicalTopKTrainingSAEConfig(TopKTrainingSAEConfig):
    """Training config of a HierarchicalTopK SAE.

    Args:
        k: the largest budget ``K``; the loss averages the reconstruction errors of all prefixes
            ``1..K`` of the sorted top-``K``. Must lie in ``[1, d_sae]``.
        loss_chunk_size: rows whose ``K`` decoder rows are gathered at once by the loss (memory
            knob only; ``None`` = automatic, at most ``2**22`` gathered elements).
        Other fields: as SAELens's ``TopKTrainingSAEConfig`` (``aux_loss_coefficient``,
        ``rescale_acts_by_decoder_norm``, ``use_sparse_activations``, ``decoder_init_norm``, …).
        ``normalize_activations`` must be ``"none"`` or ``"expected_average_only_in"``.
    """

    loss_chunk_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise ValueError(f"k must be an int in [1, d_sae={self.d_sae}], got {self.k!r}")
        if not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k={self.k} must lie in [1, d_sae={self.d_sae}]")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be >= 1 or None, got {self.loss_chunk_size}")
        _check_normalization(self.normalize_activations)
        super().__post_init__()

    @property
    def trained_k(self) -> int:
        """The largest trained budget, written into the inference config as ``trained_k``."""
        return self.k

    @override
    @classmethod
    def architecture(cls) -> str:
        return NAME


class HierarchicalTopKTrainingSAE(TopKTrainingSAE):
    """SAELens ``TopKTrainingSAE`` trained with the HierarchicalTopK all-prefix loss."""

    cfg: HierarchicalTopKTrainingSAEConfig  # type: ignore[assignment]
    #: Encode through :func:`~sae_adaptive_plugin.ops.variable_topk.topk_encode` (sparse
    #: backward) and decode the training output from the compact top-K
    #: (:func:`~sae_adaptive_plugin.ops.variable_topk.decode_topk`), each unless a forward hook
    #: sits on ``hook_sae_acts_pre`` / ``hook_sae_acts_post``; False = the plain dense path.
    fused_encode: bool = True

    def __init__(self, cfg: HierarchicalTopKTrainingSAEConfig, use_error_term: bool = False):
        stamp_provider(cfg)
        super().__init__(cfg, use_error_term)

    @property
    def trained_k(self) -> int:
        return self.cfg.k

    @override
    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        check_width(self, self.reshape_fn_in(sae_in))
        return super().process_sae_in(sae_in)

    def _select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values, indices, hidden_pre)``: the sorted (descending) ReLU'd top-K of each row."""
        sae_in = self.process_sae_in(x)
        scale = self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
        if self.fused_encode and not self.hook_sae_acts_pre._forward_hooks:
            # one op: encoder, selection, and a backward over the selected latents only
            hidden_pre, top = topk_encode(
                sae_in, self.W_enc, self.b_enc, self.cfg.k, self.cfg.k, scale=scale
            )
            values = nan_where_not_finite(top.values, sae_in)  # NaN in, NaN out (as topk)
            return values, top.indices, self.hook_sae_acts_pre(hidden_pre)
        # a forward hook on hook_sae_acts_pre may change what is selected: select after it
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        if scale is not None:
            hidden_pre = hidden_pre * scale
        values, indices = hidden_pre.topk(self.cfg.k, dim=-1, sorted=True)
        return values.relu(), indices, hidden_pre

    def _decode_selection(
        self, feature_acts: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        """``decode(feature_acts)``, from the compact top-K unless ``hook_sae_acts_post`` has
        forward hooks (they may change ``feature_acts``; then the dense ``decode`` runs)."""
        if not self.fused_encode or self.hook_sae_acts_post._forward_hooks:
            return self.decode(feature_acts)
        if self.cfg.rescale_acts_by_decoder_norm:
            values = values / self.W_dec.norm(dim=-1)[indices]
        out = self.hook_sae_recons(decode_topk(values, indices, self.W_dec) + self.b_dec)
        out = self.run_time_activation_norm_fn_out(out)
        return self.reshape_fn_out(out, self.d_head)

    def _feature_acts(self, values: torch.Tensor, indices: torch.Tensor, like: torch.Tensor):
        acts = torch.zeros_like(like).scatter(-1, indices, values)
        if self.cfg.use_sparse_activations:
            acts = acts.to_sparse()
        return self.hook_sae_acts_post(acts)

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices, hidden_pre = self._select(x)
        return self._feature_acts(values, indices, hidden_pre), hidden_pre

    def prefix_errors_from_selection(
        self, sae_in: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        """``[N, K]`` prefix errors of the (flattened) rows, with gradients; what the loss uses."""
        x = sae_in.to(self.dtype).reshape(-1, self.cfg.d_in)
        values = values.reshape(-1, values.shape[-1])
        indices = indices.reshape(-1, indices.shape[-1])
        if self.cfg.rescale_acts_by_decoder_norm:
            values = values / self.W_dec.norm(dim=-1)[indices]
        return prefix_reconstruction_errors(
            x - self.b_dec, values, self.W_dec, indices, chunk_size=self.cfg.loss_chunk_size
        )

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        sae_in = step_input.sae_in
        values, indices, hidden_pre = self._select(sae_in)
        feature_acts = self._feature_acts(values, indices, hidden_pre)
        sae_out = self._decode_selection(feature_acts, values, indices)

        errors = self.prefix_errors_from_selection(sae_in, values, indices)  # [B, K]
        hierarchical_mse = errors.mean()
        aux_losses = self.calculate_aux_loss(
            step_input=step_input,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            sae_out=sae_out,
        )
        losses: dict[str, torch.Tensor] = {"hierarchical_mse_loss": hierarchical_mse, **aux_losses}
        total = hierarchical_mse
        for value in aux_losses.values():
            total = total + value

        with torch.no_grad():
            x = sae_in.to(errors.dtype).reshape(-1, self.cfg.d_in)
            total_variance = (x - x.mean(0)).pow(2).sum(-1).mean()
            metrics: dict[str, Any] = {
                "mean_k": float(self.cfg.k),
                "std_k": 0.0,
            }
            mean_errors = errors.detach().mean(0)
            for j in metric_budgets(self.cfg.k):
                metrics[f"mse_at_k{j}"] = mean_errors[j - 1]
                metrics[f"explained_variance_at_k{j}"] = 1 - mean_errors[j - 1] / total_variance

        return TrainStepOutput(
            sae_in=sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=total,
            losses=losses,
            metrics=metrics,
        )

    def k_per_sample(self, x: torch.Tensor) -> torch.Tensor:
        """The budget used for each row of ``x`` (constant ``K``): long tensor ``x.shape[:-1]``;
        ``K_NOT_FINITE`` (−1) for a row holding NaN/Inf."""
        x_in = self.reshape_fn_in(x)
        check_width(self, x_in)
        k = torch.full(x_in.shape[:-1], self.cfg.k, dtype=torch.long, device=x.device)
        return mark_not_finite(k, x_in)

    @torch.no_grad()
    def prefix_errors(self, x: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
        """``‖x − x̂_j‖²`` for every budget ``j = 1..K``: ``[N, K]`` (see the inference method)."""
        return _prefix_errors(self, x, self.cfg.k, chunk_size)


def _prefix_errors(
    sae: TopKSAE | TopKTrainingSAE, x: torch.Tensor, k_max: int, chunk_size: int | None
) -> torch.Tensor:
    _check_normalization(sae.cfg.normalize_activations)
    if sae.cfg.reshape_activations != "none":
        raise ValueError("prefix_errors supports reshape_activations='none' only")
    x = x.to(sae.dtype).reshape(-1, sae.cfg.d_in)
    sae_in = sae.process_sae_in(x)
    hidden_pre = sae_in @ sae.W_enc + sae.b_enc
    norms = sae.W_dec.norm(dim=-1)
    if sae.cfg.rescale_acts_by_decoder_norm:
        hidden_pre = hidden_pre * norms
    values, indices = hidden_pre.topk(k_max, dim=-1, sorted=True)
    values = values.relu()
    if sae.cfg.rescale_acts_by_decoder_norm:
        values = values / norms[indices]
    return prefix_reconstruction_errors(
        x - sae.b_dec, values, sae.W_dec, indices, chunk_size=chunk_size
    )


ARCHITECTURE = Architecture(
    name=NAME,
    sae_class=HierarchicalTopKSAE,
    sae_config_class=HierarchicalTopKSAEConfig,
    training_sae_class=HierarchicalTopKTrainingSAE,
    training_sae_config_class=HierarchicalTopKTrainingSAEConfig,
)
