"""Tests of ops/hierarchical.py: the B×K×K all-prefix errors and loss against the naive B×K×d reference."""

from __future__ import annotations

import pytest
import torch

from sae_adaptive_plugin.ops.hierarchical import (
    block_end_errors,
    hierarchical_loss,
    hierarchical_loss_naive,
    prefix_reconstruction_errors,
    prefix_reconstruction_errors_naive,
)

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _inputs(B, K, F, d, dtype, seed, duplicates=True):
    g = torch.Generator().manual_seed(seed)
    residual0 = torch.randn(B, d, generator=g, dtype=dtype)
    values = torch.rand(B, K, generator=g, dtype=dtype).sort(-1, descending=True).values
    W_dec = torch.randn(F, d, generator=g, dtype=dtype) / d**0.5
    if duplicates:  # the same latent may be hit by many rows, and twice within a row
        indices = torch.randint(0, F, (B, K), generator=g)
    else:
        indices = torch.stack([torch.randperm(F, generator=g)[:K] for _ in range(B)])
    return residual0, values, W_dec, indices


def _grads(fn, residual0, values, W_dec, indices):
    leaves = [t.clone().requires_grad_() for t in (residual0, values, W_dec)]
    out = fn(*leaves, indices)
    grads = torch.autograd.grad(out, leaves)
    return out.detach(), grads


SHAPES = [(1, 1, 3, 2), (7, 1, 10, 5), (9, 6, 20, 11), (33, 16, 40, 8), (5, 12, 12, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_loss_and_gradients_match_naive(dtype, shape):
    B, K, F, d = shape
    args = _inputs(B, K, F, d, dtype, seed=B * 100 + K)
    ref, ref_grads = _grads(hierarchical_loss_naive, *args)
    for fn in (
        lambda r, v, w, i: hierarchical_loss(r, v, w, i, chunk_size=2),
        lambda r, v, w, i: hierarchical_loss(r, v, w, i),
        lambda r, v, w, i: prefix_reconstruction_errors(r, v, w, i, chunk_size=3).mean(),
    ):
        out, grads = _grads(fn, *args)
        assert out.dtype == dtype
        torch.testing.assert_close(out, ref, **TOL[dtype])
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_prefix_errors_match_naive_with_weighted_upstream(dtype, shape):
    B, K, F, d = shape
    args = _inputs(B, K, F, d, dtype, seed=7 + K)
    weights = torch.rand(B, K, dtype=dtype, generator=torch.Generator().manual_seed(3))

    def weighted(fn):
        return lambda r, v, w, i: (fn(r, v, w, i) * weights).sum()

    ref, ref_grads = _grads(weighted(prefix_reconstruction_errors_naive), *args)
    out, grads = _grads(weighted(prefix_reconstruction_errors), *args)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL[dtype])
    errors = prefix_reconstruction_errors(*args)
    assert errors.shape == (B, K)
    torch.testing.assert_close(errors, prefix_reconstruction_errors_naive(*args), **TOL[dtype])


def test_gathered_rows_form_matches_indexed_form():
    r, v, W, idx = _inputs(6, 5, 9, 4, torch.float64, seed=1)
    rows = W[idx]
    torch.testing.assert_close(
        prefix_reconstruction_errors(r, v, rows), prefix_reconstruction_errors(r, v, W, idx)
    )
    torch.testing.assert_close(hierarchical_loss(r, v, rows), hierarchical_loss_naive(r, v, W, idx))


def test_chunk_size_does_not_change_results():
    """Values and gradients alike, whatever the chunking (the ops reuse one set of work buffers
    across chunks, the last one ragged)."""
    r, v, W, idx = _inputs(11, 20, 40, 6, torch.float64, seed=2)
    weights = torch.rand(11, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def run(chunk):
        leaves = [t.clone().requires_grad_() for t in (r, v, W)]
        errors = prefix_reconstruction_errors(*leaves, idx, chunk_size=chunk)
        ends = block_end_errors(*leaves, idx, chunk_size=chunk)
        ((errors * weights).sum() + ends.sum()).backward()
        return [errors.detach(), ends.detach(), *(t.grad for t in leaves)]

    base = run(11)
    for chunk in (1, 2, 5, 100):
        for got, want in zip(run(chunk), base):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_prefix_errors_gradcheck_with_duplicate_latents():
    """The closed-form backward, against finite differences (a latent twice in one row too)."""
    r, v, W, idx = _inputs(5, 4, 6, 5, torch.float64, seed=4)
    idx[0, 1] = idx[0, 3]
    leaves = [t.clone().requires_grad_() for t in (r, v, W)]

    def fn(r, v, W):
        return prefix_reconstruction_errors(r, v, W, idx, chunk_size=2)

    assert torch.autograd.gradcheck(fn, leaves)


def test_no_gradient_reaches_indices_and_last_prefix_is_full_reconstruction():
    r, v, W, idx = _inputs(8, 6, 12, 4, torch.float32, seed=5, duplicates=False)
    full = r - (v.unsqueeze(-1) * W[idx]).sum(1)
    errors = prefix_reconstruction_errors(r, v, W, idx)
    torch.testing.assert_close(errors[:, -1], full.pow(2).sum(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(errors[:, 0], (r - v[:, :1] * W[idx[:, 0]]).pow(2).sum(-1))
    assert not idx.requires_grad


def test_k_star_label_from_prefix_errors():
    """The AdaptiveK label k* = min{j : err_j ≤ τ·var} read off prefix_reconstruction_errors."""
    g = torch.Generator().manual_seed(6)
    d, F, K = 6, 6, 6
    W = torch.eye(F, d, dtype=torch.float64)
    coeffs = torch.rand(10, F, generator=g, dtype=torch.float64) * (
        torch.rand(10, F, generator=g) < 0.5
    )
    values, idx = coeffs.sort(-1, descending=True)
    x = coeffs @ W
    errors = prefix_reconstruction_errors(x, values[:, :K], W, idx[:, :K])
    assert (errors[:, 1:] <= errors[:, :-1] + 1e-12).all()
    k_star = 1 + (errors > 1e-9).sum(-1)  # τ·var → 0: exact reconstruction
    n_active = (coeffs > 0).sum(-1).clamp(min=1)
    assert torch.equal(k_star, n_active)


def test_bad_inputs_raise_clear_errors():
    r, v, W, idx = _inputs(4, 3, 6, 5, torch.float32, seed=8)
    with pytest.raises(ValueError, match="residual0"):
        prefix_reconstruction_errors(r[0], v, W, idx)
    with pytest.raises(ValueError, match="values"):
        prefix_reconstruction_errors(r, v[:2], W, idx)
    with pytest.raises(ValueError, match="K >= 1"):
        prefix_reconstruction_errors(r, v[:, :0], W, idx[:, :0])
    with pytest.raises(ValueError, match="W_dec"):
        prefix_reconstruction_errors(r, v, W[:, :2], idx)
    with pytest.raises(ValueError, match="indices"):
        prefix_reconstruction_errors(r, v, W, idx[:, :2])
    with pytest.raises(ValueError, match="integer"):
        prefix_reconstruction_errors(r, v, W, idx.float())
    with pytest.raises(ValueError, match=r"gathered decoder rows"):
        prefix_reconstruction_errors(r, v, W)
    with pytest.raises(ValueError, match="chunk_size"):
        prefix_reconstruction_errors(r, v, W, idx, chunk_size=0)
    with pytest.raises(ValueError, match="W_dec must be a floating-point"):
        prefix_reconstruction_errors(r, v, W.long(), idx)


@pytest.mark.parametrize("block", [1, 3, 5, 64])
def test_block_end_errors_follow_the_block_size_with_their_gradients(block, monkeypatch):
    """With blocks of any size (the residual carried from block to block; 1: every prefix, as
    the all-prefix errors run), the block-end errors and their gradients are the naive
    reference's at the block ends."""
    import sae_adaptive_plugin.ops.hierarchical as hierarchical

    K = 11
    args = _inputs(9, K, 20, 7, torch.float64, seed=12)
    ends = [min(block * (b + 1), K) - 1 for b in range(-(-K // min(block, K)))]
    weights = torch.rand(
        9, len(ends), dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )

    def weighted(r, v, w, i):
        return (hierarchical.block_end_errors(r, v, w, i, chunk_size=4) * weights).sum()

    ref, ref_grads = _grads(
        lambda r, v, w, i: (
            prefix_reconstruction_errors_naive(r, v, w, i)[:, ends] * weights
        ).sum(),
        *args,
    )
    monkeypatch.setattr(hierarchical, "PREFIX_BLOCK", block)
    out, grads = _grads(weighted, *args)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("K", [1, 8, 11, 24])
def test_block_end_errors_are_the_prefix_errors_at_block_ends_with_their_gradients(K):
    """Column b of the block-end errors is the prefix error after min(8(b+1), K) latents; the
    closed-form backward equals autograd through the naive reference (float64);
    ``block_end_pass`` also gives the last residual, without gradient."""
    from sae_adaptive_plugin.ops.hierarchical import PREFIX_BLOCK, block_end_pass

    args = _inputs(9, K, 30, 7, torch.float64, seed=20 + K)
    ends = [min(PREFIX_BLOCK * (b + 1), K) - 1 for b in range(-(-K // PREFIX_BLOCK))]
    weights = torch.rand(
        9, len(ends), dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )

    def naive(r, v, w, i):
        return (prefix_reconstruction_errors_naive(r, v, w, i)[:, ends] * weights).sum()

    def blocked(r, v, w, i):
        out, final = block_end_pass(r, v, w, i, chunk_size=4)
        assert not final.requires_grad
        residual0, values, W_dec, indices = args
        want = residual0 - (values.unsqueeze(-1) * W_dec[indices]).sum(1)
        torch.testing.assert_close(final, want, **TOL[torch.float64])
        return (out * weights).sum()

    ref, ref_grads = _grads(naive, *args)
    out, grads = _grads(blocked, *args)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("K", [1, 5, 8, 13, 24])
def test_errors_in_block_are_the_prefix_errors_of_each_rows_block(K, monkeypatch):
    """``errors_in_block`` gives, per row, the prefix errors of the block it names (``inf`` past
    ``K``), the values of the naive reference, in chunks of any size, by the CPU's compact bags
    and by the masked bags used elsewhere."""
    from sae_adaptive_plugin.ops import hierarchical
    from sae_adaptive_plugin.ops.hierarchical import errors_in_block

    residual0, values, W_dec, idx = _inputs(11, K, 20, 15, torch.float64, seed=40 + K)
    full = prefix_reconstruction_errors_naive(residual0, values, W_dec, idx)
    width = min(8, K)
    block = torch.randint(0, -(-K // width), (11,), generator=torch.Generator().manual_seed(K))
    slot = block.unsqueeze(-1) * width + torch.arange(width)
    want = full.gather(1, slot.clamp(max=K - 1)).masked_fill(slot >= K, float("inf"))
    for chunk in (None, 4):
        got = errors_in_block(residual0, values, W_dec, idx, block, chunk_size=chunk)
        torch.testing.assert_close(got, want, **TOL[torch.float64])
    with monkeypatch.context() as patch:
        patch.setattr(hierarchical, "host_check_is_free", lambda t: False)
        got = errors_in_block(residual0, values, W_dec, idx, block, chunk_size=4)
        torch.testing.assert_close(got, want, **TOL[torch.float64])
    with pytest.raises(ValueError, match="block must be"):
        errors_in_block(residual0, values, W_dec, idx, block[:3])


def test_block_end_decoder_gradient_is_the_same_by_sparse_product_and_by_index_add(monkeypatch):
    """The CPU adds each block's rank-one decoder-row gradient with one sparse-dense product;
    elsewhere it is written out and index-added: the same gradients (a latent twice in a row and
    a ragged last chunk included)."""
    from sae_adaptive_plugin.ops import hierarchical

    r, v, W, idx = _inputs(7, 20, 30, 6, torch.float64, seed=9)
    idx[0, 2] = idx[0, 11]  # one latent in two blocks of a row
    weights = torch.rand(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def grads():
        leaves = [t.clone().requires_grad_() for t in (r, v, W)]
        (block_end_errors(*leaves, idx, chunk_size=3) * weights).sum().backward()
        return [t.grad for t in leaves]

    on_cpu = grads()
    monkeypatch.setattr(hierarchical, "host_check_is_free", lambda t: False)
    elsewhere = grads()
    for got, want in zip(on_cpu, elsewhere):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert on_cpu[2].abs().sum() > 0
