"""Tests of the LapSum soft top-k (``ops/lapsum.py``): exact threshold, closed-form backward, limits."""

from __future__ import annotations

import math

import pytest
import torch

from sae_adaptive_plugin.ops.lapsum import (
    laplace_cdf,
    lapsum_threshold,
    lapsum_threshold_bisect,
    lapsum_topk,
    lapsum_topk_reference,
)


def _scores(rows: int, f: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, f, generator=g, dtype=dtype) * 2


def _mixed_scores(f: int = 64) -> torch.Tensor:
    """Rows with ties, many zeros (post-ReLU), integer-valued and well-separated scores."""
    s = _scores(12, f)
    s[0:3] = s[0:3].relu()  # about half exact zeros
    s[3:6] = s[3:6].round()  # many ties
    s[6, :] = 1.5  # all equal
    s[7, : f // 2] = 0.0
    s[8] = torch.linspace(-50, 50, f, dtype=s.dtype)  # gaps ≫ α
    return s


@pytest.mark.parametrize("alpha", [2.0, 0.5, 1e-2, 1e-4])
def test_row_sums_equal_k_hat_float64(alpha: float) -> None:
    s = _mixed_scores()
    f = s.shape[-1]
    k_hat = torch.linspace(1.0, float(f), s.shape[0], dtype=s.dtype)
    k_hat[1] = 2.0  # integer k̂ right at a breakpoint of separated scores
    m = lapsum_topk(s, k_hat, alpha)
    assert torch.all((m >= 0) & (m <= 1))
    torch.testing.assert_close(m.sum(-1), k_hat, rtol=0, atol=1e-9)


@pytest.mark.parametrize("alpha", [1.0, 1e-2, 1e-4])
def test_threshold_matches_bisection(alpha: float) -> None:
    s = _scores(16, 50)
    k_hat = torch.rand(16, dtype=s.dtype) * 48 + 1
    tau = lapsum_threshold(s, k_hat, alpha)
    tau_ref = lapsum_threshold_bisect(s, k_hat, alpha, n_iter=200)
    # τ is unique here (continuous random scores, 0 < k̂ < F), so both must agree
    torch.testing.assert_close(tau, tau_ref, rtol=0, atol=1e-9 * max(alpha, 1.0))


def test_float32_row_sums_within_dtype_floor() -> None:
    s = _mixed_scores(128).float()
    k_hat = torch.linspace(1.0, 128.0, s.shape[0])
    for alpha in (1.0, 1e-2, 1e-4):
        m = lapsum_topk(s, k_hat, alpha)
        assert m.dtype == torch.float32
        # the floor is about |s|·ε/α per entry near the threshold (module docstring)
        tol = 64 * s.abs().max().item() * torch.finfo(torch.float32).eps / alpha + 1e-5
        assert (m.sum(-1) - k_hat).abs().max().item() <= tol


def test_gradcheck_float64() -> None:
    s = _scores(3, 7).requires_grad_()
    k_hat = torch.tensor([1.3, 3.0, 5.9], dtype=torch.float64, requires_grad=True)
    for alpha in (0.7, 0.1):
        assert torch.autograd.gradcheck(
            lambda a, b, al=alpha: lapsum_topk(a, b, al), (s, k_hat), eps=1e-6, atol=1e-6
        )


def test_gradcheck_with_ties_and_zeros() -> None:
    s = torch.tensor([[0.0, 0.0, 0.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0, -1.0]], dtype=torch.float64)
    s.requires_grad_()
    k_hat = torch.tensor([2.5, 2.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: lapsum_topk(a, b, 0.5), (s, k_hat), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("alpha", [1.0, 0.05])
def test_backward_matches_reference(alpha: float) -> None:
    s = _scores(8, 30).requires_grad_()
    k_hat = (torch.rand(8, dtype=torch.float64) * 25 + 2).requires_grad_()
    g = torch.randn(8, 30, dtype=torch.float64)
    m = lapsum_topk(s, k_hat, alpha)
    gs, gk = torch.autograd.grad((m * g).sum(), (s, k_hat))
    m_ref = lapsum_topk_reference(s, k_hat, alpha)
    gs_ref, gk_ref = torch.autograd.grad((m_ref * g).sum(), (s, k_hat))
    torch.testing.assert_close(m, m_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(gs, gs_ref, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gk, gk_ref, rtol=1e-6, atol=1e-8)


def test_mask_is_laplace_cdf_of_threshold() -> None:
    s = _scores(4, 20)
    k_hat = torch.tensor([1.0, 4.5, 10.0, 19.0], dtype=torch.float64)
    m = lapsum_topk(s, k_hat, 0.3)
    tau = lapsum_threshold(s, k_hat, 0.3)
    torch.testing.assert_close(m, laplace_cdf((s - tau[:, None]) / 0.3))


def test_small_alpha_is_hard_topk() -> None:
    s = _scores(32, 40)
    for k in (1, 5, 39):
        m = lapsum_topk(s, torch.full((32,), float(k), dtype=s.dtype), 1e-6)
        hard = torch.zeros_like(s).scatter(-1, s.topk(k).indices, 1.0)
        torch.testing.assert_close(m, hard, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_stable(dtype: torch.dtype) -> None:
    s = (_scores(16, 256, dtype=torch.float32) * 4).to(dtype).requires_grad_()
    k_hat = torch.linspace(1, 256, 16)
    for alpha in (0.99, 1e-2, 1e-4):
        m = lapsum_topk(s, k_hat, alpha)
        assert m.dtype == dtype and torch.isfinite(m).all()
        # solved in float32 from the rounded scores: each entry of the mask is rounded to the
        # output dtype (relative error ≤ ε/2), plus the float32 floor of the solve
        floor32 = 64 * s.detach().float().abs().max().item() * 1.2e-7 / alpha
        tol = k_hat * torch.finfo(dtype).eps + floor32 + 1e-5
        assert ((m.float().sum(-1) - k_hat).abs() <= tol).all()
        (m.float() * torch.randn(16, 256)).sum().backward()
        assert torch.isfinite(s.grad).all()
        s.grad = None


def test_k_hat_at_one_and_at_f() -> None:
    s = _scores(6, 10).requires_grad_()
    k_hat = torch.tensor([1.0, 10.0, 1.0, 10.0, 0.0, 10.0], dtype=s.dtype, requires_grad=True)
    m = lapsum_topk(s, k_hat, 0.2)
    torch.testing.assert_close(m.sum(-1), k_hat.detach(), rtol=0, atol=1e-9)
    torch.testing.assert_close(m[1], torch.ones(10, dtype=s.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(m[4], torch.zeros(10, dtype=s.dtype), rtol=0, atol=1e-12)
    gs, gk = torch.autograd.grad((m * torch.randn_like(m)).sum(), (s, k_hat))
    assert torch.isfinite(gs).all() and torch.isfinite(gk).all()


def test_rows_with_fewer_positive_scores_than_k_hat() -> None:
    """Post-ReLU rows with 2 positive entries and k̂ = 6: the zeros share the remaining mass."""
    s = torch.zeros(2, 12, dtype=torch.float64)
    s[:, 0], s[:, 1] = 3.0, 2.0
    k_hat = torch.tensor([6.0, 6.0], dtype=torch.float64, requires_grad=True)
    for alpha in (1.0, 1e-3):
        m = lapsum_topk(s, k_hat, alpha)
        torch.testing.assert_close(m.sum(-1), k_hat.detach(), rtol=0, atol=1e-9)
        torch.testing.assert_close(m[:, 2:], torch.full_like(m[:, 2:], m[0, 2].item()))
        assert m[0, 0] >= m[0, 1] >= m[0, 2]
        (gk,) = torch.autograd.grad(m[:, 2:].sum(), k_hat)
        assert torch.isfinite(gk).all() and (gk > 0).all()


def test_k_hat_is_clamped_and_inputs_validated() -> None:
    s = _scores(2, 5)
    m = lapsum_topk(s, torch.tensor([7.0, -1.0], dtype=s.dtype), 0.5)
    torch.testing.assert_close(m.sum(-1), torch.tensor([5.0, 0.0], dtype=s.dtype))
    with pytest.raises(ValueError, match="alpha"):
        lapsum_topk(s, 2.0, 0.0)
    with pytest.raises(ValueError, match="k_hat"):
        lapsum_topk(s, torch.ones(3), 0.5)


def test_leading_batch_dims() -> None:
    s = _scores(6, 9).reshape(2, 3, 9)
    k_hat = torch.rand(2, 3, dtype=s.dtype) * 8 + 0.5
    m = lapsum_topk(s, k_hat, 0.3)
    assert m.shape == s.shape
    torch.testing.assert_close(m.reshape(6, 9), lapsum_topk(s.reshape(6, 9), k_hat.reshape(6), 0.3))


# ------------------------------------------------ top-m solve (k_max given) vs the full sort


def _k_hat_up_to(k_max: float, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """k̂ spread over [0, k_max], with rows at and just below k_max, at 0 and at integers."""
    g = torch.Generator().manual_seed(5)
    k_hat = torch.rand(rows, generator=g, dtype=torch.float64) * k_max
    k_hat[0], k_hat[1], k_hat[2] = k_max, k_max - 1e-6, 0.0
    k_hat[3] = math.floor(k_max)
    return k_hat.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha", [2.0, 0.5, 1e-2, 1e-4])
@pytest.mark.parametrize("k_max", [10, 12.5])
def test_top_m_threshold_matches_full_sort(dtype: torch.dtype, alpha: float, k_max) -> None:
    s = torch.cat([_mixed_scores(96), _scores(8, 96, seed=1)]).to(dtype)
    s[12] = s[12].round()  # ties straddling the top-m cut (m = 2⌈k_max⌉ + 2 < F = 96)
    k_hat = _k_hat_up_to(k_max, s.shape[0], dtype)
    tau_m = lapsum_threshold(s, k_hat, alpha, k_max=k_max)
    tau_f = lapsum_threshold(s, k_hat, alpha)
    eps = torch.finfo(dtype).eps
    tol = 16 * eps * (s.abs().max().item() + alpha * 40)  # a few ulps of τ
    torch.testing.assert_close(tau_m, tau_f, rtol=0, atol=tol)
    m = laplace_cdf((s - tau_m.unsqueeze(-1)) / alpha)
    floor = 64 * s.abs().max().item() * eps / alpha + (1e-9 if dtype == torch.float64 else 1e-5)
    assert (m.sum(-1) - k_hat).abs().max().item() <= floor


@pytest.mark.parametrize("alpha", [1.0, 1e-2, 1e-4])
def test_top_m_threshold_matches_bisection(alpha: float) -> None:
    s = _scores(16, 200)
    k_hat = _k_hat_up_to(20, 16, s.dtype).clamp_min(0.5)
    k_hat[0], k_hat[3] = 20 - 1e-3, 7.5  # non-integer k̂ ∈ (0, F): τ is well determined
    tau = lapsum_threshold(s, k_hat, alpha, k_max=20)
    tau_ref = lapsum_threshold_bisect(s, k_hat, alpha, n_iter=200)
    torch.testing.assert_close(tau, tau_ref, rtol=0, atol=1e-9 * max(alpha, 1.0))


@pytest.mark.parametrize("alpha", [0.5, 1e-2])
def test_top_m_mask_and_gradients_match_full_sort_float64(alpha: float) -> None:
    s = _mixed_scores(80).requires_grad_()
    k_hat = _k_hat_up_to(9, s.shape[0], s.dtype).requires_grad_()
    upstream = torch.randn(s.shape, dtype=s.dtype, generator=torch.Generator().manual_seed(2))
    out = {}
    for k_max in (9, None):
        m = lapsum_topk(s, k_hat, alpha, k_max=k_max)
        out[k_max] = (m, *torch.autograd.grad((m * upstream).sum(), (s, k_hat)))
    for a, b in zip(out[9], out[None]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_k_max_validated_and_large_k_max_is_the_full_sort() -> None:
    s = _scores(3, 10)
    k_hat = torch.tensor([1.0, 4.0, 6.0], dtype=s.dtype)
    with pytest.raises(ValueError, match=r"k_hat must lie in \[0, k_max=5\]"):
        lapsum_topk(s, k_hat, 0.5, k_max=5)
    with pytest.raises(ValueError, match="k_max"):
        lapsum_topk(s, k_hat, 0.5, k_max=-1)
    # m = 2⌈k_max⌉ + 2 ≥ F: the whole row is sorted, bit for bit the same
    assert torch.equal(lapsum_topk(s, k_hat, 0.5, k_max=6), lapsum_topk(s, k_hat, 0.5))
