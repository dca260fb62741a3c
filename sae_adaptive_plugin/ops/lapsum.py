"""LapSum soft top-k: a differentiable mask with a prescribed sum per row, in pure PyTorch.

For scores ``s`` (one row of ``F``), a target ``k̂ ∈ [0, F]`` and a scale ``α > 0`` the mask is
``m_j = F_L((s_j − τ)/α)`` (``F_L`` the Laplace CDF) with ``τ`` chosen so that ``Σ_j m_j = k̂``;
``α → 0`` gives the hard top-k indicator. :class:`LapSumTopK` finds ``τ`` exactly (sort, one
closed-form root per interval; with ``k_max`` only the top ``2⌈k_max⌉ + 2`` entries are sorted) in
at least float32, and its backward is the closed form of implicit differentiation of ``Σ m = k̂``
(``α`` gets no gradient; ``k̂`` clamped to ``[0, F]``). The derivation, the numerics and the memory
held: docs/METHODS.md ("LapSum: the exact threshold and its backward"); timings of the solve:
docs/bench.md. :func:`lapsum_threshold_bisect` and :func:`lapsum_topk_reference` (bisection, then
autograd through one implicit-function step) are the plain references the tests compare against.
"""

from __future__ import annotations

import math

import torch

from sae_adaptive_plugin.ops.dispatch import host_check_is_free

#: ``τ`` stays within ``[min(s) − SATURATION·α, max(s) + SATURATION·α]``; ½e^{−40} ≈ 2e−18 is
#: below the float64 epsilon, so the mask there is exactly 0 or 1 in every supported dtype.
SATURATION = 40.0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def laplace_cdf(u: torch.Tensor) -> torch.Tensor:
    """``F_L(u)``: ``½eᵘ`` for ``u ≤ 0``, ``1 − ½e⁻ᵘ`` for ``u > 0`` (no overflow for any ``u``)."""
    e = torch.exp(-u.abs())
    return torch.where(u <= 0, 0.5 * e, 1.0 - 0.5 * e)


def _check_inputs(scores: torch.Tensor, k_hat: torch.Tensor, alpha: float | torch.Tensor) -> None:
    if scores.ndim < 1 or scores.shape[-1] < 1:
        raise ValueError(f"scores must have shape [..., F] with F >= 1, got {tuple(scores.shape)}")
    if k_hat.shape != scores.shape[:-1]:
        raise ValueError(
            f"k_hat must have shape scores.shape[:-1] = {tuple(scores.shape[:-1])}, "
            f"got {tuple(k_hat.shape)}"
        )
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"alpha must be a scalar, got shape {tuple(alpha.shape)}")
    elif not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")


def _top_m(k_max: float | None, n_f: int) -> int:
    """Entries the solve needs: ``2⌈k_max⌉ + 2`` (the whole row without a ``k_max``)."""
    return n_f if k_max is None else min(n_f, 2 * math.ceil(k_max) + 2)


def lapsum_threshold(
    scores: torch.Tensor, k_hat: torch.Tensor, alpha: float, k_max: float | None = None
) -> torch.Tensor:
    """Exact threshold ``τ`` ``[...]`` with ``Σ_j F_L((s_j − τ)/α) = k̂`` per row (no gradient).

    ``scores`` ``[..., F]`` and ``k_hat`` ``[...]`` must already be in the compute dtype
    (float32 or float64); see the module docstring for the method. With ``k_max`` (every
    ``k̂ ≤ k_max``, not checked here) only the top ``m = 2⌈k_max⌉ + 2`` entries of each row are
    sorted; the others enter through one logsumexp. Without it the whole row is sorted.
    """
    n_f = scores.shape[-1]
    m = _top_m(k_max, n_f)
    neg_inf = torch.full_like(scores[..., :1], -math.inf)
    if m < n_f:
        top = scores.topk(m, dim=-1, sorted=True)
        v = top.values  # v_1 ≥ … ≥ v_m
        rest = scores / alpha
        rest.scatter_(-1, top.indices, -math.inf)
        l_tail = torch.logsumexp(rest, dim=-1, keepdim=True)  # log Σ_{j>m} e^{x_j}
        del rest, top
        v_min = scores.amin(dim=-1, keepdim=True)
    else:
        v = scores.sort(dim=-1, descending=True).values  # v_1 ≥ … ≥ v_F
        l_tail = None
        v_min = v[..., -1:]
    x = v / alpha
    k = k_hat.clamp(0, n_f).unsqueeze(-1)
    # lp[i] = log Σ_{j<i} e^{−x_j},  lq[i] = log Σ_{j>i} e^{x_j}   (0-based, exclusive, j over
    # the whole row; the entries below v_m only ever appear in lq, through l_tail)
    lp_incl = torch.logcumsumexp(-x, dim=-1)  # log Σ_{j≤i} e^{−x_j}
    lq_incl = torch.logcumsumexp(x.flip(-1), dim=-1).flip(-1)  # log Σ_{j≥i} e^{x_j}
    if l_tail is not None:
        lq_incl = torch.logaddexp(lq_incl, l_tail)
    lp = torch.cat([neg_inf, lp_incl[..., :-1]], dim=-1)
    lq = torch.cat([lq_incl[..., 1:], neg_inf if l_tail is None else l_tail], dim=-1)
    idx = torch.arange(m, device=x.device, dtype=x.dtype)
    # S at τ = v_i: i entries above (u > 0), entry i at u = 0 (½), the rest below
    s_at = idx + 0.5 - 0.5 * torch.exp(lp + x) + 0.5 * torch.exp(lq - x)
    s_at = torch.cummax(s_at, dim=-1).values  # S is non-decreasing in i; remove rounding wiggles
    # solution in [v_{p+1}, v_p] (1-based), p ∈ [0, m]. With m < F, p < m: at τ = v_m the m − 1
    # entries above weigh ≥ ½ each and v_m itself ½, so S(v_m) ≥ m/2 = ⌈k_max⌉ + 1 > k̂, and
    # every entry the solve reads lies in the top m.
    p = (s_at <= k).sum(dim=-1, keepdim=True)

    # interval p ∈ [1, F-1] (0-based ends ia = p-1 above, ib = p below). With y = e^{(τ − v_p)/α}:
    # a y² − 2 d y − b = 0, d = p − k̂, a = Σ_{j≤p} e^{x_p − x_j} ≥ 1, b = Σ_{j>p} e^{x_j − x_p}.
    # For d ≥ 0 the root (d + r)/a is anchored at v_p; for d < 0 the equivalent b/(r − d) is
    # anchored at v_{p+1} (b' = b·e^{x_p − x_{p+1}} ≥ 1), so neither under- nor overflows.
    ia = (p - 1).clamp(0, m - 1)
    ib = p.clamp(0, m - 1)
    x_a, x_b = x.gather(-1, ia), x.gather(-1, ib)
    log_a = lp_incl.gather(-1, ia) + x_a
    log_b_low = lq_incl.gather(-1, ib) - x_b
    log_ab = log_a + log_b_low + (x_b - x_a)
    d = p.to(x.dtype) - k
    r = torch.sqrt(d * d + torch.exp(log_ab))
    # d = 0: log(d + r) = ½ log(ab), kept finite when ab underflows (τ mid-gap)
    log_d_r = torch.where(d > 0, torch.log(d + r), 0.5 * log_ab)
    tau_mid = torch.where(
        d >= 0,
        v.gather(-1, ia) + alpha * (log_d_r - log_a),
        v.gather(-1, ib) + alpha * (log_b_low - torch.log(r - d)),
    )
    tau_mid = torch.minimum(torch.maximum(tau_mid, v.gather(-1, ib)), v.gather(-1, ia))

    # p = 0: every entry below τ, S = ½ Σ e^{x_j − τ/α}
    l_all = torch.logsumexp(x, dim=-1, keepdim=True)
    if l_tail is not None:
        l_all = torch.logaddexp(l_all, l_tail)
    tau_top = alpha * (l_all - torch.log(2 * k))
    tau_top = torch.maximum(tau_top, v[..., :1])
    # p = F (only when the whole row is sorted): every entry above τ, S = F − ½ Σ e^{τ/α − x_j}
    tau_bot = alpha * (torch.log(2 * (n_f - k)) - torch.logsumexp(-x, dim=-1, keepdim=True))
    tau_bot = torch.minimum(tau_bot, v[..., -1:])

    tau = torch.where(p == 0, tau_top, torch.where(p == n_f, tau_bot, tau_mid))
    lo = v_min - SATURATION * alpha
    hi = v[..., :1] + SATURATION * alpha
    return torch.minimum(torch.maximum(tau, lo), hi).squeeze(-1)


@torch.no_grad()
def lapsum_threshold_bisect(
    scores: torch.Tensor, k_hat: torch.Tensor, alpha: float, n_iter: int = 40
) -> torch.Tensor:
    """Reference threshold by bisection on ``[min(s) − 40α, max(s) + 40α]`` (``n_iter`` halvings)."""
    k = k_hat.clamp(0, scores.shape[-1])
    lo = scores.amin(dim=-1) - SATURATION * alpha
    hi = scores.amax(dim=-1) + SATURATION * alpha
    for _ in range(n_iter):
        mid = 0.5 * (lo + hi)
        total = laplace_cdf((scores - mid.unsqueeze(-1)) / alpha).sum(dim=-1)
        above = total > k  # too many kept: raise τ
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


class LapSumTopK(torch.autograd.Function):
    """``m = LapSumTopK.apply(scores [..., F], k_hat [...], alpha, k_max)``: see the module
    docstring (``k_max``: ``None`` or an upper bound of every ``k̂``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, scores: torch.Tensor, k_hat: torch.Tensor, alpha: float, k_max: float | None = None
    ) -> torch.Tensor:
        dtype = _compute_dtype(scores.dtype)
        if isinstance(alpha, torch.Tensor):  # kept on the device: float() would sync
            alpha = alpha.detach().reshape(()).to(scores.device, dtype)
        s = scores.detach().to(dtype)
        k = k_hat.detach().to(dtype)
        if k_max is not None:
            k = k.clamp(max=k_max)
        tau = lapsum_threshold(s, k, alpha, k_max)
        u = (s - tau.unsqueeze(-1)) / alpha
        ctx.save_for_backward(u)
        ctx.alpha = alpha
        ctx.k_dtype = k_hat.dtype
        return laplace_cdf(u).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_m: torch.Tensor):  # type: ignore[override]
        (u,) = ctx.saved_tensors
        g = grad_m.to(u.dtype)
        neg_abs = -u.abs()
        w = torch.softmax(neg_abs, dim=-1)  # q_j / Σ q
        grad_k = (g * w).sum(dim=-1)
        grad_s = None
        if ctx.needs_input_grad[0]:
            q = 0.5 * torch.exp(neg_abs) / ctx.alpha
            grad_s = (q * (g - grad_k.unsqueeze(-1))).to(grad_m.dtype)
        grad_k_out = grad_k.to(ctx.k_dtype) if ctx.needs_input_grad[1] else None
        return grad_s, grad_k_out, None, None


def lapsum_topk(
    scores: torch.Tensor,
    k_hat: torch.Tensor | float,
    alpha: float | torch.Tensor,
    k_max: float | None = None,
) -> torch.Tensor:
    """Soft top-k mask ``[..., F]`` with ``Σ m = k̂`` per row; differentiable in scores and ``k̂``.

    ``k_hat`` is a tensor of shape ``scores.shape[:-1]`` (or a number for every row); ``alpha`` a
    positive number, or a 0-dim tensor (no gradient; kept on its device, its sign unchecked, so no
    host sync). ``k_max``: an upper bound of every ``k̂`` (checked on the CPU; elsewhere, where
    the check would sync, ``k̂`` is clamped to it); the threshold is then solved from each row's
    top ``2⌈k_max⌉ + 2`` entries instead of a full sort, with the same result. ``None``: full sort.
    """
    if not isinstance(k_hat, torch.Tensor):
        k_hat = torch.full(scores.shape[:-1], float(k_hat), device=scores.device)
    _check_inputs(scores, k_hat, alpha)
    if not isinstance(alpha, torch.Tensor):
        alpha = float(alpha)
    if k_max is not None:
        if isinstance(k_max, bool) or not (
            isinstance(k_max, (int, float)) and math.isfinite(k_max) and k_max >= 0
        ):
            raise ValueError(f"k_max must be None or a finite number >= 0, got {k_max!r}")
        if k_hat.numel() and host_check_is_free(k_hat) and float(k_hat.detach().max()) > k_max:
            raise ValueError(
                f"k_hat must lie in [0, k_max={k_max}] when k_max is given, "
                f"got max {float(k_hat.detach().max())}"
            )
    return LapSumTopK.apply(scores, k_hat, alpha, k_max)


def lapsum_topk_reference(
    scores: torch.Tensor, k_hat: torch.Tensor, alpha: float, n_iter: int = 100
) -> torch.Tensor:
    """Plain reference: bisection for ``τ``, then autograd through one implicit-function step.

    ``τ_d = τ* + (Σ_j F_L((s_j − τ*)/α) − k̂) / Σ_j q_j`` (``τ*`` and the denominator detached)
    equals ``τ*`` in value and has the implicit derivatives ``∂τ/∂s_j = q_j/Σq``,
    ``∂τ/∂k̂ = −1/Σq``; the mask ``F_L((s − τ_d)/α)`` is then differentiated by autograd.
    """
    tau = lapsum_threshold_bisect(scores.detach(), k_hat.detach(), alpha, n_iter=n_iter)
    u = (scores - tau.unsqueeze(-1)) / alpha
    q = (0.5 * torch.exp(-u.abs()) / alpha).detach()
    total = laplace_cdf(u).sum(dim=-1)
    tau_d = tau + (total - k_hat.clamp(0, scores.shape[-1])) / q.sum(dim=-1)
    return laplace_cdf((scores - tau_d.unsqueeze(-1)) / alpha)
