"""HierarchicalTopK all-prefix reconstruction errors and loss (docs/METHODS.md §1), without a B×K×d tensor.

With ``e₀ = x − b_dec``, values ``a_1 ≥ … ≥ a_K`` and decoder rows ``D_i = W_dec[idx_i]``, prefix ``j``
has error ``‖e₀‖² − 2 Σ_{i≤j} a_i c_i + Σ_{i,i'≤j} a_i a_i' G_ii'`` with ``c_i = ⟨e₀, D_i⟩`` and the
per-row Gram matrix ``G = D Dᵀ``: ``B × K × K`` arithmetic after :func:`gathered_gram`, which
gathers the decoder rows of a chunk of rows at a time in forward and backward (peak extra memory
``O(B·K² + chunk·K·d)``). :func:`prefix_reconstruction_errors` (``[B, K]``) and
:func:`hierarchical_loss` (the training loss) take 2-D ``residual0 [B, d]`` and ``values [B, K]``
in prefix order; gradients reach ``residual0``, ``values`` and ``W_dec``, never ``indices``.
Everything runs in at least float32 with autocast and TF32 off (the Gram form is a difference of
large terms; why and how much: docs/METHODS.md, "Precision, autocast and devices"). The
``*_naive`` functions are the cumulative-sum references (tests only); peak memory of both forms:
``examples/hierarchical_loss_memory.py``.
"""

from __future__ import annotations

import torch

from sae_adaptive_plugin.ops.dispatch import (
    accumulation_dtype,
    autocast_off,
    block_rows,
    exact_float32_matmul,
    full_precision,
)

#: Upper bound on the number of elements of one chunk's gathered ``[chunk, K, d]`` decoder rows.
DEFAULT_GATHER_ELEMENTS = 1 << 22


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


class _GatheredGram(torch.autograd.Function):
    """``c = ⟨e₀, W_dec[idx]⟩`` ``[B, K]`` and ``G = W_dec[idx] W_dec[idx]ᵀ`` ``[B, K, K]``, chunked,
    in ``residual0``'s dtype (the accumulation dtype; each chunk's gathered rows are cast to it)."""

    @staticmethod
    @autocast_off
    def forward(ctx, residual0, W_dec, indices, chunk):  # type: ignore[override]
        B, K = indices.shape
        c = residual0.new_empty(B, K)
        G = residual0.new_empty(B, K, K)
        with exact_float32_matmul(residual0.device.type):
            for s in range(0, B, chunk):
                rows = W_dec[indices[s : s + chunk]].to(residual0.dtype)  # [b, K, d]
                c[s : s + chunk] = torch.bmm(rows, residual0[s : s + chunk].unsqueeze(-1)).squeeze(
                    -1
                )
                torch.bmm(rows, rows.transpose(1, 2), out=G[s : s + chunk])
        ctx.save_for_backward(residual0, W_dec, indices)
        ctx.chunk = chunk
        return c, G

    @staticmethod
    @autocast_off
    def backward(ctx, grad_c, grad_G):  # type: ignore[override]
        residual0, W_dec, indices = ctx.saved_tensors
        chunk = ctx.chunk
        need_r, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_r or need_w):
            return None, None, None, None
        dtype = residual0.dtype  # W_dec's gradient is summed in it, cast back at the end
        grad_r = torch.zeros_like(residual0) if need_r else None
        grad_w = torch.zeros(W_dec.shape, dtype=dtype, device=W_dec.device) if need_w else None
        d = W_dec.shape[1]
        for s in range(0, indices.shape[0], chunk):
            idx = indices[s : s + chunk]
            rows = W_dec[idx].to(dtype)
            gc = grad_c[s : s + chunk] if grad_c is not None else None
            if need_r and gc is not None:
                grad_r[s : s + chunk] = torch.bmm(gc.unsqueeze(1), rows).squeeze(1)
            if need_w:
                d_rows = None
                if gc is not None:
                    d_rows = gc.unsqueeze(-1) * residual0[s : s + chunk].unsqueeze(1)
                if grad_G is not None:
                    gg = grad_G[s : s + chunk]
                    term = torch.bmm(gg + gg.transpose(1, 2), rows)
                    d_rows = term if d_rows is None else d_rows + term
                if d_rows is not None:
                    grad_w.index_add_(0, idx.reshape(-1), d_rows.reshape(-1, d))
        if grad_w is not None:
            grad_w = grad_w.to(W_dec.dtype)
        return grad_r, grad_w, None, None


def gathered_gram(
    residual0: torch.Tensor,
    W_dec: torch.Tensor,
    indices: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c [B, K], G [B, K, K])`` with ``c_i = ⟨residual0, D_i⟩``, ``G = D Dᵀ``, ``D = W_dec[indices]``.

    With ``indices=None``, ``W_dec`` is taken to be the already gathered rows ``D`` ``[B, K, d]``
    (plain autograd ops). Otherwise the gather is done ``chunk_size`` rows at a time (default:
    :func:`~sae_adaptive_plugin.ops.dispatch.block_rows` with a CPU budget of
    :data:`DEFAULT_GATHER_ELEMENTS` gathered elements). Computed and returned in the
    :func:`~sae_adaptive_plugin.ops.dispatch.accumulation_dtype` of the inputs (at least float32),
    autocast off, without TF32.
    """
    dtype = accumulation_dtype(residual0.dtype, W_dec.dtype)
    device_type = residual0.device.type
    residual0 = residual0.to(dtype)
    if indices is None:
        with full_precision(device_type):
            rows = W_dec.to(dtype)
            c = torch.einsum("bkd,bd->bk", rows, residual0)
            G = torch.bmm(rows, rows.transpose(1, 2))
        return c, G
    if not W_dec.dtype.is_floating_point:
        raise ValueError(f"W_dec must be a floating-point tensor, got dtype {W_dec.dtype}")
    B, K = indices.shape
    chunk = _chunk_rows(B, K, W_dec.shape[1], chunk_size, device_type)
    return _GatheredGram.apply(residual0, W_dec, indices.long(), chunk)


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
    _check_inputs(residual0, values)
    _check_decoder(residual0, values, W_dec, indices)
    dtype = accumulation_dtype(residual0.dtype, values.dtype, W_dec.dtype)
    with full_precision(residual0.device.type):
        return _prefix_errors(residual0.to(dtype), values.to(dtype), W_dec, indices, chunk_size)


def _prefix_errors(
    residual0: torch.Tensor,
    values: torch.Tensor,
    W_dec: torch.Tensor,
    indices: torch.Tensor | None,
    chunk_size: int | None,
) -> torch.Tensor:
    """:func:`prefix_reconstruction_errors` of inputs already in the accumulation dtype."""
    c, G = gathered_gram(residual0, W_dec, indices, chunk_size)
    K = values.shape[1]
    linear = torch.cumsum(values * c, dim=-1)  # Σ_{i≤j} a_i c_i
    H = values.unsqueeze(-1) * values.unsqueeze(-2) * G  # a_j a_i G_ji
    # Row j of the new quadratic mass when prefix j is added: H_jj + 2 Σ_{i<j} H_ji.
    weight = torch.tril(torch.full((K, K), 2.0, dtype=H.dtype, device=H.device), diagonal=-1)
    weight += torch.eye(K, dtype=H.dtype, device=H.device)
    quadratic = torch.cumsum((H * weight).sum(-1), dim=-1)
    sq_norm = residual0.pow(2).sum(-1, keepdim=True)
    return sq_norm - 2.0 * linear + quadratic


def hierarchical_loss(
    residual0: torch.Tensor,
    values: torch.Tensor,
    W_dec: torch.Tensor,
    indices: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """HierarchicalTopK loss ``mean_b (1/K) Σ_{j=1..K} ‖x_b − x̂_{b,j}‖²`` (scalar), B×K×K form.

    Same arguments as :func:`prefix_reconstruction_errors`. Uses METHODS.md's closed form
    ``Σ_j err_j = K‖e₀‖² − 2 Σ_i (K−i+1) a_i c_i + Σ_{i,i'} (K−max(i,i')+1) a_i a_i' G_ii'``;
    equal to ``prefix_reconstruction_errors(...).mean()``. Like SAELens's ``mse_loss``: summed
    over ``d``, averaged over the batch.
    """
    _check_inputs(residual0, values)
    _check_decoder(residual0, values, W_dec, indices)
    dtype = accumulation_dtype(residual0.dtype, values.dtype, W_dec.dtype)
    with full_precision(residual0.device.type):
        return _loss(residual0.to(dtype), values.to(dtype), W_dec, indices, chunk_size)


def _loss(
    residual0: torch.Tensor,
    values: torch.Tensor,
    W_dec: torch.Tensor,
    indices: torch.Tensor | None,
    chunk_size: int | None,
) -> torch.Tensor:
    """:func:`hierarchical_loss` of inputs already in the accumulation dtype."""
    c, G = gathered_gram(residual0, W_dec, indices, chunk_size)
    K = values.shape[1]
    rank = torch.arange(1, K + 1, device=values.device, dtype=values.dtype)
    linear_weight = K - rank + 1  # K − i + 1
    pair_weight = K - torch.maximum(rank[:, None], rank[None, :]) + 1  # K − max(i, i') + 1
    sq_norm = residual0.pow(2).sum(-1)
    linear = (linear_weight * values * c).sum(-1)
    quadratic = torch.einsum("bi,bj,bij,ij->b", values, values, G, pair_weight)
    return ((K * sq_norm - 2.0 * linear + quadratic) / K).mean()


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
