"""SoftSAE's soft code and its decode in one op, computed a block of rows at a time.

With ``z = ReLU(h)`` (``h``: pre-activations ``[B, F]``), the LapSum mask ``m = F_L((z − τ)/α)``
(``Σ m = k̂`` per row, :mod:`~sae_adaptive_plugin.ops.lapsum`) and the soft code ``c = z ⊙ m``:

    out = (c ⊙ s) @ W_dec          (s: optional per-latent decoder scale, e.g. 1/‖W_dec‖)

Backward, with ``G = (∂L/∂out @ W_decᵀ) ⊙ s`` (``∂L/∂c``), ``g = G ⊙ z`` (``∂L/∂m``),
``q = ½e^{−|u|}/α`` and ``ḡ = Σ g q / Σ q`` (``= ∂L/∂k̂``)::

    ∂L/∂h = 1[h > 0] ⊙ (G ⊙ m + q ⊙ (g − ḡ)),   ∂L/∂W_dec = (c ⊙ s)ᵀ @ ∂L/∂out,
    ∂L/∂s = Σ_rows c ⊙ (∂L/∂out @ W_decᵀ).

:func:`lapsum_decode` computes what the plain composition (:func:`lapsum_decode_reference`) does,
to float rounding, a block of rows at a time: it keeps only ``τ`` per row and recomputes ``u``,
``m`` and ``c`` of a block in the backward, so its only ``[B, F]`` tensors are ``∂L/∂h`` and the
``feature_acts`` (``c`` where ``m > ½``, no gradient) that SAELens counts firings from.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae_adaptive_plugin.ops.lapsum import _compute_dtype, lapsum_threshold, lapsum_topk

#: Rows per elementwise block: about this many elements of ``[rows, F]`` temporaries (1 MiB
#: in float32); the decoder matmuls take several such blocks at once, about ``MATMUL_ELEMENTS``.
BLOCK_ELEMENTS = 1 << 18
MATMUL_ELEMENTS = 1 << 23


class SoftDecode(NamedTuple):
    """``out``: ``(c ⊙ s) @ W_dec`` ``[B, d_out]``; ``feature_acts``: ``c`` where ``m > ½``, else 0
    (``[B, F]``, no gradient); ``nonzero``: the number of non-zero entries of ``c`` per row."""

    out: torch.Tensor
    feature_acts: torch.Tensor
    nonzero: torch.Tensor


def lapsum_decode_reference(
    hidden_pre: torch.Tensor,
    k_hat: torch.Tensor,
    alpha: float,
    W_dec: torch.Tensor,
    k_max: float | None = None,
    dec_scale: torch.Tensor | None = None,
) -> SoftDecode:
    """Plain composition: ``c = ReLU(h) ⊙ lapsum_topk(ReLU(h), k̂, α, k_max)``, then the matmul."""
    z = hidden_pre.relu()
    mask = lapsum_topk(z, k_hat, alpha, k_max=k_max)
    code = z * mask
    scaled = code * dec_scale if dec_scale is not None else code
    feature_acts = torch.where(mask > 0.5, code, torch.zeros((), dtype=code.dtype)).detach()
    return SoftDecode(scaled @ W_dec, feature_acts, (code.detach() != 0).sum(dim=-1))


def _blocks(n_rows: int, rows: int, start: int = 0) -> list[slice]:
    return [slice(i, min(i + rows, start + n_rows)) for i in range(start, start + n_rows, rows)]


def _block_sizes(n_cols: int, block_rows: int | None) -> tuple[int, int]:
    """(rows per elementwise block, rows per matmul block: a multiple of the first)."""
    rows = block_rows or max(1, BLOCK_ELEMENTS // max(n_cols, 1))
    return rows, rows * max(1, MATMUL_ELEMENTS // max(n_cols * rows, 1))


def _block_code(
    z: torch.Tensor, tau: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, m, c)`` of a block of rows ``z``, as :class:`~sae_adaptive_plugin.ops.lapsum.LapSumTopK`
    computes them (``m`` = Laplace CDF of ``u``; ``c = z ⊙ m``)."""
    u = (z - tau.unsqueeze(-1)) / alpha
    e = torch.exp(-u.abs())
    m = torch.where(u <= 0, 0.5 * e, 1.0 - 0.5 * e)
    return u, m, z * m


class _LapSumDecode(torch.autograd.Function):
    """See :func:`lapsum_decode`. Outputs ``out``, ``feature_acts``, ``nonzero``. Rows go in
    matmul blocks (one matmul each way per block), each split into elementwise blocks."""

    @staticmethod
    def forward(ctx, hidden_pre, k_hat, W_dec, dec_scale, alpha, k_max, block_rows):  # type: ignore[override]
        n, f = hidden_pre.shape
        h = hidden_pre.detach()
        tau = torch.empty(n, dtype=h.dtype, device=h.device)
        out = h.new_empty((n, W_dec.shape[1]))
        feature_acts = torch.empty_like(h)
        nonzero = torch.empty(n, dtype=torch.long, device=h.device)
        zero = torch.zeros((), dtype=h.dtype, device=h.device)
        rows_ew, rows_mm = _block_sizes(f, block_rows)
        for outer in _blocks(n, rows_mm):
            scaled = h.new_empty((outer.stop - outer.start, f))  # c ⊙ s of the block
            for rows in _blocks(outer.stop - outer.start, rows_ew, outer.start):
                z = h[rows].relu()
                tau[rows] = lapsum_threshold(z, k_hat[rows].detach().to(h.dtype), alpha, k_max)
                _, m, c = _block_code(z, tau[rows], alpha)
                torch.where(m > 0.5, c, zero, out=feature_acts[rows])
                nonzero[rows] = (c != 0).sum(dim=-1)
                local = slice(rows.start - outer.start, rows.stop - outer.start)
                if dec_scale is not None:
                    torch.mul(c, dec_scale, out=scaled[local])
                else:
                    scaled[local] = c
            torch.mm(scaled, W_dec, out=out[outer])
        ctx.save_for_backward(hidden_pre, tau, W_dec, dec_scale)
        ctx.alpha, ctx.block_rows, ctx.k_dtype = alpha, block_rows, k_hat.dtype
        ctx.mark_non_differentiable(feature_acts, nonzero)
        ctx.set_materialize_grads(False)
        return out, feature_acts, nonzero

    @staticmethod
    def backward(ctx, grad_out, _grad_acts, _grad_nonzero):  # type: ignore[override]
        hidden_pre, tau, W_dec, dec_scale = ctx.saved_tensors
        if grad_out is None:
            return (None,) * 7
        need_h, need_k, need_w, need_s = ctx.needs_input_grad[:4]
        alpha = ctx.alpha
        n, f = hidden_pre.shape
        h_all = hidden_pre.detach()
        grad_h = torch.empty_like(h_all) if need_h else None
        grad_k = torch.empty(n, dtype=h_all.dtype, device=h_all.device)
        grad_w = torch.zeros_like(W_dec) if need_w else None
        grad_s = torch.zeros_like(dec_scale) if need_s else None
        zero = torch.zeros((), dtype=h_all.dtype, device=h_all.device)
        rows_ew, rows_mm = _block_sizes(f, ctx.block_rows)
        for outer in _blocks(n, rows_mm):
            g_out = grad_out[outer]
            grad_cs = g_out @ W_dec.t()  # ∂L/∂(c ⊙ s) of the block
            scaled = h_all.new_empty(grad_cs.shape) if need_w else None  # c ⊙ s
            for rows in _blocks(outer.stop - outer.start, rows_ew, outer.start):
                local = slice(rows.start - outer.start, rows.stop - outer.start)
                z = h_all[rows].relu()
                u, m, c = _block_code(z, tau[rows], alpha)
                grad_c = grad_cs[local]
                if dec_scale is not None:
                    if need_s:
                        grad_s += (c * grad_c).sum(dim=0)
                    grad_c.mul_(dec_scale)  # ∂L/∂c
                if need_w:
                    if dec_scale is not None:
                        torch.mul(c, dec_scale, out=scaled[local])
                    else:
                        scaled[local] = c
                neg_abs = u.abs_().neg_()
                g = grad_c * z  # ∂L/∂m
                w = torch.softmax(neg_abs, dim=-1)  # q / Σ q
                gk = (g * w).sum(dim=-1)
                grad_k[rows] = gk
                if need_h:
                    q = neg_abs.exp_().mul_(0.5 / alpha)
                    grad_z = grad_c.mul_(m).add_(q.mul_(g.sub_(gk.unsqueeze(-1))))
                    torch.where(z > 0, grad_z, zero, out=grad_h[rows])
            if need_w:
                grad_w.addmm_(scaled.t(), g_out)
        return (
            grad_h,
            grad_k.to(ctx.k_dtype) if need_k else None,
            grad_w,
            grad_s,
            None,
            None,
            None,
        )


def lapsum_decode(
    hidden_pre: torch.Tensor,
    k_hat: torch.Tensor,
    alpha: float | torch.Tensor,
    W_dec: torch.Tensor,
    k_max: float | None = None,
    dec_scale: torch.Tensor | None = None,
    block_rows: int | None = None,
) -> SoftDecode:
    """The soft code of ``hidden_pre`` ``[B, F]`` (float32 or float64) decoded through ``W_dec``
    ``[F, d_out]`` (see the module docstring), elementwise ``block_rows`` rows at a time
    (default: about ``BLOCK_ELEMENTS / F``), the decoder matmuls about ``MATMUL_ELEMENTS / F``
    rows at a time. Values and gradients (to ``hidden_pre``, ``k_hat``, ``W_dec``,
    ``dec_scale``) equal :func:`lapsum_decode_reference`'s to float rounding. ``k_max``, ``alpha``
    and ``k_hat`` as in :func:`~sae_adaptive_plugin.ops.lapsum.lapsum_topk` (``k̂ ≤ k_max``
    checked). Double backward is not supported."""
    if hidden_pre.ndim != 2:
        raise ValueError(f"hidden_pre must have shape [B, F], got {tuple(hidden_pre.shape)}")
    if _compute_dtype(hidden_pre.dtype) != hidden_pre.dtype:
        raise ValueError(f"hidden_pre must be float32 or float64, got {hidden_pre.dtype}")
    n, f = hidden_pre.shape
    if W_dec.shape[0] != f or W_dec.dtype != hidden_pre.dtype:
        raise ValueError(
            f"W_dec must have shape [F={f}, d_out] and dtype {hidden_pre.dtype}, "
            f"got {tuple(W_dec.shape)} {W_dec.dtype}"
        )
    if dec_scale is not None and dec_scale.shape != (f,):
        raise ValueError(f"dec_scale must have shape ({f},), got {tuple(dec_scale.shape)}")
    if block_rows is not None and (isinstance(block_rows, bool) or block_rows < 1):
        raise ValueError(f"block_rows must be None or an int >= 1, got {block_rows!r}")
    if k_hat.shape != (n,):
        raise ValueError(f"k_hat must have shape ({n},), got {tuple(k_hat.shape)}")
    alpha_f = float(alpha)
    if not (alpha_f > 0 and alpha_f < float("inf")):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha_f}")
    if k_max is not None and n and float(k_hat.detach().max()) > k_max:
        raise ValueError(
            f"k_hat must lie in [0, k_max={k_max}] when k_max is given, "
            f"got max {float(k_hat.detach().max())}"
        )
    out, feature_acts, nonzero = _LapSumDecode.apply(
        hidden_pre, k_hat, W_dec, dec_scale, alpha_f, k_max, block_rows
    )
    return SoftDecode(out, feature_acts, nonzero)
