"""The TopK family's shared base: SAELens TopK SAEs whose k may differ per row.

Each row ``x`` keeps its top ``k(x) ≤ k_max`` ReLU'd pre-activations::

    sae_in     = norm(x) − b_dec · apply_b_dec_to_input
    hidden_pre = (sae_in W_enc + b_enc) ⊙ s        s = ‖W_dec rows‖ (rescale_acts_by_decoder_norm), else 1
    selection  = sorted top-k_max of hidden_pre, first k(x) kept      (TopKResult, [..., k_max])
    x̂          = Σ_i values_i / s_i · W_dec[indices_i] + b_dec

An architecture gives ``k(x)`` (:meth:`TopKFamilyMixin.k_for_rows`) and its training extras.
Encoding is one fused op unless ``hook_sae_acts_pre`` has forward hooks; decoding reads the compact
selection unless ``hook_sae_acts_post`` has them (then SAELens's plain path runs, so hooks change
what the step trains on). Losses, every architecture and phase: ``mse_loss``,
``auxiliary_reconstruction_loss`` (AuxK) and named extras; the step's loss is their sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.sae import mse_loss as sae_lens_mse_loss
from sae_lens.saes.topk_sae import TopKSAE, TopKTrainingSAE

from sae_adaptive_plugin.distributed import gather_rows
from sae_adaptive_plugin.ops.dispatch import (
    accumulation_dtype,
    full_precision,
    host_check_is_free,
)
from sae_adaptive_plugin.ops.folding import fold_whitening_into_reader
from sae_adaptive_plugin.ops.hierarchical import (
    block_end_pass,
    errors_in_block,
    prefix_errors_and_residual,
    prefix_reconstruction_errors,
)
from sae_adaptive_plugin.ops.preacts_at import preacts_at, preacts_on_columns
from sae_adaptive_plugin.ops.variable_topk import (
    TopKResult,
    decode_topk,
    scatter_topk,
    topk_encode,
    variable_topk,
)
from sae_adaptive_plugin.provenance import stamp_provider
from sae_adaptive_plugin.saes.input_checks import (
    check_width,
    finite_rows,
    mark_not_finite,
    nan_where_not_finite,
)
from sae_adaptive_plugin.saes.rare_latents import firing_counts, rare_latents_of

#: Extra loss of the all-prefix objective ``mean_j e_j`` (``e_j = ‖x − x̂_j‖²``, prefixes
#: ``j = 1..K`` of the sorted selection), written as ``mse_loss`` (``e_K``) plus this excess.
PREFIX_EXCESS_LOSS = "prefix_excess_loss"

#: AuxK on the CPU decodes with matmuls over all dead columns once it chooses at least
#: ``1 / AUXK_DENSE_RATIO`` of them per row (else with bags of the chosen ones). 12: where the
#: two took the same step time at d_in 576, d_sae 4,608, B 1,024, one thread (docs/bench.md).
AUXK_DENSE_RATIO = 12


@dataclass
class StepEncoding:
    """What a training step decodes and SAELens reads: ``hidden_pre``, ``feature_acts`` (after
    ``hook_sae_acts_post``) and each row's k (an int, or SoftSAE's continuous ``k̂``)."""

    hidden_pre: torch.Tensor
    feature_acts: torch.Tensor
    k: torch.Tensor


@dataclass
class TopKEncoding(StepEncoding):
    """A batch through the top-k encoder. ``x_in``: the rows as read (reshaped, after
    ``hook_sae_input``); ``sae_in``: what the encoder reads; ``selection``: the compact top-k,
    whose values are the code's (after ``hook_sae_acts_post``); ``prefix_errors``,
    ``block_end_errors`` and ``prefix_residual`` (the last prefix's residual, no gradient):
    filled once by :meth:`TopKFamilyTrainingSAE.prefix_errors_of` or
    :meth:`~TopKFamilyTrainingSAE.block_end_errors_of`."""

    x_in: torch.Tensor
    sae_in: torch.Tensor
    selection: TopKResult
    prefix_errors: torch.Tensor | None = None
    block_end_errors: torch.Tensor | None = None
    prefix_residual: torch.Tensor | None = None


class InputReader(NamedTuple):
    """A second linear reader of the input, ``x_in @ weight + bias`` (AdaptiveK's probe) or
    ``sae_in @ weight + bias`` (``reads_sae_in``; SoftSAE's k-estimator): SAELens's folds of the
    input are folded into it too."""

    weight: torch.Tensor
    bias: torch.Tensor
    reads_sae_in: bool


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def refuse_deterministic_cuda_cumsum(device: torch.device, who: str) -> None:
    """Raise ``RuntimeError`` when ``who``'s prefix errors (a floating-point ``cumsum``) would run
    on CUDA under ``torch.use_deterministic_algorithms(True)``, where CUDA's ``cumsum`` raises;
    ``warn_only=True`` and the CPU are fine."""
    if not (_is_cuda(device) and torch.are_deterministic_algorithms_enabled()):
        return
    if torch.is_deterministic_algorithms_warn_only_enabled():
        return
    raise RuntimeError(
        f"{who} computes prefix reconstruction errors with a floating-point cumsum, which "
        "CUDA refuses under torch.use_deterministic_algorithms(True). Train with "
        "torch.use_deterministic_algorithms(False), or "
        "torch.use_deterministic_algorithms(True, warn_only=True), or on the CPU"
    )


def sparse_code(selection: TopKResult, d_sae: int) -> torch.Tensor:
    """The code ``[..., d_sae]`` of ``selection`` as a sparse COO tensor built from its indices
    and values (never dense). On the CPU, where reading the mask back is free, it stores the
    slots inside each row's k only (what a sum over it, e.g. SAELens's firing counts, then
    sorts); elsewhere every slot, those past a row's k with value 0, so its size does not
    depend on the data (no host read)."""
    lead = selection.values.shape[:-1]
    width = selection.values.shape[-1]
    values = selection.values.reshape(-1)
    columns = selection.indices.reshape(-1)
    if host_check_is_free(selection.mask):
        slots = selection.mask.reshape(-1).nonzero().squeeze(-1)
        rows = torch.div(slots, max(width, 1), rounding_mode="floor")
        values, columns = values[slots], columns[slots]
    else:
        rows = torch.arange(math.prod(lead), device=selection.indices.device)
        rows = rows.repeat_interleave(width, output_size=rows.numel() * width)
    coords = [*torch.unravel_index(rows, tuple(lead)), columns]
    return torch.sparse_coo_tensor(
        torch.stack(coords), values, (*lead, d_sae), check_invariants=False
    )


def prefix_excess(errors: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_j w_j (e_j − e_K)`` of prefix errors ``[N, K]`` averaged over rows: what the shorter
    prefixes add to ``e_K`` in the all-prefix objective. ``weights`` (``[K]``, summing to 1):
    ``None`` is the uniform ``w_j = 1/K``."""
    if weights is None:
        return errors.mean() - errors[:, -1].mean()
    return (errors.mean(0) * weights.to(errors.dtype)).sum() - errors[:, -1].mean()


@torch.no_grad()
def start_b_dec_at_batch_mean(sae: Any, sae_in: torch.Tensor) -> None:
    """``b_dec_init_method = "mean"``, run at the first training step: a training SAE's ``b_dec``
    (SAELens's or ours) set to the mean of the batch as its encoder reads it (the global batch
    under data parallelism), so the encoder starts on centred inputs. A ``b_dec`` that is not
    all zeros (a loaded or already trained SAE) is kept; a non-finite batch mean is refused."""
    if bool(sae.b_dec.any()):
        return
    # with b_dec = 0, process_sae_in is the input as the encoder reads it (normalised, reshaped)
    rows = gather_rows(sae.process_sae_in(sae_in).reshape(-1, sae.cfg.d_in))
    mean = rows.float().mean(dim=0)
    if not bool(torch.isfinite(mean).all()):
        raise ValueError(
            "b_dec_init_method='mean': the first training batch has non-finite values "
            "(NaN or inf), so its mean cannot start b_dec"
        )
    sae.b_dec.copy_(mean.to(sae.b_dec.dtype))


def _without_parallel_component(W_dec: torch.Tensor):
    """A gradient hook removing from each row of ``∂L/∂W_dec`` its component along that row."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        rows = W_dec.detach()
        unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).eps)
        return grad - (grad * unit).sum(-1, keepdim=True) * unit

    return hook


@torch.no_grad()
def keep_decoder_unit(sae: Any) -> None:
    """``decoder_unit_norm``, run before each training step (so after each optimizer step): a
    training SAE's decoder rows (SAELens's or ours) set to unit norm, and the part of each row's
    gradient parallel to the row removed (a gradient hook on the current ``W_dec``): the update
    moves a row along its unit sphere."""
    W_dec = sae.W_dec
    W_dec.div_(W_dec.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(W_dec.dtype).eps))
    if not W_dec._backward_hooks:  # a new tensor (loaded, deep-copied) has none yet
        W_dec.register_hook(_without_parallel_component(W_dec))


class TopKFamilyMixin:
    """Input reading, hook-aware per-row top-k encode and compact decode (inference and
    training classes alike)."""

    cfg: Any
    W_enc: torch.nn.Parameter
    b_enc: torch.nn.Parameter
    W_dec: torch.nn.Parameter
    b_dec: torch.nn.Parameter
    hook_sae_acts_pre: Any
    hook_sae_acts_post: Any
    #: False: always SAELens's plain path (matmul + ``variable_topk``, dense decode) — the reference.
    fused_encode: bool = True

    @property
    def k_max(self) -> int:
        """Width of the selection: the most latents any row keeps."""
        return self.cfg.k_max

    def k_for_rows(self, x_in: torch.Tensor, sae_in: torch.Tensor) -> torch.Tensor:
        """Each row's k (long, ``x_in.shape[:-1]``, in ``[1, k_max]``): the architecture's rule."""
        raise NotImplementedError

    def input_reader(self) -> InputReader | None:
        """The architecture's second reader of the input, if any."""
        return None

    # -- input --------------------------------------------------------------------------------

    def read_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the SAE's dtype, reshaped (hook_z), width-checked, through ``hook_sae_input``."""
        x_in = self.reshape_fn_in(x.to(self.dtype))  # type: ignore[attr-defined]
        check_width(self, x_in)  # type: ignore[arg-type]
        return self.hook_sae_input(x_in)  # type: ignore[attr-defined]

    def center_input(self, x_in: torch.Tensor) -> torch.Tensor:
        """What the encoder reads: ``norm(x_in) − b_dec · apply_b_dec_to_input``."""
        normalised = self.run_time_activation_norm_fn_in(x_in)  # type: ignore[attr-defined]
        return normalised - self.b_dec * self.cfg.apply_b_dec_to_input

    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        return self.center_input(self.read_input(sae_in))

    def selection_k(self, x_in: torch.Tensor, sae_in: torch.Tensor) -> torch.Tensor:
        """:meth:`k_for_rows`, with ``k_max`` for a row holding NaN/Inf (its output is NaN)."""
        k = self.k_for_rows(x_in, sae_in)
        return torch.where(finite_rows(x_in), k, torch.full_like(k, self.k_max))

    @torch.no_grad()
    def k_per_sample(self, x: torch.Tensor) -> torch.Tensor:
        """The number of latents each row of ``x`` keeps: long ``x.shape[:-1]`` (after hook_z
        merging); ``K_NOT_FINITE`` (−1) for a row holding NaN/Inf."""
        x_in = self.read_input(x)
        return mark_not_finite(self.selection_k(x_in, self.center_input(x_in)), x_in)

    # -- encode ---------------------------------------------------------------------------------

    def decoder_norms(self) -> torch.Tensor:
        """``‖W_dec‖`` per latent ``[d_sae]``, differentiable: during a training step one tensor
        shared by all its readers (one norm and one norm backward per step), else fresh."""
        shared = getattr(self, "_step_decoder_norms", None)
        return shared if shared is not None else self.W_dec.norm(dim=-1)

    def plain_hidden_pre(self, sae_in: torch.Tensor) -> torch.Tensor:
        """SAELens's pre-activations: ``hook_sae_acts_pre(sae_in W_enc + b_enc)``, rescaled."""
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        if self.cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * self.decoder_norms()
        return hidden_pre

    @property
    def encodes_fused(self) -> bool:
        """Whether encoding is the fused op: unless ``hook_sae_acts_pre`` has forward hooks,
        which may change what is selected (then the plain path selects after them)."""
        return self.fused_encode and not self.hook_sae_acts_pre._forward_hooks

    def select_top_k(
        self, sae_in: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, TopKResult]:
        """``(hidden_pre, selection)``: one fused op when :attr:`encodes_fused`, else SAELens's
        plain path (matmul, hooks, then the selection)."""
        if self.encodes_fused:
            scale = self.decoder_norms() if self.cfg.rescale_acts_by_decoder_norm else None
            hidden_pre, selection = topk_encode(
                sae_in, self.W_enc, self.b_enc, k, self.k_max, scale=scale
            )
            return self.hook_sae_acts_pre(hidden_pre), selection
        hidden_pre = self.plain_hidden_pre(sae_in)
        return hidden_pre, variable_topk(hidden_pre, k, self.k_max)

    def sparse_code_in_step(self) -> bool:
        """Whether a training step hands SAELens the code as a COO tensor
        (``sparse_training_code``; ``None``, the default: on the CPU only, since SAELens's
        trainer sums the COO code, and a sparse sum coalesces, whose output size a GPU's host
        would wait for). Only on the fused path with no forward hooks on
        ``hook_sae_acts_pre``/``hook_sae_acts_post``, where the step reads the compact selection
        alone and a hook never sees a COO code it did not ask for."""
        wanted = getattr(self.cfg, "sparse_training_code", False)
        if wanted is None:
            wanted = host_check_is_free(self.W_enc)
        return bool(wanted) and self.encodes_fused and not self.hook_sae_acts_post._forward_hooks

    def encode_selection(self, x: torch.Tensor, sparse: bool = False) -> TopKEncoding:
        """``x`` through the encoder: each row's top-k, as a code (dense, or COO with ``sparse``
        or SAELens's ``use_sparse_activations``) and a compact selection."""
        x_in = self.read_input(x)
        sae_in = self.center_input(x_in)
        k = self.selection_k(x_in, sae_in)
        hidden_pre, selection = self.select_top_k(sae_in, k)
        # a row holding NaN/Inf encodes to NaN (as SAELens's topk), never to a clean code
        selection = selection._replace(values=nan_where_not_finite(selection.values, x_in))
        if sparse or getattr(self.cfg, "use_sparse_activations", False):
            code = sparse_code(selection, self.cfg.d_sae)
        else:
            code = scatter_topk(selection, self.cfg.d_sae)
        feature_acts = self.hook_sae_acts_post(code)
        if self.hook_sae_acts_post._forward_hooks:  # the hooks may have changed the code
            hooked = feature_acts.to_dense().gather(-1, selection.indices)
            selection = selection._replace(values=torch.where(selection.mask, hooked, 0))
        return TopKEncoding(
            hidden_pre=hidden_pre,
            feature_acts=feature_acts,
            k=k,
            x_in=x_in,
            sae_in=sae_in,
            selection=selection,
        )

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoding = self.encode_selection(x)
        return encoding.feature_acts, encoding.hidden_pre

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_selection(x).feature_acts

    # -- decode ---------------------------------------------------------------------------------

    def decoder_coefficients(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """What multiplies the selected decoder rows: ``values / ‖W_dec[indices]‖`` when
        rescaling, else ``values``."""
        if self.cfg.rescale_acts_by_decoder_norm:
            return values / self.decoder_norms()[indices]
        return values

    def decode_selection(self, encoding: TopKEncoding) -> torch.Tensor:
        """``decode(feature_acts)``, from the compact selection unless ``hook_sae_acts_post``
        has forward hooks (a hook may have activated latents outside the selection)."""
        if not self.fused_encode or self.hook_sae_acts_post._forward_hooks:
            return self.decode(encoding.feature_acts)  # type: ignore[attr-defined]
        values, indices, mask = encoding.selection
        return self.decode_compact(values, indices, mask)

    def decode_compact(
        self, values: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """SAELens's ``decode`` of the code that holds ``values`` at ``indices`` (``[..., m]``)
        and 0 elsewhere, from those decoder rows alone: ``decode_topk``, ``b_dec``,
        ``hook_sae_recons``, the output normalisation and reshape. ``mask``: the slots in use."""
        out = decode_topk(
            self.decoder_coefficients(values, indices), indices, self.W_dec, mask=mask
        )
        out = self.hook_sae_recons(out + self.b_dec)  # type: ignore[attr-defined]
        out = self.run_time_activation_norm_fn_out(out)  # type: ignore[attr-defined]
        return self.reshape_fn_out(out, self.d_head)  # type: ignore[attr-defined]

    def _prefix_operands(
        self, x_in: torch.Tensor, selection: TopKResult
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x − b_dec, coefficients, indices)`` of the sorted selection, rows flattened, in the
        SAE's (normalised) input space: what the prefix-error ops take."""
        x = self.run_time_activation_norm_fn_in(x_in).reshape(-1, self.cfg.d_in)  # type: ignore[attr-defined]
        width = selection.values.shape[-1]
        values = selection.values.reshape(-1, width)
        indices = selection.indices.reshape(-1, width)
        return x - self.b_dec, self.decoder_coefficients(values, indices), indices

    def prefix_errors_from_selection(
        self, x_in: torch.Tensor, selection: TopKResult, chunk_size: int | None = None
    ) -> torch.Tensor:
        """``‖x − x̂_j‖²`` of every prefix ``j`` of the sorted selection, ``[N, width]``, in the
        SAE's (normalised) input space; differentiable (exact ``B×K×K`` form)."""
        residual0, coefficients, indices = self._prefix_operands(x_in, selection)
        return prefix_reconstruction_errors(
            residual0, coefficients, self.W_dec, indices, chunk_size=chunk_size
        )

    # -- folds of the input (SAELens's), followed by the second reader ---------------------------

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)  # type: ignore[misc]
        reader = self.input_reader()
        if reader is not None:  # it read s·x; after the fold it reads x: w ← s·w
            reader.weight.mul_(scaling_factor)

    @torch.no_grad()
    def fold_activation_whitening(
        self, mean: torch.Tensor, whitening_matrix: torch.Tensor, unwhitening_matrix: torch.Tensor
    ) -> None:
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)  # type: ignore[misc]
        reader = self.input_reader()
        if reader is not None:  # it read z = (x − mean) M: wᵀz + b = (M w)ᵀx + (b − meanᵀ M w)
            # a reader of x − b_dec with apply_b_dec_to_input: the folded b_dec removes the mean
            centred = reader.reads_sae_in and self.cfg.apply_b_dec_to_input
            fold_whitening_into_reader(
                reader.weight, reader.bias, mean, whitening_matrix, shift_bias=not centred
            )


class TopKFamilySAE(TopKFamilyMixin, TopKSAE):
    """Inference base: SAELens's ``TopKSAE`` with the family's encode and provenance stamp."""

    def __init__(self, cfg: Any, use_error_term: bool = False):
        stamp_provider(cfg)
        super().__init__(cfg, use_error_term)


class TopKFamilyTrainingSAE(TopKFamilyMixin, TopKTrainingSAE):
    """Training base: SAELens's TopK training step (``mse_loss``, AuxK) on the family's
    encode and compact decode, extended by the architecture's hooks below."""

    def __init__(self, cfg: Any, use_error_term: bool = False):
        stamp_provider(cfg)
        super().__init__(cfg, use_error_term)

    # -- what an architecture may add -----------------------------------------------------------

    def prepare_training_step(self, step_input: TrainStepInput) -> None:
        """Run before the step's forward pass (e.g. a phase switch). Default: nothing."""

    def training_encoding(self, step_input: TrainStepInput) -> StepEncoding:
        """The step's encoding. Default: :meth:`encode_selection` of the batch, its code COO
        where :meth:`sparse_code_in_step`."""
        return self.encode_selection(step_input.sae_in, sparse=self.sparse_code_in_step())

    def training_decode(self, encoding: StepEncoding) -> torch.Tensor:
        """The step's ``sae_out``. Default: :meth:`decode_selection`."""
        assert isinstance(encoding, TopKEncoding)
        return self.decode_selection(encoding)

    def training_reconstruction(
        self, step_input: TrainStepInput, encoding: StepEncoding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sae_out, mse_loss)`` of the step. Default: :meth:`training_decode` and SAELens's
        ``mse_loss_fn`` summed over ``d``, averaged over rows."""
        sae_out = self.training_decode(encoding)
        return sae_out, self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()

    def reconstructs_from_prefixes(self) -> bool:
        """Whether the step's output and MSE can come from a prefix pass (the decode would give
        the same): the fused path, no hooks on the code or the reconstruction, rows not
        reshaped (hook_z), SAELens's plain MSE."""
        return (
            self.encodes_fused
            and not self.hook_sae_acts_post._forward_hooks  # type: ignore[attr-defined]
            and not self.hook_sae_recons._forward_hooks  # type: ignore[attr-defined]
            and self.cfg.reshape_activations == "none"
            and self.mse_loss_fn is sae_lens_mse_loss  # type: ignore[attr-defined]
        )

    def reconstruction_from_prefixes(
        self, step_input: TrainStepInput, encoding: TopKEncoding, errors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sae_out, mse_loss)`` from a prefix pass already run on ``encoding``: ``mse_loss``
        is the last column of its ``errors`` (the error at the whole selection), ``sae_out =
        x − residual`` (no gradient; the loss carries it). Only where
        :meth:`reconstructs_from_prefixes`."""
        residual = encoding.prefix_residual
        assert residual is not None
        sae_in = step_input.sae_in
        sae_out = sae_in.reshape(-1, self.cfg.d_in).to(residual.dtype) - residual
        return sae_out.to(sae_in.dtype).reshape(sae_in.shape), errors[:, -1].mean()

    def extra_losses(
        self, step_input: TrainStepInput, encoding: StepEncoding, mse_loss: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Named losses added to the step's loss (``mse_loss``: the step's reconstruction loss,
        for terms scaled to it); the same names in every phase (zero when a phase has no such
        term). Default: none."""
        return {}

    def record_training_step(self, step_input: TrainStepInput, encoding: StepEncoding) -> None:
        """Statistics gathered from the step after its losses. Default: nothing."""

    def extra_metrics(self, step_input: TrainStepInput, encoding: StepEncoding) -> dict[str, Any]:
        """Metrics beyond ``mean_k``/``std_k``. Default: none."""
        return {}

    # -- the step --------------------------------------------------------------------------------

    @property
    def prefix_loss_chunk_size(self) -> int | None:
        """Rows gathered at once by :meth:`prefix_errors_of` (memory only; None = automatic)."""
        return None

    def block_end_errors_of(self, encoding: TopKEncoding) -> torch.Tensor:
        """The prefix errors at the ends of the blocks of 8 latents of the step's sorted
        selection, ``[N, ceil(width / 8)]``, differentiable, computed once per step
        (:func:`~sae_adaptive_plugin.ops.hierarchical.block_end_pass`) with the last residual
        into ``encoding``."""
        if encoding.block_end_errors is None:
            residual0, coefficients, indices = self._prefix_operands(
                encoding.x_in, encoding.selection
            )
            encoding.block_end_errors, encoding.prefix_residual = block_end_pass(
                residual0,
                coefficients,
                self.W_dec,
                indices,
                chunk_size=self.prefix_loss_chunk_size,
            )
        return encoding.block_end_errors

    def errors_in_block_of(self, encoding: TopKEncoding, block: torch.Tensor) -> torch.Tensor:
        """The prefix errors inside block ``block[r]`` of 8 latents of each row ``r`` of the
        step's sorted selection, ``[N, min(8, width)]``, no gradient
        (:func:`~sae_adaptive_plugin.ops.hierarchical.errors_in_block`)."""
        residual0, coefficients, indices = self._prefix_operands(encoding.x_in, encoding.selection)
        return errors_in_block(
            residual0.detach(),
            coefficients.detach(),
            self.W_dec.detach(),
            indices,
            block,
            chunk_size=self.prefix_loss_chunk_size,
        )

    def prefix_errors_of(self, encoding: TopKEncoding) -> torch.Tensor:
        """:meth:`prefix_errors_from_selection` of the step's encoding, computed once per step
        together with the last prefix's residual (``encoding.prefix_residual``)."""
        if encoding.prefix_errors is None:
            refuse_deterministic_cuda_cumsum(encoding.x_in.device, self.cfg.architecture())
            residual0, coefficients, indices = self._prefix_operands(
                encoding.x_in, encoding.selection
            )
            encoding.prefix_errors, encoding.prefix_residual = prefix_errors_and_residual(
                residual0,
                coefficients,
                self.W_dec,
                indices,
                chunk_size=self.prefix_loss_chunk_size,
            )
        return encoding.prefix_errors

    def auxk_losses(
        self, step_input: TrainStepInput, encoding: StepEncoding, sae_out: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """SAELens's AuxK loss (``auxiliary_reconstruction_loss``). On the fused encode path its
        gradient enters the encoder at each row's ``k_aux`` chosen dead latents only
        (:func:`preacts_at`) and the decode gathers those rows, so the step's backward stays
        sparse; otherwise (hooks, the plain path) SAELens computes it from ``hidden_pre``."""
        dead = step_input.dead_neuron_mask
        if not (isinstance(encoding, TopKEncoding) and self.encodes_fused):
            return self.calculate_aux_loss(
                step_input=step_input,
                feature_acts=encoding.feature_acts,
                hidden_pre=encoding.hidden_pre,
                sae_out=sae_out,
            )
        # SAELens's k_aux: half the input's last dimension (d_head with hook_z), scaled below
        k_aux_full = step_input.sae_in.shape[-1] // 2
        k_aux = min(k_aux_full, self.cfg.d_sae)
        if dead is None or k_aux == 0:
            return {"auxiliary_reconstruction_loss": sae_out.new_tensor(0.0)}
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            # SAELens refuses the same: the residual is in the input space, the code's is not
            return self.calculate_aux_loss(
                step_input=step_input,
                feature_acts=encoding.feature_acts,
                hidden_pre=encoding.hidden_pre,
                sae_out=sae_out,
            )
        residual = (step_input.sae_in - sae_out).detach()
        hidden_pre = encoding.hidden_pre.detach().reshape(-1, self.cfg.d_sae)
        scale = self.decoder_norms() if self.cfg.rescale_acts_by_decoder_norm else None
        sae_in = encoding.sae_in.reshape(-1, self.cfg.d_in)
        if host_check_is_free(dead):
            # on the CPU reading the dead latents back is free: none, no work; else the top-k
            # among the dead columns only (SAELens's selection of min(k_aux, #dead) latents)
            dead_ids = dead.nonzero().squeeze(-1)
            if dead_ids.numel() == 0:
                return {"auxiliary_reconstruction_loss": sae_out.new_tensor(0.0)}
            dead_pre = hidden_pre.index_select(-1, dead_ids)
            top = dead_pre.topk(min(k_aux, dead_ids.numel()), dim=-1, sorted=False)
            if top.indices.shape[-1] * AUXK_DENSE_RATIO >= dead_ids.numel():
                # a dense share of the dead columns is chosen: matmuls over them beat the bags
                chosen = torch.zeros_like(dead_pre, dtype=torch.bool).scatter_(
                    -1, top.indices, True
                )
                values = preacts_on_columns(
                    sae_in, self.W_enc, self.b_enc, dead_ids, dead_pre, scale
                )
                coefficients = self.decoder_coefficients(torch.where(chosen, values, 0), dead_ids)
                acc = accumulation_dtype(coefficients.dtype, self.W_dec.dtype)
                with full_precision(coefficients.device.type):
                    recons = coefficients.to(acc) @ self.W_dec.index_select(0, dead_ids).to(acc)
                return self._auxk_loss(recons, residual, encoding, dead, k_aux_full)
            indices, chosen_values, filled = dead_ids[top.indices], top.values, None
        else:
            # on a GPU without reading the number back (no host sync): the k_aux largest
            # pre-activations of dead latents; slots past the last dead latent (−inf) stay empty
            minus_inf = torch.tensor(-torch.inf, dtype=hidden_pre.dtype, device=hidden_pre.device)
            top = torch.where(dead, hidden_pre, minus_inf).topk(k_aux, dim=-1, sorted=False)
            filled = top.values > minus_inf
            indices, chosen_values = top.indices, torch.where(filled, top.values, 0)
        values = preacts_at(sae_in, self.W_enc, self.b_enc, indices, chosen_values, scale)
        if filled is not None:
            values = torch.where(filled, values, 0)
        coefficients = self.decoder_coefficients(values, indices)
        recons = decode_topk(coefficients, indices, self.W_dec)
        return self._auxk_loss(recons, residual, encoding, dead, k_aux_full)

    def _auxk_loss(
        self,
        recons: torch.Tensor,
        residual: torch.Tensor,
        encoding: StepEncoding,
        dead: torch.Tensor,
        k_aux_full: int,
    ) -> dict[str, torch.Tensor]:
        """SAELens's AuxK loss of the dead latents' reconstruction ``[N, d_in]`` of ``residual``."""
        recons = recons.reshape(*encoding.hidden_pre.shape[:-1], self.cfg.d_in)
        recons = self.reshape_fn_out(recons, self.d_head)  # type: ignore[attr-defined]
        loss = (recons - residual).pow(2).sum(dim=-1).mean()
        weight = self.cfg.aux_loss_coefficient * (dead.sum() / k_aux_full).clamp(max=1.0)
        return {"auxiliary_reconstruction_loss": weight * loss}

    def firings(self, encoding: StepEncoding) -> tuple[torch.Tensor, int]:
        """``(counts, rows)``: how many of the step's rows each latent fired on, from the
        compact selection where it is the code (else from ``feature_acts``, as SAELens's
        trainer counts)."""
        rows = math.prod(encoding.feature_acts.shape[:-1])
        if not isinstance(encoding, TopKEncoding) or self.hook_sae_acts_post._forward_hooks:
            return firing_counts(encoding.feature_acts), rows
        values, indices, _ = encoding.selection  # values are 0 outside each row's k
        fired = (values.detach() > 0).reshape(-1).float()
        counts = fired.new_zeros(self.cfg.d_sae).index_add_(0, indices.reshape(-1), fired)
        return counts, rows

    @property
    def starts_b_dec_at_mean(self) -> bool:
        """``b_dec_init_method = "mean"`` (see :func:`start_b_dec_at_batch_mean`)."""
        return getattr(self.cfg, "b_dec_init_method", "zeros") == "mean"

    @property
    def keeps_unit_decoder(self) -> bool:
        """``decoder_unit_norm``: sparsify's decoder handling (see :func:`keep_decoder_unit`)."""
        return bool(getattr(self.cfg, "decoder_unit_norm", False))

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if step_input.n_training_steps == 0 and self.starts_b_dec_at_mean:
            start_b_dec_at_batch_mean(self, step_input.sae_in)
        if self.keeps_unit_decoder:
            keep_decoder_unit(self)
        rescale = self.cfg.rescale_acts_by_decoder_norm
        self._step_decoder_norms = self.W_dec.norm(dim=-1) if rescale else None
        try:
            return self._training_step(step_input)
        finally:
            self._step_decoder_norms = None

    def _training_step(self, step_input: TrainStepInput) -> TrainStepOutput:
        self.prepare_training_step(step_input)
        rare = rare_latents_of(self)  # auxk_rare_tokens: rare latents join the dead mask
        if rare is not None:
            step_input = rare.step_input(step_input)
        encoding = self.training_encoding(step_input)
        sae_out, mse_loss = self.training_reconstruction(step_input, encoding)
        losses = {"mse_loss": mse_loss}
        losses.update(self.auxk_losses(step_input, encoding, sae_out))
        losses.update(self.extra_losses(step_input, encoding, mse_loss))
        self.record_training_step(step_input, encoding)
        if rare is not None:
            rare.record(*self.firings(encoding))
        k = encoding.k.detach().float()
        metrics = {"mean_k": k.mean(), "std_k": k.std(correction=0)}
        metrics.update(self.extra_metrics(step_input, encoding))
        return TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=encoding.feature_acts,
            hidden_pre=encoding.hidden_pre,
            loss=sum(losses.values(), torch.zeros((), device=sae_out.device)),
            losses=losses,
            metrics=metrics,
        )
