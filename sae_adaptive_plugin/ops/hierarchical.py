"""HierarchicalTopK all-prefix reconstruction errors and loss (docs/METHODS.md §1), without a B×K×d tensor.

With ``e₀ = x − b_dec``, values ``a_1 ≥ … ≥ a_K`` and decoder rows ``D_i = W_dec[idx_i]``, prefix
``j`` has residual ``P_j = e₀ − Σ_{i≤j} a_i D_i`` and error ``‖P_j‖²``. For a chunk of rows the
terms ``a_i D_i`` (or their sums over blocks of latents) are bags of one ``embedding_bag`` over the
decoder, laid out prefix-major, and ``P_j`` follows by one subtraction per prefix on contiguous
``[chunk, d]`` slices; the backward runs the same pass again (peak extra memory
``O(chunk·K·d)``) with ``gP_j = Σ_{j' ≥ j} 2 g_j' P_j'``, ``∂/∂a_i = −⟨gP_i, D_i⟩`` (the
``embedding_bag``'s own per-weight gradient) and ``∂/∂D_i = −a_i gP_i`` (one sparse product on
the CPU). :func:`prefix_reconstruction_errors` (``[B, K]``, every prefix),
:func:`block_end_errors` (``[B, ⌈K/8⌉]``, the ends of blocks of 8) and :func:`hierarchical_loss`
(the training loss) take 2-D ``residual0 [B, d]`` and ``values [B, K]`` in prefix order; gradients
reach ``residual0``, ``values`` and ``W_dec``, never ``indices``. :func:`errors_in_block` gives the
errors inside one block per row (no gradient). Everything runs in at least float32 with autocast
off (docs/METHODS.md, "Precision, autocast and devices"). The ``*_naive`` functions are the
cumulative-sum references (tests only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sae_adaptive_plugin.ops.dispatch import (
    accumulation_dtype,
    autocast_off,
    block_rows,
    full_precision,
    host_check_is_free,
)

#: Upper bound on the number of elements of one chunk's residuals ``[K, chunk, d]`` (CPU).
DEFAULT_GATHER_ELEMENTS = 1 << 22
#: Latents per block of :func:`block_end_errors` and :func:`errors_in_block`.
PREFIX_BLOCK = 8


def _chunk_rows(n_rows: int, k: int, d: int, chunk_size: int | None, device_type: str) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (or None for automatic), got {chunk_size}")
        return chunk_size
    return min(max(n_rows, 1), block_rows(n_rows, k * d, device_type, DEFAULT_GATHER_ELEMENTS))


def _check_inputs(residual0: torch.Tensor, values: torch.Tensor) -> None:
    if residual0.ndim != 2:
        raise ValueError(f"residual0 must be [B, d], got shape {tuple(residual0.shape)}")
    if values.ndim != 2 or values.shape[0] != residual0.shape[0]:
        raise ValueError(
            f"values must be [B, K] with B={residual0.shape[0]} (rows of residual0), "
            f"got shape {tuple(values.shape)}"
        )
    if values.shape[1] < 1:
        raise ValueError("values must have K >= 1 columns")


def _check_decoder(
    residual0: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor, indices: torch.Tensor | None
) -> None:
    B, K = values.shape
    d = residual0.shape[1]
    if indices is None:
        if W_dec.shape != (B, K, d):
            raise ValueError(
                "without indices, the third argument must be the gathered decoder rows "
                f"[B, K, d] = {(B, K, d)}, got shape {tuple(W_dec.shape)}"
            )
        return
    if W_dec.ndim != 2 or W_dec.shape[1] != d:
        raise ValueError(f"W_dec must be [d_sae, d={d}], got shape {tuple(W_dec.shape)}")
    if indices.shape != (B, K):
        raise ValueError(f"indices must be [B, K] = {(B, K)}, got shape {tuple(indices.shape)}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got dtype {indices.dtype}")
    if not W_dec.dtype.is_floating_point:
        raise ValueError(f"W_dec must be a floating-point tensor, got dtype {W_dec.dtype}")


def _prefix_ranks(K: int, device: torch.device) -> torch.Tensor:
    """The prefix rank of each extended slot ``[D_1 … D_K, e₀]``: ``1..K``, and ``0`` for the
    residual, which every prefix holds."""
    rank = torch.arange(1, K + 2, device=device)
    rank[K] = 0
    return rank


def _mass_weights(K: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``Ω [K, K+1]``: how slot ``j`` pairs when prefix ``j`` is added — 1 with itself, 2 with
    each lower-ranked slot (the residual included), 0 with the later ones."""
    rank = _prefix_ranks(K, device)
    weights = (rank[None, :] < rank[:K, None]).to(dtype) * 2.0
    weights[:, :K] += torch.eye(K, dtype=dtype, device=device)
    return weights


def _signed(values: torch.Tensor) -> torch.Tensor:
    """``ã = [a, −1]`` ``[B, K+1]``: the coefficients of ``[D_1 … D_K, e₀]`` in ``x̂_j − e₀``."""
    return torch.cat([values, values.new_full((values.shape[0], 1), -1.0)], dim=1)


def _errors_from_gram(gram: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Prefix errors ``[B, K]`` from the Gram matrix ``[B, K+1, K+1]`` of ``[D_1 … D_K, e₀]``:
    ``err_j = ‖e₀‖² + Σ_{i≤j} a_i Σ_m Ω_im G_im ã_m`` (plain autograd ops)."""
    K = values.shape[1]
    weighted = gram[:, :K, :] * _mass_weights(K, gram.dtype, gram.device)
    mass = values * torch.bmm(weighted, _signed(values).unsqueeze(-1)).squeeze(-1)
    return gram[:, K, K].unsqueeze(-1) + torch.cumsum(mass, dim=-1)


def _padded(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t [B, K]`` with zero columns appended up to ``width``."""
    if t.shape[1] == width:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1])], dim=1)


def _block_major(t: torch.Tensor, block: int, n_blocks: int) -> torch.Tensor:
    """``t [n, K]`` zero-padded to ``n_blocks · block`` columns and laid out block-major,
    ``[n_blocks · n, block]``: bag ``b · n + r`` holds row ``r``'s block ``b``."""
    n = t.shape[0]
    padded = _padded(t, n_blocks * block).view(n, n_blocks, block)
    return padded.transpose(0, 1).reshape(n_blocks * n, block)


def _residuals_after_bags(
    residual0: torch.Tensor, sums: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``P_{b+1} = e₀ − Σ_{b' ≤ b} S_{b'}`` ``[n_blocks, n, d]`` into ``out``, from the block
    sums ``sums [n_blocks, n, d]`` (one contiguous subtraction per block)."""
    torch.sub(residual0, sums[0], out=out[0])
    for b in range(1, sums.shape[0]):
        torch.sub(out[b - 1], sums[b], out=out[b])
    return out


def _chunk_residuals(
    residual0: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    block: int,
    scratch: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(after, bags, coefficients)`` of a chunk of rows: ``P_{b+1}`` ``[n_blocks, n, d]``
    (:func:`_residuals_after_bags`, in ``scratch``) and the block-major bags it summed."""
    n, K = indices.shape
    n_blocks, d = -(-K // block), weight.shape[1]
    bags = _block_major(indices, block, n_blocks)
    coefficients = _block_major(values, block, n_blocks)
    sums = _bag_sums(weight, bags, coefficients).view(n_blocks, n, d)
    after = _residuals_after_bags(residual0, sums, scratch[: n_blocks * n * d].view(n_blocks, n, d))
    return after, bags, coefficients


def _bag_sums(weight: torch.Tensor, bags: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``Σ_i coefficients[m, i] · weight[bags[m, i]]`` ``[M, d]`` for every bag ``m``, without
    gathering the rows (``embedding_bag``)."""
    return F.embedding_bag(bags, weight, per_sample_weights=coefficients, mode="sum")


def _bag_dots(g: torch.Tensor, weight: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
    """``⟨g[m], weight[bags[m, i]]⟩`` ``[M, block]`` for every bag slot, without gathering the
    rows: the gradient of :func:`_bag_sums` with respect to its coefficients, by the op
    ``embedding_bag``'s own backward uses."""
    M, block = bags.shape
    bag_of_slot = torch.arange(M, device=bags.device).repeat_interleave(block)
    offsets = torch.arange(0, M * block, block, device=bags.device)
    dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        g, weight, bags.reshape(-1), offsets, bag_of_slot, 0, -1
    )
    return dots.view(M, block)


class _ResidualErrors(torch.autograd.Function):
    """``‖P_{b+1}‖²`` ``[B, n_blocks]``: the error after each block of ``block`` prefixes (the
    last block ends at ``K``; ``block = 1``: every prefix), from ``P_{b+1} = e₀ − Σ_{i in blocks
    ≤ b} a_i D_i`` alone, and the final residual ``P_K`` (no gradient). Each block's sum
    ``Σ_{i∈b} a_i D_i`` is one bag of an ``embedding_bag`` over the decoder (no ``[B, K, d]``
    gather), bags laid out block-major so the sums over blocks run along contiguous ``[n, d]``
    slices.

    Backward with ``gP_b = ∂L/∂P_{b+1} = Σ_{b' ≥ b} 2 g_{b'} P_{b'+1}``: ``∂L/∂D_i = −a_i gP_b``
    and ``∂L/∂a_i = −⟨gP_b, D_i⟩`` for ``i`` in block ``b`` (:func:`_bag_dots`), ``∂L/∂e₀ =
    gP_0``.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, residual0, values, W_dec, indices, chunk, block):  # type: ignore[override]
        B, K = indices.shape
        n_blocks = -(-K // block)
        weight = W_dec.detach().to(residual0.dtype)
        errors = residual0.new_empty(B, n_blocks)
        final = torch.empty_like(residual0)
        d = residual0.shape[1]
        scratch = residual0.new_empty(n_blocks * min(chunk, B) * d)
        for s in range(0, B, chunk):
            n = min(chunk, B - s)
            after, _, _ = _chunk_residuals(
                residual0[s : s + n], values[s : s + n], indices[s : s + n], weight, block, scratch
            )
            errors[s : s + n] = after.pow(2).sum(-1).t()
            final[s : s + n] = after[-1]
        ctx.save_for_backward(residual0, values, W_dec, indices)
        ctx.chunk, ctx.block = chunk, block
        ctx.mark_non_differentiable(final)
        return errors, final

    @staticmethod
    @autocast_off
    def backward(ctx, grad_errors, _grad_final):  # type: ignore[override]
        residual0, values, W_dec, indices = ctx.saved_tensors
        block, chunk = ctx.block, ctx.chunk
        B, K = values.shape
        d = W_dec.shape[1]
        n_blocks = -(-K // block)
        weight = W_dec.detach().to(residual0.dtype)
        grad_values = torch.empty(B, n_blocks * block, dtype=residual0.dtype, device=values.device)
        grad_residual = torch.empty_like(residual0)
        grad_w = torch.zeros(W_dec.shape, dtype=residual0.dtype, device=W_dec.device)
        scratch = residual0.new_empty(n_blocks * min(chunk, B) * d)
        # ∂L/∂D_i = −a_i gP_b is rank one per block: on the CPU one sparse-dense product adds a
        # chunk's Σ a_i gP_b into grad_w rows (no [n, K, d] tensor); elsewhere (a sparse
        # product's coalesce would make a GPU's host wait) the product, index-added
        on_cpu = host_check_is_free(residual0)
        for s in range(0, B, chunk):
            n = min(chunk, B - s)
            after, bags, coefficients = _chunk_residuals(
                residual0[s : s + n], values[s : s + n], indices[s : s + n], weight, block, scratch
            )
            gP = after.mul_(2.0 * grad_errors[s : s + n].t().unsqueeze(-1))
            for b in range(n_blocks - 2, -1, -1):  # Σ_{b' ≥ b}
                gP[b].add_(gP[b + 1])
            into_D = _bag_dots(gP.view(n_blocks * n, d), weight, bags)
            grad_values[s : s + n] = -into_D.view(n_blocks, n, block).transpose(0, 1).reshape(n, -1)
            if on_cpu:
                _add_bag_rank_one(grad_w, bags, coefficients, gP.view(n_blocks * n, d))
            else:
                grad_D = coefficients.unsqueeze(-1) * gP.view(n_blocks * n, 1, d)
                grad_w.index_add_(0, bags.reshape(-1), grad_D.view(-1, d), alpha=-1)
            grad_residual[s : s + n] = gP[0]
        return _block_gradients(ctx, grad_residual, grad_values, grad_w, K, W_dec)


def _block_gradients(
    ctx: Any,
    grad_residual: torch.Tensor,
    grad_values: torch.Tensor,
    grad_w: torch.Tensor,
    K: int,
    W_dec: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """The backward's result: the gradients its inputs need (``grad_values`` without its
    padding, ``grad_w`` in ``W_dec``'s dtype), ``None`` for the rest."""
    need = ctx.needs_input_grad
    return (
        grad_residual if need[0] else None,
        grad_values[:, :K] if need[1] else None,
        grad_w.to(W_dec.dtype) if need[2] else None,
        None,
        None,
        None,
    )


def _add_bag_rank_one(
    grad_w: torch.Tensor, bags: torch.Tensor, coefficients: torch.Tensor, g: torch.Tensor
) -> None:
    """``grad_w[bags[m, i]] −= coefficients[m, i] · g[m]`` for every bag slot, as one
    sparse-dense ``addmm_`` (``bags, coefficients [M, block]``, ``g [M, d]``)."""
    M, block = bags.shape
    owners = torch.arange(M, device=bags.device).repeat_interleave(block)
    pairs = torch.sparse_coo_tensor(
        torch.stack([bags.reshape(-1), owners]),
        coefficients.reshape(-1),
        (grad_w.shape[0], M),
        check_invariants=False,
    )
    grad_w.addmm_(pairs, g, alpha=-1)


def block_end_errors(
    residual0: torch.Tensor,
    values: torch.Tensor,
    W_dec: torch.Tensor,
    indices: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The prefix errors at the end of each block of :data:`PREFIX_BLOCK` latents (prefixes
    ``8, 16, …`` and ``K``): ``[B, ceil(K / 8)]``, column ``b`` equal to
    ``prefix_reconstruction_errors(...)[:, min(8(b+1), K) − 1]``. Same arguments (``indices``
    required), dtypes and gradients as :func:`prefix_reconstruction_errors`; ``O(B·K·d)`` work,
    no Gram matrix."""
    return block_end_pass(residual0, values, W_dec, indices, chunk_size=chunk_size)[0]


def block_end_pass(
    residual0: torch.Tensor,
    values: torch.Tensor,
    W_dec: torch.Tensor,
    indices: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ends, final)``: :func:`block_end_errors` (with gradients) and the last prefix's
    residual ``residual0 − Σ_{i≤K} values_i W_dec[indices_i]`` ``[B, d]`` (no gradient)."""
    dtype = _checked_accumulation_dtype(residual0, values, W_dec, indices)
    B, K = indices.shape
    block = min(PREFIX_BLOCK, K)
    n_blocks = -(-K // block)
    chunk = _chunk_rows(B, n_blocks, W_dec.shape[1], chunk_size, residual0.device.type)
    with full_precision(residual0.device.type):
        return _ResidualErrors.apply(
            residual0.to(dtype), values.to(dtype), W_dec, indices.long(), chunk, block
        )


@torch.no_grad()
def errors_in_block(
    residual0: torch.Tensor,
    values: torch.Tensor,
    W_dec: torch.Tensor,
    indices: torch.Tensor,
    block: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The prefix errors inside one block of :data:`PREFIX_BLOCK` latents per row, no gradient:
    ``[B, width]`` (``width = min(8, K)``), entry ``j`` of row ``r`` the error of prefix
    ``width · block[r] + j + 1`` (``inf`` past ``K``): the values of
    :func:`prefix_reconstruction_errors` there. Same arguments as :func:`block_end_errors`, and
    ``block [B]`` (long, in ``[0, ceil(K / width))``). The residual before the block is one
    ``embedding_bag`` over the prefixes before it; only the block's own rows are gathered."""
    dtype = _checked_accumulation_dtype(residual0, values, W_dec, indices)
    B, K = indices.shape
    width = min(PREFIX_BLOCK, K)
    if block.shape != (B,):
        raise ValueError(f"block must be [B] = [{B}], got shape {tuple(block.shape)}")
    d = W_dec.shape[1]
    chunk = _chunk_rows(B, width, d, chunk_size, residual0.device.type)
    weight = W_dec.to(dtype)
    values = values.to(dtype)
    start = block.long().clamp(0, -(-K // width) - 1) * width
    slot = start.unsqueeze(-1) + torch.arange(width, device=indices.device)  # [B, width]
    inside = slot < K
    slot = slot.clamp(max=K - 1)
    before = torch.arange(K, device=indices.device) < start.unsqueeze(-1)  # [B, K]
    errors = residual0.new_empty(B, width, dtype=dtype)
    with full_precision(residual0.device.type):
        for s in range(0, B, chunk):
            rows = slice(s, s + chunk)
            residual = residual0[rows].to(dtype) - _sum_before(
                weight, indices[rows], values[rows], before[rows]
            )
            a = values[rows].gather(1, slot[rows]) * inside[rows]
            D = weight[indices[rows].gather(1, slot[rows])]  # [n, width, d]
            residuals = residual.unsqueeze(1) - (a.unsqueeze(-1) * D).cumsum(1)
            errors[rows] = residuals.pow(2).sum(-1).masked_fill_(~inside[rows], float("inf"))
    return errors


def _sum_before(
    weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, before: torch.Tensor
) -> torch.Tensor:
    """``Σ_{i : before[r, i]} values[r, i] · weight[indices[r, i]]`` ``[n, d]``: on the CPU
    one bag per row of the slots in ``before`` only; elsewhere (a boolean selection would make
    the host wait) every slot, the others weighted 0."""
    if not host_check_is_free(indices):
        return F.embedding_bag(indices, weight, mode="sum", per_sample_weights=values * before)
    counts = before.sum(-1)
    return F.embedding_bag(
        indices[before],
        weight,
        torch.cumsum(counts, 0) - counts,
        mode="sum",
        per_sample_weights=values[before],
    )


def _checked_accumulation_dtype(
    residual0: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor, indices: torch.Tensor | None
) -> torch.dtype:
    """The dtype the prefix ops compute in, after refusing inputs of the wrong shapes or dtypes."""
    _check_inputs(residual0, values)
    _check_decoder(residual0, values, W_dec, indices)
    return accumulation_dtype(residual0.dtype, values.dtype, W_dec.dtype)


def prefix_reconstruction_errors(
    residual0: torch.Tensor,
    values: torch.Tensor,
    W_dec: torch.Tensor,
    indices: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Squared reconstruction error of every prefix: ``[B, K]``, entry ``j−1`` is ``‖x − x̂_j‖²``.

    Args:
        residual0: ``[B, d]``, the target minus the decoder bias, ``x − b_dec`` (in the space the
            SAE reconstructs, i.e. what ``decode`` is compared with).
        values: ``[B, K]`` coefficients of the selected latents in prefix order (sorted top-K
            activations, descending). If the SAE decodes with ``rescale_acts_by_decoder_norm``,
            pass the effective coefficients ``values / ‖W_dec[indices]‖``.
        W_dec: either the decoder ``[d_sae, d]`` together with ``indices``, or, with
            ``indices=None``, the already gathered decoder rows ``[B, K, d]``.
        indices: ``[B, K]`` integer latent ids of ``values`` (no gradient), or ``None``.
        chunk_size: rows gathered at once (memory knob only; results do not depend on it).

    Returns:
        ``err`` ``[B, K]`` with ``err[:, j-1] = ‖residual0 − Σ_{i≤j} values_i W_dec[indices_i]‖²``,
        non-increasing in ``j`` whenever each added term helps (always true for a trained SAE's
        sorted top-k up to float error). Differentiable in ``residual0``, ``values``, ``W_dec``.
        No ``[B, K, d]`` tensor is built when ``indices`` is given.

    Example (the AdaptiveK ``k*`` label): ``k* = 1 + (err > tau * var[:, None]).sum(-1)`` for a
    monotone ``err``, ``var = ‖x − mean‖²``.
    """
    return prefix_errors_and_residual(residual0, values, W_dec, indices, chunk_size=chunk_size)[0]


def prefix_errors_and_residual(
    residual0: torch.Tensor,
    values: torch.Tensor,
    W_dec: torch.Tensor,
    indices: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(errors, final)``: :func:`prefix_reconstruction_errors` (same arguments) and the last
    prefix's residual ``residual0 − Σ_{i≤K} values_i W_dec[indices_i]`` ``[B, d]`` (without
    gradient; ``x − residual`` is the reconstruction at ``K``), from the same pass."""
    dtype = _checked_accumulation_dtype(residual0, values, W_dec, indices)
    with full_precision(residual0.device.type):
        return _prefix_errors(residual0.to(dtype), values.to(dtype), W_dec, indices, chunk_size)


def _prefix_errors(
    residual0: torch.Tensor,
    values: torch.Tensor,
    W_dec: torch.Tensor,
    indices: torch.Tensor | None,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prefix_errors_and_residual` of inputs already in the accumulation dtype."""
    if indices is None:  # the gathered rows: plain autograd ops
        gathered = W_dec.to(residual0.dtype)
        rows = torch.cat([gathered, residual0.unsqueeze(1)], dim=1)
        final = (residual0 - torch.einsum("bk,bkd->bd", values, gathered)).detach()
        return _errors_from_gram(torch.bmm(rows, rows.transpose(1, 2)), values), final
    B, K = indices.shape
    chunk = _chunk_rows(B, K, W_dec.shape[1], chunk_size, residual0.device.type)
    return _ResidualErrors.apply(residual0, values, W_dec, indices.long(), chunk, 1)


def hierarchical_loss(
    residual0: torch.Tensor,
    values: torch.Tensor,
    W_dec: torch.Tensor,
    indices: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """HierarchicalTopK loss ``mean_b (1/K) Σ_{j=1..K} ‖x_b − x̂_{b,j}‖²`` (scalar), B×K×K form.

    Same arguments as :func:`prefix_reconstruction_errors`, whose mean it is (METHODS.md's closed
    form ``Σ_j err_j = K‖e₀‖² − 2 Σ_i (K−i+1) a_i c_i + Σ_{i,i'} (K−max(i,i')+1) a_i a_i' G_ii'``).
    Like SAELens's ``mse_loss``: summed over ``d``, averaged over the batch.
    """
    return prefix_reconstruction_errors(
        residual0, values, W_dec, indices, chunk_size=chunk_size
    ).mean()


def prefix_reconstruction_errors_naive(
    residual0: torch.Tensor,
    values: torch.Tensor,
    W_dec: torch.Tensor,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference for :func:`prefix_reconstruction_errors`: cumulative sum of ``[B, K, d]`` terms."""
    _check_inputs(residual0, values)
    _check_decoder(residual0, values, W_dec, indices)
    rows = W_dec if indices is None else W_dec[indices.long()]
    partial = torch.cumsum(values.unsqueeze(-1) * rows, dim=1)  # [B, K, d]: x̂_j − b_dec
    return (residual0.unsqueeze(1) - partial).pow(2).sum(-1)


def hierarchical_loss_naive(
    residual0: torch.Tensor,
    values: torch.Tensor,
    W_dec: torch.Tensor,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference for :func:`hierarchical_loss` (materialises ``[B, K, d]``)."""
    return prefix_reconstruction_errors_naive(residual0, values, W_dec, indices).mean()
