"""Encoder pre-activations at chosen latents, with a backward that touches only those latents.

``preacts_at(sae_in, W_enc, b_enc, indices, values, scale)`` is ``hidden_pre.gather(-1, indices)``
for ``hidden_pre = (sae_in @ W_enc + b_enc) · scale``, given those values already computed
(``values``, detached). Its gradient reaches ``sae_in``, ``W_enc``, ``b_enc`` and ``scale`` from the
``N·m`` chosen slots only, as :func:`~.variable_topk.topk_encode`'s sparse backward does (an
``embedding_bag`` over ``W_encᵀ`` and float32 index-adds), never as a dense ``[N, d_sae]``
gradient. The AuxK loss uses it for the ``k_aux`` dead latents of each row, so a step with dead
latents keeps the sparse backward.
"""

from __future__ import annotations

import torch

from sae_adaptive_plugin.ops.dispatch import accumulation_dtype, autocast_off, full_precision
from sae_adaptive_plugin.ops.variable_topk import sparse_encoder_backward, unscaled_at


class _PreactsAt(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, sae_in, W_enc, b_enc, scale, indices, values):  # type: ignore[override]
        h_sel = unscaled_at(values, scale, indices) if scale is not None else None
        ctx.save_for_backward(sae_in, W_enc, b_enc, scale, indices, h_sel)
        return values.clone()

    @staticmethod
    @autocast_off
    def backward(ctx, grad):  # type: ignore[override]
        sae_in, W_enc, b_enc, scale, indices, h_sel = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        grads = sparse_encoder_backward(
            needs, grad, sae_in, W_enc, b_enc, scale, indices, None, h_sel
        )
        return grads  # (sae_in, W_enc, b_enc, scale, indices = None, values = None)


def preacts_at(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``values`` (``[N, m]``, the pre-activations ``(sae_in @ W_enc + b_enc) · scale`` at
    ``indices``), differentiable in ``sae_in`` ``[N, d_in]``, ``W_enc``, ``b_enc`` and ``scale``
    through the chosen slots only. ``values`` must be those pre-activations: only their gradient
    is computed here."""
    if indices.shape != values.shape or indices.dim() != 2 or sae_in.dim() != 2:
        raise ValueError(
            f"preacts_at takes sae_in [N, d_in] and indices/values [N, m], got "
            f"{tuple(sae_in.shape)}, {tuple(indices.shape)}, {tuple(values.shape)}"
        )
    return _PreactsAt.apply(sae_in, W_enc, b_enc, scale, indices, values.detach())


class _PreactsOnColumns(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, sae_in, W_enc, b_enc, scale, columns, values):  # type: ignore[override]
        ctx.save_for_backward(sae_in, W_enc, b_enc, scale, columns, values)
        return values.clone()

    @staticmethod
    @autocast_off
    def backward(ctx, grad):  # type: ignore[override]
        sae_in, W_enc, b_enc, scale, columns, values = ctx.saved_tensors
        need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
        acc = accumulation_dtype(sae_in.dtype, W_enc.dtype)
        d_sae = W_enc.shape[1]
        g = grad.to(acc)
        grad_x = grad_w = grad_b = grad_s = None
        if scale is not None:
            s = scale[columns].to(acc)
            if need_s:  # ∂/∂s of (x W + b)·s at the unscaled pre-activation (0 where s = 0)
                h = torch.where(s != 0, values.to(acc) / torch.where(s != 0, s, 1), 0)
                grad_s = scale.new_zeros(d_sae, dtype=acc).index_copy_(0, columns, (g * h).sum(0))
                grad_s = grad_s.to(scale.dtype)
            g = g * s
        if need_b:
            grad_b = b_enc.new_zeros(d_sae, dtype=acc).index_copy_(0, columns, g.sum(0))
            grad_b = grad_b.to(b_enc.dtype)
        with full_precision(sae_in.device.type):
            if need_x:
                grad_x = (g @ W_enc.index_select(1, columns).to(acc).T).to(sae_in.dtype)
            if need_w:
                grad_w = W_enc.new_zeros(W_enc.shape, dtype=acc)
                grad_w.index_copy_(1, columns, sae_in.to(acc).T @ g)
                grad_w = grad_w.to(W_enc.dtype)
        return grad_x, grad_w, grad_b, grad_s, None, None


def preacts_on_columns(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    columns: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``values`` (``[N, m]``, the pre-activations ``(sae_in @ W_enc + b_enc) · scale`` of the
    ``m`` distinct latents ``columns``, every row), differentiable in ``sae_in``, ``W_enc``,
    ``b_enc`` and ``scale`` through dense matmuls over those columns (in at least float32)."""
    if columns.dim() != 1 or values.dim() != 2 or values.shape[1] != columns.numel():
        raise ValueError(
            f"preacts_on_columns takes columns [m] and values [N, m], got "
            f"{tuple(columns.shape)}, {tuple(values.shape)}"
        )
    return _PreactsOnColumns.apply(sae_in, W_enc, b_enc, scale, columns, values.detach())


def preacts_at_reference(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    indices: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain autograd: the dense pre-activations, gathered (the test reference)."""
    hidden_pre = sae_in @ W_enc + b_enc
    if scale is not None:
        hidden_pre = hidden_pre * scale
    return hidden_pre.gather(-1, indices)
