"""Per-row variable-k top-k and its decode paths against plain references, per dtype."""

from __future__ import annotations

import pytest
import torch

from sae_adaptive_plugin.ops import variable_topk as variable_topk_module
from sae_adaptive_plugin.ops.variable_topk import (
    check_k,
    decode_topk,
    decode_topk_dense,
    decode_topk_gather,
    rows_topk,
    scatter_topk,
    topk_encode,
    variable_topk,
    variable_topk_reference,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_variable_topk_matches_loop_reference(dtype: torch.dtype) -> None:
    h = torch.randn(9, 40).to(dtype)
    k = torch.tensor([0, 1, 2, 5, 40, 7, 3, 3, 10])
    result = variable_topk(h, k)
    assert result.values.shape == (9, 40)
    assert torch.equal(scatter_topk(result, 40), variable_topk_reference(h, k))
    assert torch.equal(result.mask.sum(-1), k)
    assert (result.values[~result.mask] == 0).all()


def test_variable_topk_counts_only_positive_values_as_active() -> None:
    h = -torch.rand(3, 10)
    h[0, :2] = 1.0
    result = variable_topk(h, torch.tensor([4, 4, 1]))
    assert (scatter_topk(result, 10) != 0).sum(-1).tolist() == [2, 0, 0]


def test_variable_topk_batches_with_leading_dims_and_int_k() -> None:
    h = torch.randn(2, 3, 20)
    dense = scatter_topk(variable_topk(h, 4), 20)
    assert ((dense != 0).sum(-1) <= 4).all()
    assert torch.equal(
        dense.reshape(6, 20), variable_topk_reference(h.reshape(6, 20), torch.full((6,), 4))
    )


def test_variable_topk_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="k_max must lie in"):
        variable_topk(torch.randn(2, 5), torch.tensor([1, 6]))
    with pytest.raises(ValueError, match="k_per_row has shape"):
        variable_topk(torch.randn(2, 5), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"k must lie in \[0, d_sae=5\]"):
        check_k(torch.tensor([-1, 2]), 5)


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 5e-2)]
)
def test_gather_decode_matches_dense_values_and_gradients(dtype: torch.dtype, atol: float) -> None:
    hidden = torch.randn(11, 64, dtype=torch.float64).to(dtype).requires_grad_()
    W_dec = torch.randn(64, 12, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randint(0, 9, (11,))
    top = variable_topk(hidden, k, k_max=8)
    upstream = torch.randn(11, 12, dtype=torch.float64).to(dtype)
    grads = []
    for decode in (decode_topk_dense, decode_topk_gather):
        out = decode(top.values, top.indices, W_dec)
        grads.append(
            (out, *torch.autograd.grad((out * upstream).sum(), [hidden, W_dec], retain_graph=True))
        )
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def test_decode_topk_dispatch_and_bad_impl() -> None:
    top = variable_topk(torch.randn(4, 80), 3)
    W_dec = torch.randn(80, 6)
    ref = decode_topk_dense(top.values, top.indices, W_dec)
    for impl in ("auto", "dense", "gather"):
        torch.testing.assert_close(decode_topk(top.values, top.indices, W_dec, impl), ref)
    with pytest.raises(ValueError, match="impl must be"):
        decode_topk(top.values, top.indices, W_dec, "sparse")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 5e-2)]
)
def test_gather_decode_leading_dims_and_untouched_rows(dtype: torch.dtype, atol: float) -> None:
    values = torch.rand(2, 7, 6, dtype=torch.float64).to(dtype).requires_grad_()
    indices = torch.stack([torch.randperm(50)[:6] for _ in range(14)]).reshape(2, 7, 6)
    W_dec = torch.randn(50, 10, dtype=torch.float64).to(dtype).requires_grad_()
    upstream = torch.randn(2, 7, 10, dtype=torch.float64).to(dtype)
    results = []
    for decode in (decode_topk_dense, decode_topk_gather):
        out = decode(values, indices, W_dec)
        results.append((out, *torch.autograd.grad((out * upstream).sum(), [values, W_dec])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)
    # decoder rows nobody selected get exactly zero gradient
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[indices.reshape(-1)] = False
    assert untouched.any()
    assert (results[1][2][untouched] == 0).all()


def test_gather_decode_gradcheck_float64() -> None:
    values = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
    indices = torch.stack([torch.randperm(9)[:3] for _ in range(5)])
    W_dec = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, w: decode_topk_gather(v, indices, w), (values, W_dec), eps=1e-6, atol=1e-8
    )


def test_gather_decode_one_input_needing_grad() -> None:
    top = variable_topk(torch.randn(6, 30), torch.tensor([0, 1, 2, 3, 4, 5]), k_max=5)
    W_dec = torch.randn(30, 7, requires_grad=True)
    values = top.values.clone().requires_grad_()
    (g_w,) = torch.autograd.grad(decode_topk_gather(top.values, top.indices, W_dec).sum(), W_dec)
    (g_v,) = torch.autograd.grad(
        decode_topk_gather(values, top.indices, W_dec.detach()).sum(), values
    )
    (ref_w,) = torch.autograd.grad(decode_topk_dense(top.values, top.indices, W_dec).sum(), W_dec)
    torch.testing.assert_close(g_w, ref_w)
    torch.testing.assert_close(g_v, W_dec.detach()[top.indices].sum(-1))


def _encode_case(dtype: torch.dtype, with_scale: bool):
    g = torch.Generator().manual_seed(1)
    sae_in = torch.randn(2, 5, 8, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    W_enc = torch.randn(8, 40, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b_enc = (0.1 * torch.randn(40, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    scale = None
    if with_scale:
        scale = (torch.rand(40, generator=g, dtype=torch.float64) + 0.5).to(dtype)
        scale.requires_grad_()
    k = torch.tensor([[0, 1, 3, 6, 6], [2, 5, 4, 1, 6]])
    return sae_in, W_enc, b_enc, scale, k


@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("use_hidden_pre", [False, True])
@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 5e-2)]
)
def test_topk_encode_sparse_matches_dense(
    dtype: torch.dtype, atol: float, with_scale: bool, use_hidden_pre: bool
) -> None:
    sae_in, W_enc, b_enc, scale, k = _encode_case(dtype, with_scale)
    inputs = [t for t in (sae_in, W_enc, b_enc, scale) if t is not None]
    up_v = torch.randn(2, 5, 6, dtype=torch.float64).to(dtype)
    up_h = torch.randn(2, 5, 40, dtype=torch.float64).to(dtype)
    results = []
    for impl in ("dense", "sparse"):
        hidden_pre, top = topk_encode(sae_in, W_enc, b_enc, k, k_max=6, scale=scale, impl=impl)
        loss = (top.values * up_v).sum()
        if use_hidden_pre:  # hidden_pre used with gradient (as AuxK does): dense backward
            loss = loss + (hidden_pre * up_h).sum()
        results.append((hidden_pre, top.values, *torch.autograd.grad(loss, inputs)))
        assert torch.equal(top.mask.sum(-1), k)
        assert (top.values[~top.mask] == 0).all()
        ref = variable_topk(hidden_pre.detach(), k, 6)
        assert torch.equal(top.indices, ref.indices)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def test_topk_encode_sparse_gradcheck_float64() -> None:
    sae_in, W_enc, b_enc, scale, k = _encode_case(torch.float64, True)
    for use_hidden_pre in (False, True):

        def f(x, w, b, s, use=use_hidden_pre):
            hidden_pre, top = topk_encode(x, w, b, k, k_max=6, scale=s, impl="sparse")
            out = top.values.pow(2).sum()
            return out + hidden_pre.sin().sum() if use else out

        assert torch.autograd.gradcheck(f, (sae_in, W_enc, b_enc, scale), eps=1e-6, atol=1e-7)


def test_topk_encode_zero_scale_and_bad_input() -> None:
    sae_in, W_enc, b_enc, scale, k = _encode_case(torch.float64, True)
    scale = scale.detach().clone()
    scale[3] = 0.0
    scale.requires_grad_()
    grads = []
    for impl in ("dense", "sparse"):
        hidden_pre, top = topk_encode(sae_in, W_enc, b_enc, k, 6, scale=scale, impl=impl)
        loss = top.values.sum() + hidden_pre.pow(2).sum()
        grads.append(torch.autograd.grad(loss, [scale, W_enc]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="impl must be"):
        topk_encode(sae_in, W_enc, b_enc, k, 6, impl="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale must have shape"):
        topk_encode(sae_in, W_enc, b_enc, k, 6, scale=torch.ones(3))
    with pytest.raises(ValueError, match="k_max must lie in"):
        topk_encode(sae_in, W_enc, b_enc, 3, 41)


def test_weighted_bag_keeps_only_the_used_slots_with_the_same_values_and_gradients(monkeypatch):
    """A CPU bag of the used slots only (few used: compacted) equals the full bag with the unused
    slots weighted zero, in values and in the gradients of weights and per-slot values."""
    from sae_adaptive_plugin.ops import variable_topk
    from sae_adaptive_plugin.ops.variable_topk import weighted_bag

    g = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 6, dtype=torch.float64, generator=g)
    indices = torch.randint(0, 40, (9, 8), generator=g)
    per_slot = torch.randn(9, 8, dtype=torch.float64, generator=g)
    used = torch.rand(9, 8, generator=g) < 0.3
    used[4] = False  # a row with no used slot: an empty bag
    results = []
    for compact in (True, False):
        monkeypatch.setattr(variable_topk, "COMPACT_BELOW", 1.0 if compact else 0.0)
        w = weight.clone().requires_grad_(True)
        v = per_slot.clone().requires_grad_(True)
        out = weighted_bag(indices, w, v, used)
        out.backward(torch.ones_like(out) * torch.arange(6, dtype=torch.float64))
        results.append((out.detach(), w.grad, v.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    assert torch.all(results[0][2][~used] == 0)  # unused slots get no gradient
    reference = (per_slot * used).unsqueeze(-1).mul(weight[indices]).sum(1)
    torch.testing.assert_close(results[0][0], reference)


def _grouped_case():
    """Rows whose k spans every width of k_max = 64 (64, 32, 16): k 0..64, the k_max ones last."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(70, 300, generator=g, dtype=torch.float64)
    k = torch.randint(0, 65, (70,), generator=g)
    k[:3] = torch.tensor([5, 20, 40])
    return h, k


@pytest.mark.parametrize("gather_elements", [1 << 24, 900])  # one chunk a group; 3 rows a chunk
def test_rows_topk_groups_rows_by_width_exact_up_to_each_k(monkeypatch, gather_elements):
    monkeypatch.setattr(variable_topk_module, "GROUP_GATHER_ELEMENTS", gather_elements)
    h, k = _grouped_case()
    values, indices = rows_topk(h, k, 64)
    full = h.topk(64, dim=-1, sorted=True)
    for row, width in ((0, 16), (1, 32), (2, 64)):  # the narrowest width holding its k
        torch.testing.assert_close(values[row, :width], full.values[row, :width], rtol=0, atol=0)
        assert torch.equal(indices[row, :width], full.indices[row, :width])
        assert (values[row, width:] == 0).all()
        assert (indices[row, width:] == indices[row, 0]).all()  # the grouping ran
    result = variable_topk(h, k, 64)
    assert torch.equal(scatter_topk(result, 300), variable_topk_reference(h, k))
    assert torch.equal(result.mask.sum(-1), k)
    W_dec = torch.randn(300, 7, dtype=torch.float64)
    ref = variable_topk_reference(h, k) @ W_dec
    for impl in ("dense", "gather"):
        out = decode_topk(result.values, result.indices, W_dec, impl=impl, mask=result.mask)
        torch.testing.assert_close(out, ref)


def test_rows_topk_is_one_topk_when_every_row_needs_k_max():
    h, _ = _grouped_case()
    k = torch.full((70,), 64)
    k[0] = 33  # above k_max / 2: still the k_max width
    values, indices = rows_topk(h, k, 64)
    full = h.topk(64, dim=-1, sorted=True)
    assert torch.equal(values, full.values) and torch.equal(indices, full.indices)


@pytest.mark.parametrize("with_scale", [False, True])
def test_topk_encode_sparse_matches_dense_with_grouped_rows(with_scale):
    g = torch.Generator().manual_seed(4)
    sae_in = torch.randn(50, 12, generator=g, dtype=torch.float64).requires_grad_()
    W_enc = torch.randn(12, 200, generator=g, dtype=torch.float64).requires_grad_()
    b_enc = (0.1 * torch.randn(200, generator=g, dtype=torch.float64)).requires_grad_()
    scale = (torch.rand(200, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    scale = scale if with_scale else None
    k = torch.randint(1, 65, (50,), generator=g)
    k[:2] = torch.tensor([3, 64])
    inputs = [t for t in (sae_in, W_enc, b_enc, scale) if t is not None]
    up = torch.randn(50, 64, generator=g, dtype=torch.float64)
    results = []
    for impl in ("dense", "sparse"):
        hidden_pre, top = topk_encode(sae_in, W_enc, b_enc, k, 64, scale=scale, impl=impl)
        assert (top.indices[0, 16:] == top.indices[0, 0]).all()  # row 0 took the 16 width
        loss = (top.values * up).sum()
        results.append((top.values, *torch.autograd.grad(loss, inputs)))
        ref = variable_topk_reference(hidden_pre.detach(), k)
        assert torch.equal(scatter_topk(top, 200).detach(), ref)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
