"""HierarchicalTopK all-prefix reconstruction errors and loss (docs/METHODS.md §1), without a B×K×d tensor.

With ``e₀ = x − b_dec``, values ``a_1 ≥ … ≥ a_K`` and decoder rows ``D_i = W_dec[idx_i]``, prefix ``j``
has error ``‖e₀‖² − 2 Σ_{i≤j} a_i c_i + Σ_{i,i'≤j} a_i a_i' G_ii'`` with ``c_i = ⟨e₀, D_i⟩`` and
``G = D Dᵀ``: every term is an entry of the Gram matrix of the extended rows ``[D_1 … D_K, e₀]``
(``[B, K+1, K+1]``), which one gather and one ``bmm`` per chunk of rows compute in forward and
backward (peak extra memory ``O(B·K² + chunk·K·d)``; the backward in closed form).
:func:`prefix_reconstruction_errors` (``[B, K]``) and :func:`hierarchical_loss` (the training loss)
take 2-D ``residual0 [B, d]`` and ``values [B, K]`` in prefix order; gradients reach ``residual0``,
``values`` and ``W_dec``, never ``indices``. Everything runs in at least float32 with autocast and
TF32 off (the Gram form is a difference of large terms; why and how much: docs/METHODS.md,
"Precision, autocast and devices"). The ``*_naive`` functions are the cumulative-sum references
(tests only); peak memory of both forms: ``examples/hierarchical_loss_memory.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from sae_adaptive_plugin.ops.dispatch import (
    accumulation_dtype,
    autocast_off,
    block_rows,
    exact_float32_matmul,
    full_precision,
    host_check_is_free,
)

#: Upper bound on the number of elements of one chunk's gathered ``[chunk, K, d]`` decoder rows.
DEFAULT_GATHER_ELEMENTS = 1 << 22
#: Latents per block of prefixes (see :class:`_PrefixErrors`).
PREFIX_BLOCK = 8


def _chunk_rows(n_rows: int, k: int, d: int, chunk_size: int | None, device_type: str) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (or None for automatic), got {chunk_size}")
        return chunk_size
    return min(max(n_rows, 1), block_rows(n_rows, k * d, device_type, DEFAULT_GATHER_ELEMENTS))


def _block_and_chunk(
    shape: torch.Size, d: int, chunk_size: int | None, device_type: str
) -> tuple[int, int]:
    """``(block, chunk)`` of the blocked ops for ``indices`` of ``shape [B, K]``: at most
    :data:`PREFIX_BLOCK` latents a block, and rows a chunk by the size of their gathered slots."""
    B, K = shape
    block = min(PREFIX_BLOCK, K)
    width = -(-K // block) * (block + 1)
    return block, _chunk_rows(B, width, d, chunk_size, device_type)


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


def _blocked(
    indices: torch.Tensor, values: torch.Tensor, block: int, free: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slots, coefficients)``: gather slots ``[B, n_blocks, block + free]``, each block's
    latents (padded with latent 0) then ``free`` slots for the loops to fill, and ``values``
    zero-padded to ``[B, n_blocks · block]`` (so padding slots add nothing)."""
    B, K = indices.shape
    n_blocks = -(-K // block)
    padded = indices.new_zeros(B, n_blocks * block)
    padded[:, :K] = indices
    slots = indices.new_zeros(B, n_blocks, block + free)
    slots[:, :, :block] = padded.view(B, n_blocks, block)
    return slots, _padded(values, n_blocks * block)


def _scratch(like: torch.Tensor, count: int, chunk: int, n_blocks: int, d: int) -> torch.Tensor:
    """``count`` buffers ``[chunk, n_blocks, d]`` that every chunk of a blocked op reuses (slice
    ``[:n]``): on the CPU a fresh multi-MiB tensor per chunk costs its page faults each time."""
    return like.new_empty(count, min(chunk, like.shape[0]), n_blocks, d)


def _residuals_after_blocks(
    residual0: torch.Tensor, coeffs: torch.Tensor, D: torch.Tensor, scratch: torch.Tensor
) -> torch.Tensor:
    """``P_{b+1} = e₀ − Σ_{i in blocks ≤ b} a_i D_i`` ``[n, n_blocks, d]`` for every block at once,
    from ``coeffs [n, n_blocks · block]`` and rows ``D [n, n_blocks, block, d]``, written into
    ``scratch[1, :n]`` (``scratch[0, :n]`` is overwritten too)."""
    n, n_blocks, block, d = D.shape
    a = coeffs.reshape(n * n_blocks, 1, block)
    sums = scratch[0, :n]
    torch.bmm(a, D.reshape(n * n_blocks, block, d), out=sums.view(n * n_blocks, 1, d))
    after = _block_sums(sums, later=False, inclusive=True, out=scratch[1, :n])
    return torch.sub(residual0.unsqueeze(1), after, out=after)


def _block_sums(
    t: torch.Tensor, *, later: bool, inclusive: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Sums of ``t [n, n_blocks, d]`` along the blocks: over ``b' ≤ b`` (``later=False``) or
    ``b' ≥ b`` (``later=True``), ``b' = b`` included or not; a product with a triangular matrix
    (faster on the CPU than ``cumsum`` along a middle dimension), into ``out`` if given."""
    n_blocks = t.shape[1]
    ones = torch.ones(n_blocks, n_blocks, dtype=t.dtype, device=t.device)
    diagonal = 0 if inclusive else (1 if later else -1)
    mask = ones.triu(diagonal) if later else ones.tril(diagonal)
    return torch.matmul(mask, t, out=out)


def _block_gradients(
    ctx: Any,
    grad_residual: torch.Tensor,
    grad_values: torch.Tensor,
    grad_w: torch.Tensor,
    K: int,
    W_dec: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """A blocked Function's backward result: the gradients its inputs need (``grad_values``
    without its padding, ``grad_w`` in ``W_dec``'s dtype), ``None`` for the rest."""
    need = ctx.needs_input_grad
    return (
        grad_residual if need[0] else None,
        grad_values[:, :K] if need[1] else None,
        grad_w.to(W_dec.dtype) if need[2] else None,
        None,
        None,
        None,
    )


def _gathered_chunks(
    W_dec: torch.Tensor, slots: torch.Tensor, chunk: int, dtype: torch.dtype
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, rows [n, *slots.shape[1:], d])`` for consecutive chunks of ``chunk`` rows,
    gathered (in ``dtype``) into one reused buffer (valid until the next chunk)."""
    B = slots.shape[0]
    d = W_dec.shape[1]
    buffer = W_dec.new_empty(min(chunk, B) * slots[0].numel(), d)
    for s in range(0, B, chunk):
        ids = slots[s : s + chunk].reshape(-1)
        rows = buffer[: ids.numel()]
        torch.index_select(W_dec, 0, ids, out=rows)
        yield s, rows.to(dtype).view(*slots[s : s + chunk].shape, d)


class _PrefixErrors(torch.autograd.Function):
    """Prefix errors ``[B, K]`` of ``residual0 [B, d]``, ``values [B, K]`` and the decoder rows
    ``W_dec[indices]``, in ``residual0``'s dtype, and the final residual ``P_K [B, d]`` (no
    gradient).

    The prefixes are taken in blocks of ``block`` latents. With ``P_b`` the residual before block
    ``b`` (``P_0 = e₀``, ``P_{b+1} = P_b − Σ_{i∈b} a_i D_i``, all blocks at once by a cumulative
    sum), the errors inside block ``b`` are those of :func:`_errors_from_gram` on the Gram matrix
    of ``[D_b, P_b]``: ``O(K·block·d)`` arithmetic per row instead of ``O(K²·d)``, one batched
    product over every block of a chunk of rows, one gather per chunk each way.

    Backward: inside block ``b``, ``L_b = Σ_j g_j err_j = Σ_mn ã_m ã_n G_mn T_mn`` (``ã = [a_b,
    −1]``, ``T_mn = Σ_{j ≥ max(rank m, rank n)} g_j``, ``P_b`` of rank 0), so ``∂L_b/∂ã = 2 (G ∘
    T) ã`` and ``∂L_b/∂[D_b, P_b] = 2 (ã ãᵀ ∘ T) [D_b, P_b]``. ``P_b`` feeds every later block,
    so ``∂L/∂P_{b+1} = Σ_{b' > b} ∂L_{b'}/∂P_{b'}`` =: ``gP_b``, which adds ``−a_i gP_b`` to
    ``∂L/∂D_i`` and ``−⟨gP_b, D_i⟩`` to ``∂L/∂a_i`` for ``i`` in block ``b``; ``∂L/∂e₀`` is the
    sum over all blocks.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, residual0, values, W_dec, indices, chunk, block):  # type: ignore[override]
        B, K = indices.shape
        slots, coeffs = _blocked(indices, values, block, free=1)
        n_blocks = slots.shape[1]
        errors = residual0.new_empty(B, n_blocks * block)
        final = torch.empty_like(residual0)
        scratch = _scratch(residual0, 2, chunk, n_blocks, residual0.shape[1])
        with exact_float32_matmul(residual0.device.type):
            for s, rows in _gathered_chunks(W_dec, slots, chunk, residual0.dtype):
                n = rows.shape[0]
                a = coeffs[s : s + n]
                after = _residuals_after_blocks(
                    residual0[s : s + n], a, rows[:, :, :block], scratch
                )
                final[s : s + n] = after[:, -1]
                errors[s : s + n] = _in_block_errors(rows, residual0[s : s + n], after, a, block)
        ctx.save_for_backward(residual0, values, W_dec, indices)
        ctx.chunk, ctx.block = chunk, block
        ctx.mark_non_differentiable(final)
        return errors[:, :K], final

    @staticmethod
    @autocast_off
    def backward(ctx, grad_errors, _grad_final):  # type: ignore[override]
        residual0, values, W_dec, indices = ctx.saved_tensors
        block = ctx.block
        B, K = values.shape
        d = W_dec.shape[1]
        slots, coeffs = _blocked(indices, values, block, free=2)
        n_blocks, width = slots.shape[1], coeffs.shape[1]
        later_g = _padded(grad_errors, width).view(B * n_blocks, block)
        later_g = later_g.flip(-1).cumsum(-1).flip(-1)  # within a block: Σ_{j≥i} g_j
        rank = _prefix_ranks(block, values.device)
        pair = (torch.maximum(rank[:, None], rank[None, :]) - 1).clamp_min(0)  # rank 0 = rank 1
        grad_values = torch.empty_like(coeffs)
        grad_residual = torch.empty_like(residual0)
        grad_w = torch.zeros(W_dec.shape, dtype=residual0.dtype, device=W_dec.device)
        grad_D_buffer = residual0.new_empty(min(ctx.chunk, B) * n_blocks, block, d)
        scratch = _scratch(residual0, 2, ctx.chunk, n_blocks, d)
        with exact_float32_matmul(residual0.device.type):
            for s, rows in _gathered_chunks(W_dec, slots, ctx.chunk, residual0.dtype):
                n = rows.shape[0]
                a = coeffs[s : s + n].reshape(n * n_blocks, block)
                D = rows[:, :, :block]
                after = _residuals_after_blocks(residual0[s : s + n], coeffs[s : s + n], D, scratch)
                V = _with_residuals_before(rows, residual0[s : s + n], after, block)
                ext = rows.view(n * n_blocks, block + 2, d)  # [D_b, P_b, gP_b]
                signed = _signed(a)  # [n·nb, block+1]
                T = later_g[s * n_blocks : (s + n) * n_blocks][:, pair]  # [n·nb, b+1, b+1]
                gram = torch.bmm(V, V.transpose(1, 2))
                direct = torch.bmm(gram.mul_(T), signed.unsqueeze(-1)).squeeze(-1)
                Q = T.mul_(signed.unsqueeze(-1) * signed.unsqueeze(-2)).mul_(2.0)
                # ∂L_b/∂P_b, then ∂L/∂P_{b+1} (`after` is in rows now, its buffer free)
                own_P = torch.bmm(Q[:, block:], V, out=scratch[0, :n].view(-1, 1, d)).view(n, -1, d)
                gP = _block_sums(own_P, later=True, inclusive=False, out=scratch[1, :n])
                rows[:, :, block + 1] = gP
                into_D = torch.bmm(ext[:, :block], gP.view(-1, d, 1)).view(n, -1)
                grad_values[s : s + n] = 2.0 * direct[:, :block].reshape(n, -1) - into_D
                # ∂L/∂D_b = Q_b [D_b, P_b] − a_b gP_b: one product with [D_b, P_b, gP_b]
                Q_a = torch.cat([Q[:, :block], -a.unsqueeze(-1)], dim=-1)
                grad_D = torch.bmm(Q_a, ext, out=grad_D_buffer[: n * n_blocks])
                grad_w.index_add_(0, slots[s : s + n, :, :block].reshape(-1), grad_D.view(-1, d))
                grad_residual[s : s + n] = gP[:, 0] + own_P[:, 0]
        return _block_gradients(ctx, grad_residual, grad_values, grad_w, K, W_dec)


def _with_residuals_before(
    rows: torch.Tensor, residual0: torch.Tensor, after: torch.Tensor, block: int
) -> torch.Tensor:
    """``[D_b, P_b]`` ``[n · n_blocks, block + 1, d]`` (a view of ``rows``): each block's
    gathered rows ``rows [n, n_blocks, ≥ block + 1, d]`` with the residual before the block
    (``residual0``, then ``after [n, n_blocks, d]`` one block later) written into slot ``block``."""
    n, n_blocks, _, d = rows.shape
    rows[:, 0, block] = residual0
    rows[:, 1:, block] = after[:, :-1]
    return rows[:, :, : block + 1].view(n * n_blocks, block + 1, d)


def _in_block_errors(
    rows: torch.Tensor,
    residual0: torch.Tensor,
    after: torch.Tensor,
    coeffs: torch.Tensor,
    block: int,
) -> torch.Tensor:
    """Every prefix's error ``[n, n_blocks · block]`` of a chunk, from each block's Gram matrix
    of ``[D_b, P_b]`` (:func:`_with_residuals_before`, :func:`_errors_from_gram`)."""
    V = _with_residuals_before(rows, residual0, after, block)
    gram = torch.bmm(V, V.transpose(1, 2))
    return _errors_from_gram(gram, coeffs.reshape(-1, block)).view(rows.shape[0], -1)


class _BlockEndErrors(torch.autograd.Function):
    """``‖P_{b+1}‖²`` ``[B, n_blocks]``: the error after each block of ``block`` prefixes (the
    last block ends at ``K``), from ``P_{b+1} = e₀ − Σ_{i in blocks ≤ b} a_i D_i`` alone; then,
    without gradients, every prefix's error ``[B, K]`` with ``all_prefixes`` (:class:`_PrefixErrors`'s
    forward on the same gathered rows; else an empty tensor) and the final residual ``P_K``.

    Backward with ``gP_b = ∂L/∂P_{b+1} = Σ_{b' ≥ b} 2 g_{b'} P_{b'+1}``: ``∂L/∂D_i = −a_i gP_b``
    and ``∂L/∂a_i = −⟨gP_b, D_i⟩`` for ``i`` in block ``b``, ``∂L/∂e₀ = gP_0``.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, residual0, values, W_dec, indices, chunk, block, all_prefixes):  # type: ignore[override]
        B, K = indices.shape
        slots, coeffs = _blocked(indices, values, block, free=int(all_prefixes))
        n_blocks = slots.shape[1]
        errors = residual0.new_empty(B, n_blocks)
        prefix = residual0.new_empty((B, n_blocks * block) if all_prefixes else (0, 0))
        final = torch.empty_like(residual0)
        scratch = _scratch(residual0, 2, chunk, n_blocks, residual0.shape[1])
        with exact_float32_matmul(residual0.device.type):
            for s, rows in _gathered_chunks(W_dec, slots, chunk, residual0.dtype):
                n = rows.shape[0]
                a = coeffs[s : s + n]
                after = _residuals_after_blocks(
                    residual0[s : s + n], a, rows[:, :, :block], scratch
                )
                errors[s : s + n] = after.pow(2).sum(-1)
                final[s : s + n] = after[:, -1]
                if all_prefixes:
                    prefix[s : s + n] = _in_block_errors(
                        rows, residual0[s : s + n], after, a, block
                    )
        ctx.save_for_backward(residual0, values, W_dec, indices)
        ctx.chunk, ctx.block = chunk, block
        prefix = prefix[:, :K]
        ctx.mark_non_differentiable(prefix, final)
        return errors, prefix, final

    @staticmethod
    @autocast_off
    def backward(ctx, grad_errors, _grad_prefix, _grad_final):  # type: ignore[override]
        residual0, values, W_dec, indices = ctx.saved_tensors
        block = ctx.block
        B, K = values.shape
        d = W_dec.shape[1]
        slots, coeffs = _blocked(indices, values, block, free=0)
        n_blocks = slots.shape[1]
        grad_values = torch.empty_like(coeffs)
        grad_residual = torch.empty_like(residual0)
        grad_w = torch.zeros(W_dec.shape, dtype=residual0.dtype, device=W_dec.device)
        scratch = _scratch(residual0, 2, ctx.chunk, n_blocks, d)
        # ∂L/∂D_i = −a_i gP_b is rank one per block: on the CPU one sparse-dense product adds a
        # chunk's Σ a_i gP_b into grad_w rows (no [n, n_blocks, block, d] tensor); elsewhere
        # (a sparse product's coalesce would make a GPU's host wait) the product, index-added
        on_cpu = host_check_is_free(residual0)
        grad_D_buffer = (
            None if on_cpu else residual0.new_empty(min(ctx.chunk, B), n_blocks, block, d)
        )
        with exact_float32_matmul(residual0.device.type):
            for s, rows in _gathered_chunks(W_dec, slots, ctx.chunk, residual0.dtype):
                n = rows.shape[0]
                a = coeffs[s : s + n]
                after = _residuals_after_blocks(residual0[s : s + n], a, rows, scratch)
                weighted = after.mul_(2.0 * grad_errors[s : s + n, :, None])
                gP = _block_sums(weighted, later=True, inclusive=True, out=scratch[0, :n])
                D = rows.view(-1, block, d)
                into_D = torch.bmm(D, gP.view(-1, d, 1)).view(n, -1)
                grad_values[s : s + n] = -into_D
                if on_cpu:
                    _add_block_rank_one(grad_w, slots[s : s + n], a, gP)
                else:
                    grad_D = torch.mul(
                        a.view(n, n_blocks, block, 1), gP.unsqueeze(2), out=grad_D_buffer[:n]
                    )
                    grad_w.index_add_(0, slots[s : s + n].reshape(-1), grad_D.view(-1, d), alpha=-1)
                grad_residual[s : s + n] = gP[:, 0]
        return (*_block_gradients(ctx, grad_residual, grad_values, grad_w, K, W_dec), None)


def _add_block_rank_one(
    grad_w: torch.Tensor, slots: torch.Tensor, coeffs: torch.Tensor, gP: torch.Tensor
) -> None:
    """``grad_w[slots[r, b, i]] −= coeffs[r, b·block + i] · gP[r, b]`` for every slot, as one
    sparse-dense ``addmm_`` (``slots [n, n_blocks, block]``, ``gP [n, n_blocks, d]``)."""
    n, n_blocks, block = slots.shape
    owners = torch.arange(n * n_blocks, device=slots.device).repeat_interleave(block)
    pairs = torch.sparse_coo_tensor(
        torch.stack([slots.reshape(-1), owners]),
        coeffs.reshape(-1),
        (grad_w.shape[0], n * n_blocks),
        check_invariants=False,
    )
    grad_w.addmm_(pairs, gP.reshape(n * n_blocks, -1), alpha=-1)


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
    all_prefixes: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ends, errors, final)``: :func:`block_end_errors` (with gradients), then from the rows
    that pass gathers and without gradients every prefix's error ``[B, K]`` (the values of
    :func:`prefix_reconstruction_errors`) with ``all_prefixes`` (else an empty tensor), and the
    last prefix's residual ``residual0 − Σ_{i≤K} values_i W_dec[indices_i]`` ``[B, d]``."""
    dtype = _checked_accumulation_dtype(residual0, values, W_dec, indices)
    device_type = residual0.device.type
    block, chunk = _block_and_chunk(indices.shape, W_dec.shape[1], chunk_size, device_type)
    with full_precision(device_type):
        return _BlockEndErrors.apply(
            residual0.to(dtype), values.to(dtype), W_dec, indices.long(), chunk, block, all_prefixes
        )


def _checked_accumulation_dtype(
    residual0: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor, indices: torch.Tensor | None
) -> torch.dtype:
    """The dtype the prefix ops compute in, after refusing inputs of the wrong shapes or dtypes."""
    _check_inputs(residual0, values)
    _check_decoder(residual0, values, W_dec, indices)
    return accumulation_dtype(residual0.dtype, values.dtype, W_dec.dtype)


def _padded(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t [B, K]`` with zero columns appended up to ``width``."""
    if t.shape[1] == width:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1])], dim=1)


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
    block, chunk = _block_and_chunk(
        indices.shape, W_dec.shape[1], chunk_size, residual0.device.type
    )
    return _PrefixErrors.apply(residual0, values, W_dec, indices.long(), chunk, block)


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
