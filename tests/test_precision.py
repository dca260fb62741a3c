"""Every op in bfloat16 and under CPU autocast (the dispatch CUDA autocast takes too): results
within bfloat16 rounding of the plain reference, sums and Gram forms in float32."""

from __future__ import annotations

import pytest
import torch

from sae_adaptive_plugin.ops.adaptive_k import kstar_from_prefix_errors
from sae_adaptive_plugin.ops.hierarchical import (
    hierarchical_loss,
    hierarchical_loss_naive,
    prefix_reconstruction_errors,
    prefix_reconstruction_errors_naive,
)

BF16 = torch.bfloat16


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.double() - want.double()).abs() / want.double().abs()).max())


# -- prefix errors: the Gram form ‖e₀‖² − 2Σac + ΣΣaaG cancels; it must not do so in bf16 ------------


def _prefix_problem(fvu: float, B: int = 48, K: int = 32, F: int = 400, d: int = 96, seed: int = 0):
    """Unit decoder rows, sorted decaying coefficients and a residual whose K-prefix leaves a
    fraction ``fvu`` of ``‖e₀‖²`` unexplained (float64)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(F, d, generator=g, dtype=torch.float64)
    W = W / W.norm(dim=-1, keepdim=True)
    idx = torch.stack([torch.randperm(F, generator=g)[:K] for _ in range(B)])
    decay = torch.exp(-torch.arange(K, dtype=torch.float64) / 8)
    vals = 3 * (0.5 + 0.5 * torch.rand(B, K, generator=g, dtype=torch.float64)) * decay
    vals = vals.sort(-1, descending=True).values
    recon = torch.einsum("bk,bkd->bd", vals, W[idx])
    noise = torch.randn(B, d, generator=g, dtype=torch.float64)
    noise = noise / noise.norm(dim=-1, keepdim=True) * recon.norm(dim=-1, keepdim=True)
    return recon + noise * (fvu / (1 - fvu)) ** 0.5, vals, W, idx


@pytest.mark.parametrize("fvu", [0.27, 0.04, 0.01])
def test_prefix_errors_of_bf16_inputs_within_half_percent_of_float64(fvu: float) -> None:
    r, v, W, idx = (t.to(BF16) if t.is_floating_point() else t for t in _prefix_problem(fvu))
    ref = prefix_reconstruction_errors_naive(r.double(), v.double(), W.double(), idx)
    final = ref[:, -1] / r.double().pow(2).sum(-1)
    assert 0.5 * fvu < float(final.mean()) < 2 * fvu  # the problem has the FVU it claims
    got = prefix_reconstruction_errors(r, v, W, idx, chunk_size=7)
    assert _rel(got, ref) <= 5e-3  # the bf16 Gram form: 4 %, 28 %, 120 %
    assert got.dtype == torch.float32  # not rounded back to bf16
    loss = hierarchical_loss(r, v, W, idx)
    assert _rel(loss, hierarchical_loss_naive(r.double(), v.double(), W.double(), idx)) <= 5e-3


@pytest.mark.parametrize("fvu", [0.04, 0.01])
def test_prefix_errors_under_autocast_run_in_float32(fvu: float) -> None:
    r, v, W, idx = (t.float() if t.is_floating_point() else t for t in _prefix_problem(fvu))
    ref = prefix_reconstruction_errors_naive(r.double(), v.double(), W.double(), idx)
    with autocast():
        got = prefix_reconstruction_errors(r, v, W, idx)
        gathered = prefix_reconstruction_errors(r, v, W[idx])  # the indices=None form
    assert got.dtype == gathered.dtype == torch.float32
    assert _rel(got, ref) <= 1e-3  # a bf16 bmm inside gives 0.5–30 % here
    assert _rel(gathered, ref) <= 1e-3


def test_prefix_error_gradients_in_bf16_and_autocast_follow_float64() -> None:
    """Gradients come back in the inputs' dtypes; ``W_dec``'s is summed in float32 first."""
    r, v, W, idx = _prefix_problem(0.04, B=64, K=16, F=24)  # many rows share each latent
    ref_leaves = [t.clone().requires_grad_() for t in (r, v, W)]
    ref = torch.autograd.grad(
        prefix_reconstruction_errors_naive(*ref_leaves, idx).sum(), ref_leaves
    )
    for dtype, ctx in ((BF16, None), (torch.float32, autocast)):
        leaves = [t.to(dtype).requires_grad_() for t in (r, v, W)]
        if ctx is None:
            loss = prefix_reconstruction_errors(*leaves, idx).sum()
        else:
            with ctx():
                loss = prefix_reconstruction_errors(*leaves, idx).sum()
        grads = torch.autograd.grad(loss, leaves)
        for name, got, want in zip(("residual0", "values", "W_dec"), grads, ref):
            assert got.dtype == dtype, name
            scale = float(want.abs().max())
            assert float((got.double() - want).abs().max()) <= 3e-2 * scale, (dtype, name)


def test_mixed_input_dtypes_compute_in_the_widest() -> None:
    r, v, W, idx = _prefix_problem(0.1, B=8, K=6, F=30, d=12)
    got = prefix_reconstruction_errors(r.float(), v.to(BF16), W, idx)
    assert got.dtype == torch.float64
    ref = prefix_reconstruction_errors_naive(r.float().double(), v.to(BF16).double(), W, idx)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_kstar_labels_of_a_bf16_sae_match_float64() -> None:
    """AdaptiveK's labels: the first prefix under τ·‖e₀‖², from bf16 inputs, equal the float64
    labels of the same rounded inputs wherever the float64 errors are not within 0.5 % of τ."""
    r, v, W, idx = (t.to(BF16) if t.is_floating_point() else t for t in _prefix_problem(0.01))
    variance = r.double().pow(2).sum(-1)
    ref = prefix_reconstruction_errors_naive(r.double(), v.double(), W.double(), idx)
    got = prefix_reconstruction_errors(r, v, W, idx)
    tau = 0.02
    clear = ((ref / (tau * variance[:, None]) - 1).abs() > 5e-3).all(-1)
    assert int(clear.sum()) >= len(clear) // 2
    want = kstar_from_prefix_errors(ref, variance, tau)
    have = kstar_from_prefix_errors(got, variance.float(), tau)
    assert torch.equal(have[clear], want[clear])
