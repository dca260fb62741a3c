"""``((x − shift) @ W + b) ⊙ scale`` with the gradient of the shared ``shift`` from one vector product.

SAEs read ``x − b_dec`` (SAELens's ``apply_b_dec_to_input``). Through the plain composition,
autograd forms ``∂L/∂(x − b_dec) = G @ Wᵀ`` (``G = ∂L/∂out``, ``[N, d_out]``): an ``N × d_out × d_in``
matmul, as large as the encoder's, only to sum its rows into ``∂L/∂b_dec``. Since
``Σ_n (G @ Wᵀ)[n] = (Σ_n G[n]) @ Wᵀ``, :func:`shifted_linear` gets ``∂L/∂shift`` from a vector
product and forms ``G @ Wᵀ`` only when ``x`` itself needs a gradient. The optional per-output
``scale`` (SAELens's ``rescale_acts_by_decoder_norm``) is applied without keeping the unscaled
output ``h``: with ``M = (x − shift)ᵀ @ G`` (``[d_in, d_out]``, the one matmul ``∂L/∂W = M ⊙ scale``
needs anyway), ``∂L/∂scale_j = Σ_n G_nj h_nj = Σ_i W_ij M_ij + b_j Σ_n G_nj`` — no division by
``scale``, so a zero scale needs no special case (nor a host sync to find one).

Matmuls run in ``W``'s dtype (under autocast: ``W`` and ``b`` cast to the autocast dtype, as
``F.linear`` is, while ``x − shift`` is formed in ``x``'s dtype); sums over rows in float32.
"""

from __future__ import annotations

import torch

from sae_adaptive_plugin.ops.dispatch import (
    accumulation_dtype,
    autocast_dtype,
    autocast_off,
    linear_weight,
)


class _ShiftedLinear(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x, shift, W, b, scale):  # type: ignore[override]
        xs = (x - shift).to(W.dtype)
        out = torch.addmm(b, xs, W) if b is not None else xs @ W
        if scale is not None:
            out.mul_(scale)
        ctx.save_for_backward(xs, W, b, scale)
        return out

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out):  # type: ignore[override]
        xs, W, b, scale = ctx.saved_tensors
        need_x, need_shift, need_w, need_b, need_scale = ctx.needs_input_grad
        acc = accumulation_dtype(grad_out.dtype, W.dtype)
        g = grad_out.to(W.dtype)
        col_sum = None  # Σ_n G[n]
        if need_shift or need_b or (need_scale and b is not None):
            col_sum = grad_out.sum(dim=0, dtype=acc)
        grad_w = grad_scale = None
        if need_w or (need_scale and scale is not None):
            m = xs.t() @ g  # (x − shift)ᵀ G
            if need_scale and scale is not None:
                grad_scale = (W.to(acc) * m.to(acc)).sum(dim=0)
                if b is not None:
                    grad_scale += b.to(acc) * col_sum
            if need_w:
                grad_w = m * scale if scale is not None else m
        if scale is not None:
            g = g * scale
            if col_sum is not None:
                col_sum = col_sum * scale.to(acc)
        grad_x = g.to(W.dtype) @ W.t() if need_x else None
        grad_shift = -(col_sum.to(W.dtype) @ W.t()) if need_shift else None
        grad_b = col_sum if need_b else None
        return grad_x, grad_shift, grad_w, grad_b, grad_scale


def shifted_linear(
    x: torch.Tensor,
    shift: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``((x − shift) @ W + b) ⊙ scale``: ``x`` ``[N, d_in]``, ``shift`` ``[d_in]``, ``W``
    ``[d_in, d_out]``, ``b`` and ``scale`` ``[d_out]`` or None. Values and gradients equal the
    plain composition's (:func:`shifted_linear_reference`) to float rounding; the output has
    ``W``'s dtype (the autocast dtype under autocast). Double backward is not supported."""
    if x.ndim != 2 or shift.shape != x.shape[-1:] or W.ndim != 2 or W.shape[0] != x.shape[-1]:
        raise ValueError(
            f"shifted_linear needs x [N, d_in], shift [d_in], W [d_in, d_out]; got "
            f"{tuple(x.shape)}, {tuple(shift.shape)}, {tuple(W.shape)}"
        )
    for name, t in (("b", b), ("scale", scale)):
        if t is not None and t.shape != W.shape[1:]:
            raise ValueError(f"{name} must have shape ({W.shape[1]},), got {tuple(t.shape)}")
    low = autocast_dtype(x.device.type)
    if low is not None:  # what autocast does to F.linear's weight and bias
        W = linear_weight(W, low)
        b = b.to(low) if b is not None else None
    return _ShiftedLinear.apply(x, shift, W, b, scale)


def shifted_linear_reference(
    x: torch.Tensor,
    shift: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain composition: ``((x − shift) @ W + b) ⊙ scale`` through autograd."""
    out = (x - shift) @ W
    if b is not None:
        out = out + b
    return out * scale if scale is not None else out
