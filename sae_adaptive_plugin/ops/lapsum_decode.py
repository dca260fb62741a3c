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

from sae_adaptive_plugin.ops.dispatch import (
    accumulation_dtype,
    autocast_dtype,
    autocast_off,
    host_check_is_free,
)
from sae_adaptive_plugin.ops.dispatch import (
    block_rows as _block_rows,
)
from sae_adaptive_plugin.ops.lapsum import lapsum_threshold, lapsum_topk

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


def _block_sizes(
    n_rows: int, n_cols: int, block_rows: int | None, device_type: str
) -> tuple[int, int]:
    """(rows per elementwise block, rows per matmul block: a multiple of the first). CPU: about
    ``BLOCK_ELEMENTS`` and ``MATMUL_ELEMENTS`` elements; an accelerator: one level of
    :func:`~sae_adaptive_plugin.ops.dispatch.block_rows` (at most a few blocks, whatever F)."""
    if device_type != "cpu":
        rows = block_rows or _block_rows(n_rows, n_cols, device_type, BLOCK_ELEMENTS)
        return rows, rows
    rows = block_rows or max(1, BLOCK_ELEMENTS // max(n_cols, 1))
    return rows, rows * max(1, MATMUL_ELEMENTS // max(n_cols * rows, 1))


def _store(dst: torch.Tensor, dtype: torch.dtype, op, *args) -> None:
    """``dst[...] = op(*args)`` (whose result has ``dtype``), with no temporary when ``dst`` has
    that dtype."""
    if dst.dtype == dtype:
        op(*args, out=dst)
    else:
        dst.copy_(op(*args))


def _block_code(
    z: torch.Tensor, tau: torch.Tensor, alpha: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, m, c)`` of a block of rows ``z``, as :class:`~sae_adaptive_plugin.ops.lapsum.LapSumTopK`
    computes them (``m`` = Laplace CDF of ``u``; ``c = z ⊙ m``)."""
    u = (z - tau.unsqueeze(-1)) / alpha
    e = torch.exp(-u.abs())
    m = torch.where(u <= 0, 0.5 * e, 1.0 - 0.5 * e)
    return u, m, z * m


class _LapSumDecode(torch.autograd.Function):
    """See :func:`lapsum_decode`. Outputs ``out``, ``feature_acts``, ``nonzero``. Rows go in
    matmul blocks (one matmul each way per block), each split into elementwise blocks. The code
    is computed in the accumulation dtype (at least float32), the matmuls in ``W_dec``'s."""

    @staticmethod
    @autocast_off
    def forward(ctx, hidden_pre, k_hat, W_dec, dec_scale, alpha, k_max, block_rows):  # type: ignore[override]
        n, f = hidden_pre.shape
        h = hidden_pre.detach()
        acc = accumulation_dtype(h.dtype)
        scale = dec_scale.detach().to(acc) if dec_scale is not None else None
        tau = torch.empty(n, dtype=acc, device=h.device)
        out = h.new_empty((n, W_dec.shape[1]), dtype=W_dec.dtype)
        feature_acts = torch.empty_like(h)
        nonzero = torch.empty(n, dtype=torch.long, device=h.device)
        zero = torch.zeros((), dtype=acc, device=h.device)
        rows_ew, rows_mm = _block_sizes(n, f, block_rows, h.device.type)
        for outer in _blocks(n, rows_mm):
            scaled = out.new_empty((outer.stop - outer.start, f))  # c ⊙ s of the block
            for rows in _blocks(outer.stop - outer.start, rows_ew, outer.start):
                z = h[rows].to(acc).relu()
                k_rows = k_hat[rows].detach().to(acc)
                if k_max is not None:
                    k_rows = k_rows.clamp(max=k_max)
                tau[rows] = lapsum_threshold(z, k_rows, alpha, k_max)
                _, m, c = _block_code(z, tau[rows], alpha)
                _store(feature_acts[rows], acc, torch.where, m > 0.5, c, zero)
                nonzero[rows] = (c != 0).sum(dim=-1)
                local = slice(rows.start - outer.start, rows.stop - outer.start)
                if scale is not None:
                    _store(scaled[local], acc, torch.mul, c, scale)
                else:
                    scaled[local] = c
            torch.mm(scaled, W_dec, out=out[outer])
        ctx.save_for_backward(hidden_pre, tau, W_dec, dec_scale)
        ctx.alpha, ctx.block_rows, ctx.k_dtype = alpha, block_rows, k_hat.dtype
        ctx.mark_non_differentiable(feature_acts, nonzero)
        ctx.set_materialize_grads(False)
        return out, feature_acts, nonzero

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out, _grad_acts, _grad_nonzero):  # type: ignore[override]
        hidden_pre, tau, W_dec, dec_scale = ctx.saved_tensors
        if grad_out is None:
            return (None,) * 7
        need_h, need_k, need_w, need_s = ctx.needs_input_grad[:4]
        alpha = ctx.alpha
        n, f = hidden_pre.shape
        h_all = hidden_pre.detach()
        acc = tau.dtype
        scale = dec_scale.detach().to(acc) if dec_scale is not None else None
        grad_out = grad_out.to(W_dec.dtype)
        grad_h = torch.empty_like(h_all) if need_h else None
        grad_k = torch.empty(n, dtype=acc, device=h_all.device)
        grad_w = torch.zeros(W_dec.shape, dtype=acc, device=W_dec.device) if need_w else None
        grad_s = torch.zeros(f, dtype=acc, device=h_all.device) if need_s else None
        zero = torch.zeros((), dtype=acc, device=h_all.device)
        rows_ew, rows_mm = _block_sizes(n, f, ctx.block_rows, h_all.device.type)
        for outer in _blocks(n, rows_mm):
            g_out = grad_out[outer]
            grad_cs = g_out @ W_dec.t()  # ∂L/∂(c ⊙ s) of the block
            scaled = grad_cs.new_empty(grad_cs.shape) if need_w else None  # c ⊙ s
            for rows in _blocks(outer.stop - outer.start, rows_ew, outer.start):
                local = slice(rows.start - outer.start, rows.stop - outer.start)
                z = h_all[rows].to(acc).relu()
                u, m, c = _block_code(z, tau[rows], alpha)
                grad_c = grad_cs[local].to(acc)
                if scale is not None:
                    if need_s:
                        grad_s += (c * grad_c).sum(dim=0)
                    grad_c.mul_(scale)  # ∂L/∂c
                if need_w and scale is not None:
                    _store(scaled[local], acc, torch.mul, c, scale)
                elif need_w:
                    scaled[local] = c
                neg_abs = u.abs_().neg_()
                g = grad_c * z  # ∂L/∂m
                w = torch.softmax(neg_abs, dim=-1)  # q / Σ q
                gk = (g * w).sum(dim=-1)
                grad_k[rows] = gk
                if need_h:
                    q = neg_abs.exp_().mul_(0.5 / alpha)
                    grad_z = grad_c.mul_(m).add_(q.mul_(g.sub_(gk.unsqueeze(-1))))
                    _store(grad_h[rows], acc, torch.where, z > 0, grad_z, zero)
            if need_w:
                if grad_w.dtype == scaled.dtype:
                    grad_w.addmm_(scaled.t(), g_out)
                else:  # a bf16/fp16 product, summed over blocks in float32
                    grad_w += scaled.t() @ g_out
        return (
            grad_h,
            grad_k.to(ctx.k_dtype) if need_k else None,
            grad_w.to(W_dec.dtype) if need_w else None,
            grad_s.to(dec_scale.dtype) if need_s else None,
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
    """The soft code of ``hidden_pre`` ``[B, F]`` decoded through ``W_dec`` ``[F, d_out]`` (see the
    module docstring), a block of rows at a time (:func:`_block_sizes`; ``block_rows`` fixes the
    elementwise block). Values and gradients (to ``hidden_pre``, ``k_hat``, ``W_dec``,
    ``dec_scale``) equal :func:`lapsum_decode_reference`'s to float rounding. The code runs in at
    least float32 whatever ``hidden_pre``'s dtype (``feature_acts`` and ``∂L/∂h`` come back in it);
    the decoder matmuls in ``W_dec``'s dtype, under autocast in the autocast dtype. ``alpha``: a
    positive number, or a 0-dim tensor (kept on its device: not checked, no host sync). ``k_max``
    and ``k_hat`` as in :func:`~sae_adaptive_plugin.ops.lapsum.lapsum_topk`: ``k̂ ≤ k_max`` is
    checked on the CPU; elsewhere (a check would sync) ``k̂`` is clamped to ``k_max``. Double
    backward is not supported."""
    if hidden_pre.ndim != 2 or not hidden_pre.dtype.is_floating_point:
        raise ValueError(
            f"hidden_pre must be a floating-point [B, F] tensor, got {tuple(hidden_pre.shape)} "
            f"{hidden_pre.dtype}"
        )
    n, f = hidden_pre.shape
    low = autocast_dtype(hidden_pre.device.type)
    if low is not None:  # what autocast does to the decoder matmul
        W_dec = W_dec.to(low)
    if W_dec.ndim != 2 or W_dec.shape[0] != f or not W_dec.dtype.is_floating_point:
        raise ValueError(
            f"W_dec must be a floating-point [F={f}, d_out] tensor, "
            f"got {tuple(W_dec.shape)} {W_dec.dtype}"
        )
    if dec_scale is not None and dec_scale.shape != (f,):
        raise ValueError(f"dec_scale must have shape ({f},), got {tuple(dec_scale.shape)}")
    if block_rows is not None and (isinstance(block_rows, bool) or block_rows < 1):
        raise ValueError(f"block_rows must be None or an int >= 1, got {block_rows!r}")
    if k_hat.shape != (n,):
        raise ValueError(f"k_hat must have shape ({n},), got {tuple(k_hat.shape)}")
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"alpha must be a number or a 0-dim tensor, got {tuple(alpha.shape)}")
        alpha = (
            alpha.detach().reshape(()).to(hidden_pre.device, accumulation_dtype(hidden_pre.dtype))
        )
    elif not (alpha > 0 and alpha < float("inf")):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    else:
        alpha = float(alpha)
    if (
        k_max is not None
        and n
        and host_check_is_free(k_hat)
        and float(k_hat.detach().max()) > k_max
    ):
        raise ValueError(
            f"k_hat must lie in [0, k_max={k_max}] when k_max is given, "
            f"got max {float(k_hat.detach().max())}"
        )
    out, feature_acts, nonzero = _LapSumDecode.apply(
        hidden_pre, k_hat, W_dec, dec_scale, alpha, k_max, block_rows
    )
    return SoftDecode(out, feature_acts, nonzero)
