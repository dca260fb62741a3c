"""Tests of the blocked soft code + decode (``ops/lapsum_decode.py``) against the plain composition."""

from __future__ import annotations

import pytest
import torch

import sae_adaptive_plugin.ops.lapsum_decode as lapsum_decode_module
from sae_adaptive_plugin.ops.lapsum_decode import lapsum_decode, lapsum_decode_reference


def _problem(rows: int = 24, f: int = 40, d_out: int = 6, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, f, generator=g, dtype=dtype) * 2
    h[0, : f // 2] = -1.0  # half the row is exactly zero after the ReLU
    h[1] = h[1].round()  # ties
    h[2, :3] = torch.tensor([30.0, 20.0, 10.0], dtype=dtype)  # gaps ≫ α
    k_hat = torch.rand(rows, generator=g, dtype=dtype) * 9 + 1
    k_hat[3] = 10.0  # at k_max
    W_dec = torch.randn(f, d_out, generator=g, dtype=dtype)
    scale = torch.rand(f, generator=g, dtype=dtype) + 0.5
    upstream = torch.randn(rows, d_out, generator=g, dtype=dtype)
    return h, k_hat, W_dec, scale, upstream


def _run(fn, h, k_hat, W_dec, scale, upstream, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (h, k_hat, W_dec, scale)]
    res = fn(leaves[0], leaves[1], kwargs.pop("alpha"), leaves[2], dec_scale=leaves[3], **kwargs)
    grads = torch.autograd.grad((res.out * upstream).sum(), leaves)
    return res, grads


@pytest.mark.parametrize("alpha", [2.0, 0.3, 1e-2, 1e-4])
@pytest.mark.parametrize("k_max", [10, None])
@pytest.mark.parametrize("block_rows", [1, 5, None])
@pytest.mark.parametrize("matmul_elements", [1, 40 * 10, None])  # matmul blocks: 1, 2 or all
def test_matches_plain_composition_float64(
    alpha: float, k_max, block_rows, matmul_elements, monkeypatch
) -> None:
    if matmul_elements is not None:
        monkeypatch.setattr(lapsum_decode_module, "MATMUL_ELEMENTS", matmul_elements)
    problem = _problem()
    fused, g1 = _run(lapsum_decode, *problem, alpha=alpha, k_max=k_max, block_rows=block_rows)
    plain, g0 = _run(lapsum_decode_reference, *problem, alpha=alpha, k_max=k_max)
    torch.testing.assert_close(fused.out, plain.out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused.feature_acts, plain.feature_acts, rtol=1e-10, atol=1e-12)
    assert torch.equal(fused.nonzero, plain.nonzero)
    for name, a, b in zip(("h", "k_hat", "W_dec", "scale"), g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def test_float32_matches_plain_composition() -> None:
    problem = [t.float() for t in _problem(rows=64, f=300, d_out=16)]
    fused, g1 = _run(lapsum_decode, *problem, alpha=0.05, k_max=10, block_rows=7)
    plain, g0 = _run(lapsum_decode_reference, *problem, alpha=0.05, k_max=10)
    torch.testing.assert_close(fused.out, plain.out, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("h", "k_hat", "W_dec", "scale"), g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_without_decoder_scale_and_gradcheck() -> None:
    g = torch.Generator().manual_seed(1)  # no entry at ReLU's kink: finite differences hold
    h = torch.randn(4, 9, generator=g, dtype=torch.float64)
    k_hat = torch.tensor([1.3, 3.0, 5.9, 2.2], dtype=torch.float64)
    W_dec = torch.randn(9, 3, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (h, k_hat, W_dec)]
    for alpha in (0.7, 0.1):
        assert torch.autograd.gradcheck(
            lambda a, b, w, al=alpha: lapsum_decode(a, b, al, w, block_rows=3).out,
            leaves,
            eps=1e-6,
            atol=1e-6,
        )


def test_soft_code_sums_and_firing_pattern() -> None:
    """``feature_acts`` is the code where the mask exceeds ½: the ``⌈k̂⌉``-ish top latents."""
    h, k_hat, _, _, _ = _problem()
    eye = torch.eye(h.shape[1], dtype=h.dtype)
    res = lapsum_decode(h, k_hat, 1e-4, eye, k_max=10)  # out = the code itself
    fired = (res.feature_acts != 0).sum(-1)
    positive = (h > 0).sum(-1)
    # α → 0: the mask is hard top-k̂, so round(k̂) latents fire unless fewer are positive
    assert torch.equal(fired, torch.minimum(k_hat.round().long(), positive))
    torch.testing.assert_close(res.feature_acts, torch.where(res.feature_acts != 0, res.out, 0.0))


def test_inputs_validated() -> None:
    h, k_hat, W_dec, scale, _ = _problem()
    with pytest.raises(ValueError, match="hidden_pre must be a floating-point"):
        lapsum_decode(h.long(), k_hat, 0.1, W_dec)
    with pytest.raises(ValueError, match=r"W_dec must be a floating-point \[F=40"):
        lapsum_decode(h, k_hat, 0.1, W_dec[:-1])
    with pytest.raises(ValueError, match="alpha must be a number or a 0-dim tensor"):
        lapsum_decode(h, k_hat, torch.ones(2), W_dec)
    with pytest.raises(ValueError, match="dec_scale"):
        lapsum_decode(h, k_hat, 0.1, W_dec, dec_scale=scale[:-1])
    with pytest.raises(ValueError, match="k_hat must lie"):
        lapsum_decode(h, k_hat, 0.1, W_dec, k_max=5)
    with pytest.raises(ValueError, match="alpha"):
        lapsum_decode(h, k_hat, 0.0, W_dec)
    with pytest.raises(ValueError, match="block_rows"):
        lapsum_decode(h, k_hat, 0.1, W_dec, block_rows=0)
