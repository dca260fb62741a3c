"""``((x − shift) @ W + b) ⊙ scale`` with the gradient of the shared ``shift`` from one vector product.

SAEs read ``x − b_dec`` (SAELens's ``apply_b_dec_to_input``). Through the plain composition,
autograd forms ``∂L/∂(x − b_dec) = G @ Wᵀ`` (``G = ∂L/∂out``, ``[N, d_out]``): an ``N × d_out × d_in``
matmul, as large as the encoder's, only to sum its rows into ``∂L/∂b_dec``. Since
``Σ_n (G @ Wᵀ)[n] = (Σ_n G[n]) @ Wᵀ``, :func:`shifted_linear` gets ``∂L/∂shift`` from a vector
product and forms ``G @ Wᵀ`` only when ``x`` itself needs a gradient. The optional per-output
``scale`` (SAELens's ``rescale_acts_by_decoder_norm``) is applied without keeping the unscaled
output: ``∂L/∂W = ((x − shift)ᵀ @ G) ⊙ scale``, and ``∂L/∂scale = Σ_n G ⊙ out / scale`` is summed a
block of rows at a time (the output is recomputed where ``scale`` is 0).
"""

from __future__ import annotations

import torch

#: Rows per block of the ``∂L/∂scale`` sum: about this many elements of ``[rows, d_out]``.
BLOCK_ELEMENTS = 1 << 20


class _ShiftedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, W, b, scale):  # type: ignore[override]
        xs = x - shift
        out = torch.addmm(b, xs, W) if b is not None else xs @ W
        if scale is not None:
            out.mul_(scale)
        ctx.save_for_backward(xs, W, b, scale, out if scale is not None else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        xs, W, b, scale, out = ctx.saved_tensors
        need_x, need_shift, need_w, need_b, need_scale = ctx.needs_input_grad
        grad_scale = None
        if scale is not None and need_scale:
            grad_scale = torch.zeros_like(scale)
            rows = max(1, BLOCK_ELEMENTS // max(out.shape[1], 1))
            for i in range(0, out.shape[0], rows):
                grad_scale += (grad_out[i : i + rows] * out[i : i + rows]).sum(dim=0)
            nonzero = scale != 0
            grad_scale = torch.where(nonzero, grad_scale / torch.where(nonzero, scale, 1), 0)
            if not bool(nonzero.all()):  # the unscaled output is lost there: recompute it
                h = torch.addmm(b, xs, W) if b is not None else xs @ W
                grad_scale = torch.where(nonzero, grad_scale, (grad_out * h).sum(dim=0))
        grad_x = None
        if need_x:
            grad_x = (grad_out * scale if scale is not None else grad_out) @ W.t()
        col_sum = None
        if need_shift or need_b:
            col_sum = grad_out.sum(dim=0)
            if scale is not None:
                col_sum = col_sum * scale
        grad_shift = -(col_sum @ W.t()) if need_shift else None
        grad_w = None
        if need_w:
            grad_w = xs.t() @ grad_out
            if scale is not None:
                grad_w.mul_(scale)
        return grad_x, grad_shift, grad_w, col_sum if need_b else None, grad_scale


def shifted_linear(
    x: torch.Tensor,
    shift: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``((x − shift) @ W + b) ⊙ scale``: ``x`` ``[N, d_in]``, ``shift`` ``[d_in]``, ``W``
    ``[d_in, d_out]``, ``b`` and ``scale`` ``[d_out]`` or None. Values and gradients equal the
    plain composition's (:func:`shifted_linear_reference`) to float rounding; double backward is
    not supported."""
    if x.ndim != 2 or shift.shape != x.shape[-1:] or W.ndim != 2 or W.shape[0] != x.shape[-1]:
        raise ValueError(
            f"shifted_linear needs x [N, d_in], shift [d_in], W [d_in, d_out]; got "
            f"{tuple(x.shape)}, {tuple(shift.shape)}, {tuple(W.shape)}"
        )
    for name, t in (("b", b), ("scale", scale)):
        if t is not None and t.shape != W.shape[1:]:
            raise ValueError(f"{name} must have shape ({W.shape[1]},), got {tuple(t.shape)}")
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
