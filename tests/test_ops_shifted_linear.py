"""Tests of ``ops/shifted_linear.py``: same values and gradients as the plain composition."""

from __future__ import annotations

import pytest
import torch

from sae_adaptive_plugin.ops.shifted_linear import shifted_linear, shifted_linear_reference


def _leaves(x_grad: bool, with_bias: bool, scale: str = "none"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64).requires_grad_(x_grad)
    shift = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_()
    W = torch.randn(5, 7, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(7, generator=g, dtype=torch.float64).requires_grad_() if with_bias else None
    s = None
    if scale != "none":
        s = torch.rand(7, generator=g, dtype=torch.float64) + 0.5
        if scale == "with_zero":
            s[2] = 0.0
        s.requires_grad_()
    return x, shift, W, b, s


@pytest.mark.parametrize("x_grad", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("scale", ["none", "positive", "with_zero"])
def test_matches_plain_composition(x_grad: bool, with_bias: bool, scale: str) -> None:
    x, shift, W, b, s = _leaves(x_grad, with_bias, scale)
    inputs = [t for t in (x, shift, W, b, s) if t is not None and t.requires_grad]
    upstream = torch.randn(12, 7, dtype=torch.float64)
    out = shifted_linear(x, shift, W, b, s)
    ref = shifted_linear_reference(x, shift, W, b, s)
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-14)
    grads = torch.autograd.grad((out * upstream).sum(), inputs)
    grads_ref = torch.autograd.grad((ref * upstream).sum(), inputs)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_gradcheck() -> None:
    assert torch.autograd.gradcheck(shifted_linear, _leaves(True, True, "positive"))


def test_shapes_validated() -> None:
    x, shift, W, b, s = _leaves(False, True, "positive")
    with pytest.raises(ValueError, match="shifted_linear needs"):
        shifted_linear(x, shift[:-1], W, b)
    with pytest.raises(ValueError, match="b must have shape"):
        shifted_linear(x, shift, W, b[:-1])
    with pytest.raises(ValueError, match="scale must have shape"):
        shifted_linear(x, shift, W, b, s[:-1])
