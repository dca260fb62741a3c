"""``(x − shift) @ W + b`` with the gradient of the shared ``shift`` from one vector product.

SAEs read ``x − b_dec`` (SAELens's ``apply_b_dec_to_input``). Through the plain composition,
autograd forms ``∂L/∂(x − b_dec) = G @ Wᵀ`` (``G = ∂L/∂out``, ``[N, d_out]``): an ``N × d_out × d_in``
matmul, as large as the encoder's, only to sum its rows into ``∂L/∂b_dec``. Since
``Σ_n (G @ Wᵀ)[n] = (Σ_n G[n]) @ Wᵀ``, :func:`shifted_linear` gets ``∂L/∂shift = −(Σ_n G[n]) @ Wᵀ``
from a vector product and forms ``G @ Wᵀ`` only when ``x`` itself needs a gradient.
"""

from __future__ import annotations

import torch


class _ShiftedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, W, b):  # type: ignore[override]
        xs = x - shift
        ctx.save_for_backward(xs, W)
        return torch.addmm(b, xs, W) if b is not None else xs @ W

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        xs, W = ctx.saved_tensors
        need_x, need_shift, need_w, need_b = ctx.needs_input_grad
        grad_x = grad_out @ W.t() if need_x else None
        col_sum = grad_out.sum(dim=0) if (need_shift or need_b) else None
        grad_shift = -(col_sum @ W.t()) if need_shift else None
        grad_w = xs.t() @ grad_out if need_w else None
        return grad_x, grad_shift, grad_w, col_sum if need_b else None


def shifted_linear(
    x: torch.Tensor, shift: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None
) -> torch.Tensor:
    """``(x − shift) @ W + b``: ``x`` ``[N, d_in]``, ``shift`` ``[d_in]``, ``W`` ``[d_in, d_out]``,
    ``b`` ``[d_out]`` or None. Values and gradients equal the plain composition's
    (:func:`shifted_linear_reference`) to float rounding; double backward is not supported."""
    if x.ndim != 2 or shift.shape != x.shape[-1:] or W.ndim != 2 or W.shape[0] != x.shape[-1]:
        raise ValueError(
            f"shifted_linear needs x [N, d_in], shift [d_in], W [d_in, d_out]; got "
            f"{tuple(x.shape)}, {tuple(shift.shape)}, {tuple(W.shape)}"
        )
    if b is not None and b.shape != W.shape[1:]:
        raise ValueError(f"b must have shape ({W.shape[1]},), got {tuple(b.shape)}")
    return _ShiftedLinear.apply(x, shift, W, b)


def shifted_linear_reference(
    x: torch.Tensor, shift: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain composition: ``(x − shift) @ W + b`` through autograd."""
    out = (x - shift) @ W
    return out + b if b is not None else out
