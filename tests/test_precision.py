"""Every op in bfloat16 and under CPU autocast (the dispatch CUDA autocast takes too): results
within bfloat16 rounding of the plain reference, sums and Gram forms in float32."""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch
from step_parity import loss_and_grads
from torch.utils._python_dispatch import TorchDispatchMode

import sae_adaptive_plugin.ops.dispatch as dispatch
import sae_adaptive_plugin.ops.hierarchical as hierarchical_module
import sae_adaptive_plugin.ops.lapsum_decode as lapsum_decode_module
import sae_adaptive_plugin.ops.variable_topk as variable_topk_module
import sae_adaptive_plugin.saes.softsae as softsae_module
from sae_adaptive_plugin.ops.adaptive_k import kstar_from_prefix_errors
from sae_adaptive_plugin.ops.hierarchical import (
    block_end_errors,
    hierarchical_loss,
    hierarchical_loss_naive,
    prefix_reconstruction_errors,
    prefix_reconstruction_errors_naive,
)
from sae_adaptive_plugin.ops.lapsum import lapsum_topk
from sae_adaptive_plugin.ops.lapsum_decode import lapsum_decode, lapsum_decode_reference
from sae_adaptive_plugin.ops.shifted_linear import shifted_linear, shifted_linear_reference
from sae_adaptive_plugin.ops.variable_topk import decode_topk, topk_encode
from sae_adaptive_plugin.saes.softsae import SoftSAETrainingSAE, SoftSAETrainingSAEConfig

BF16 = torch.bfloat16


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach(), want.detach()
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


# -- encode (topk_encode) and decode (decode_topk) -----------------------------------------------


def _encode_problem(n: int = 256, d_in: int = 32, d_sae: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sae_in = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    W_enc = torch.randn(d_in, d_sae, generator=g, dtype=torch.float64) / d_in**0.5
    b_enc = 0.1 * torch.randn(d_sae, generator=g, dtype=torch.float64)
    b_enc[:4] += 3.0  # every row selects latents 0–3: their gradients sum n rows
    scale = torch.rand(d_sae, generator=g, dtype=torch.float64) + 0.5
    k = torch.randint(4, 9, (n,), generator=g)
    up_v = 0.5 + torch.rand(n, 8, generator=g, dtype=torch.float64)  # sums that grow with n
    up_h = torch.randn(n, d_sae, generator=g, dtype=torch.float64)
    return sae_in, W_enc, b_enc, scale, k, up_v, up_h


def _encode_grads(impl, dtype, with_scale, use_hidden_pre, ctx=None):
    sae_in, W_enc, b_enc, scale, k, up_v, up_h = _encode_problem()
    leaves = [t.to(dtype).requires_grad_() for t in (sae_in, W_enc, b_enc, scale)]
    if not with_scale:
        leaves = leaves[:3]
    with ctx() if ctx is not None else torch.enable_grad():
        hidden_pre, top = topk_encode(
            *leaves[:3], k, k_max=8, scale=leaves[3] if with_scale else None, impl=impl
        )
    loss = (top.values.double() * up_v).sum()
    if use_hidden_pre:  # AuxK reads hidden_pre: the dense backward
        loss = loss + (hidden_pre.double() * up_h).sum()
    return hidden_pre, top, torch.autograd.grad(loss, leaves)


def _float64_grads(top, with_scale, use_hidden_pre):
    """float64 gradients of the loss of :func:`_encode_grads` for the given selection."""
    sae_in, W_enc, b_enc, scale, _k, up_v, up_h = _encode_problem()
    leaves = [t.requires_grad_() for t in (sae_in, W_enc, b_enc, scale)][: 3 + with_scale]
    hidden_pre = sae_in @ W_enc + b_enc
    if with_scale:
        hidden_pre = hidden_pre * scale
    values = torch.where(top.mask, hidden_pre.gather(-1, top.indices).relu(), 0)
    loss = (values * up_v).sum()
    if use_hidden_pre:
        loss = loss + (hidden_pre * up_h).sum()
    return torch.autograd.grad(loss, leaves)


def _assert_close_to(grads, ref, dtype, rtol):
    for name, got, want in zip(("sae_in", "W_enc", "b_enc", "scale"), grads, ref):
        assert got.dtype == dtype, name
        err = (got.double() - want).abs().max() / want.abs().max()
        assert float(err) <= rtol, name


@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("use_hidden_pre", [False, True])
def test_topk_encode_under_autocast_is_sparse_and_selects_as_dense(
    with_scale: bool, use_hidden_pre: bool, monkeypatch
) -> None:
    calls = []
    apply = variable_topk_module._TopKEncode.apply
    monkeypatch.setattr(
        variable_topk_module._TopKEncode, "apply", lambda *a: calls.append(1) or apply(*a)
    )
    f32 = torch.float32
    h_d, top_d, g_d = _encode_grads("dense", f32, with_scale, use_hidden_pre, autocast)
    assert not calls
    h_s, top_s, g_s = _encode_grads("auto", f32, with_scale, use_hidden_pre, autocast)
    assert calls  # "auto" keeps the fused op under autocast
    assert h_s.dtype == h_d.dtype == (f32 if with_scale else BF16)
    assert torch.equal(h_s, h_d) and torch.equal(top_s.indices, top_d.indices)
    assert torch.equal(top_s.values, top_d.values)
    ref = _float64_grads(top_s, with_scale, use_hidden_pre)
    _assert_close_to(g_s, ref, f32, 2e-2)
    _assert_close_to(g_d, ref, f32, 2e-2)


def test_topk_encode_bf16_gradients_are_summed_in_float32() -> None:
    """256 rows select latents 0–3: bf16 index_add/embedding_bag sums drift (sparse backward
    before: b_enc off by 4 %, scale 4 %, W_enc 1.6 %); float32 sums stay within 0.6 %."""
    for use_hidden_pre in (False, True):  # sparse and dense backward
        _, top, grads = _encode_grads("sparse", BF16, True, use_hidden_pre)
        _assert_close_to(grads, _float64_grads(top, True, use_hidden_pre), BF16, 1e-2)


def test_decode_gather_bf16_and_autocast_match_float64() -> None:
    g = torch.Generator().manual_seed(3)
    n, k, d_sae, d = 512, 8, 16, 24  # each latent is hit by ~256 rows
    values = torch.rand(n, k, generator=g, dtype=torch.float64)
    indices = torch.stack([torch.randperm(d_sae, generator=g)[:k] for _ in range(n)])
    W_dec = torch.randn(d_sae, d, generator=g, dtype=torch.float64)
    up = torch.randn(n, d, generator=g, dtype=torch.float64)

    def run(dtype, impl, ctx=None):
        leaves = [values.to(dtype).requires_grad_(), W_dec.to(dtype).requires_grad_()]
        with ctx() if ctx is not None else torch.enable_grad():
            out = decode_topk(leaves[0], indices, leaves[1], impl=impl)
        return out, torch.autograd.grad((out.double() * up).sum(), leaves)

    ref, ref_grads = run(torch.float64, "dense")
    for dtype, ctx in ((BF16, None), (torch.float32, autocast)):
        for impl in ("gather", "dense"):
            out, grads = run(dtype, impl, ctx)
            err = (out.detach().double() - ref.detach()).abs().max() / ref.detach().abs().max()
            assert float(err) <= 1e-2
            for got, want in zip(grads, ref_grads):
                assert got.dtype == dtype
                assert float((got.double() - want).abs().max() / want.abs().max()) <= 1e-2


# -- SoftSAE's soft phase: shifted_linear and lapsum_decode --------------------------------------


def _run_leaves(fn, leaves, upstream, ctx=None):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    with ctx() if ctx is not None else torch.enable_grad():
        out = fn(*leaves)
    out = out.out if hasattr(out, "out") else out
    grads = torch.autograd.grad((out.double() * upstream).sum(), leaves)
    return out.detach(), grads


def _assert_grads_close(got, want, rtol):
    for i, (a, b) in enumerate(zip(got, want)):
        err = (a.double() - b.double()).abs().max() / b.double().abs().max()
        assert float(err) <= rtol, (i, float(err))


@pytest.mark.parametrize("dtype", [BF16, torch.float32])  # float32: under autocast
def test_shifted_linear_bf16_and_autocast_match_float64(dtype) -> None:
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out = 256, 24, 40
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) + 2.0
    shift = torch.full((d_in,), 2.0, dtype=torch.float64) + 0.1 * torch.randn(d_in, generator=g)
    W = torch.randn(d_in, d_out, generator=g, dtype=torch.float64) / d_in**0.5
    b = 0.1 * torch.randn(d_out, generator=g, dtype=torch.float64)
    scale = torch.rand(d_out, generator=g, dtype=torch.float64) + 0.5
    scale[3] = 0.0
    up = 0.5 + torch.rand(n, d_out, generator=g, dtype=torch.float64)
    leaves = [t.to(dtype) for t in (x, shift, W, b, scale)]
    ctx = autocast if dtype == torch.float32 else None
    out, grads = _run_leaves(shifted_linear, leaves, up, ctx)
    assert out.dtype == BF16  # the matmul's dtype
    ref, ref_grads = _run_leaves(
        shifted_linear_reference, [t.double() for t in leaves], up
    )  # float64 of the same (rounded) inputs
    assert float((out.double() - ref).abs().max() / ref.abs().max()) <= 1e-2
    _assert_grads_close(grads, ref_grads, 1e-2)
    for leaf, grad in zip(leaves, grads):
        assert grad.dtype == leaf.dtype


def _decode_problem(rows=96, f=200, d_out=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, f, generator=g, dtype=torch.float64) * 2
    k_hat = torch.rand(rows, generator=g, dtype=torch.float64) * 9 + 1
    W_dec = torch.randn(f, d_out, generator=g, dtype=torch.float64) / 4
    scale = torch.rand(f, generator=g, dtype=torch.float64) + 0.5
    up = torch.randn(rows, d_out, generator=g, dtype=torch.float64)
    return h, k_hat, W_dec, scale, up


@pytest.mark.parametrize("alpha_tensor", [False, True])
def test_lapsum_decode_serves_bf16_and_autocast(alpha_tensor: bool) -> None:
    """Blocked decode of bf16 pre-activations and under autocast: the code in float32, the
    matmuls in bf16; within bf16 rounding of the plain composition at the same dtypes."""
    h, k_hat, W_dec, scale, up = _decode_problem()
    alpha = torch.tensor(0.3) if alpha_tensor else 0.3

    def blocked(h_, k_, w_, s_):
        return lapsum_decode(h_, k_, alpha, w_, k_max=10, dec_scale=s_, block_rows=7)

    def plain(h_, k_, w_, s_):
        return lapsum_decode_reference(h_, k_, 0.3, w_, k_max=10, dec_scale=s_)

    for dtypes, ctx in (
        ((BF16,) * 4, None),
        ((torch.float32,) * 4, autocast),
    ):
        leaves = [t.to(dt) for t, dt in zip((h, k_hat, W_dec, scale), dtypes)]
        out, grads = _run_leaves(blocked, leaves, up, ctx)
        assert out.dtype == BF16
        ref, ref_grads = _run_leaves(plain, leaves, up, ctx)
        assert float((out.double() - ref.double()).abs().max() / ref.double().abs().max()) <= 1e-2
        _assert_grads_close(grads, ref_grads, 2e-2)
        for leaf, grad in zip(leaves, grads):
            assert grad.dtype == leaf.dtype


def test_lapsum_decode_bf16_code_is_computed_in_float32() -> None:
    """The soft code of bf16 pre-activations equals the float32 code of the same values."""
    h, k_hat, _, _, _ = _decode_problem()
    hb = h.to(BF16)
    eye = torch.eye(h.shape[1])
    low = lapsum_decode(hb, k_hat.float(), 0.05, eye.to(BF16), k_max=10)
    full = lapsum_decode(hb.float(), k_hat.float(), 0.05, eye, k_max=10)
    assert low.feature_acts.dtype == BF16
    torch.testing.assert_close(low.feature_acts, full.feature_acts.to(BF16))
    assert torch.equal(low.nonzero, full.nonzero)


def _softsae(**overrides):
    cfg = dict(d_in=16, d_sae=48, k=4, k_estimator_hidden=12, alpha_anneal_steps=6)
    cfg.update(k_anneal_steps=2, hard_topk_start_step=8, **overrides)
    torch.manual_seed(1)
    return SoftSAETrainingSAE(SoftSAETrainingSAEConfig(**cfg))


@pytest.mark.parametrize("candidates", [48, None])  # every latent (lapsum_decode), the default
@pytest.mark.parametrize(("dtype", "ctx"), [("float32", autocast), ("bfloat16", None)])
@pytest.mark.parametrize("rescale", [False, True])
def test_softsae_soft_phase_takes_the_blocked_ops_under_autocast_and_bf16(
    dtype, ctx, rescale, candidates, monkeypatch
) -> None:
    """The soft phase's blocked ops (over every latent: ``lapsum_decode``; over the default
    candidates: the fused top-M encoder) under bf16 autocast and in bf16 give the plain
    composition's losses and gradients to bf16 rounding."""
    calls = []
    op = "lapsum_decode" if candidates else "topk_encode"
    blocked = getattr(softsae_module, op)
    monkeypatch.setattr(softsae_module, op, lambda *a, **k: calls.append(1) or blocked(*a, **k))
    sae = _softsae(dtype=dtype, rescale_acts_by_decoder_norm=rescale, soft_candidates=candidates)
    x = torch.randn(64, 16).to(sae.dtype)
    loss_and_grads(sae, x, 0)  # calibration step
    steps = {}
    for fused in (True, False):
        sae.fused_soft = fused
        calls.clear()
        with ctx() if ctx is not None else torch.enable_grad():
            steps[fused] = loss_and_grads(sae, x, 2)
        assert bool(calls) == fused
    (o1, g1), (o0, g0) = steps[True], steps[False]
    for name in o1.losses:
        torch.testing.assert_close(
            o1.losses[name].float(), o0.losses[name].float(), rtol=1e-2, atol=1e-3
        )
    for name in g1:
        err = (g1[name].double() - g0[name].double()).abs().max() / g0[name].double().abs().max()
        assert float(err) <= 2e-2, name


# -- device-aware blocks: on an accelerator the loops' trip counts do not grow with the width -------


@pytest.mark.parametrize("n_cols", [16_384, 131_072, 1 << 20])
def test_accelerator_blocks_are_few_and_cpu_blocks_unchanged(n_cols: int) -> None:
    n_rows = 4096
    ew, mm = lapsum_decode_module._block_sizes(n_rows, n_cols, None, "cuda")
    assert ew == mm and math.ceil(n_rows / ew) <= dispatch.ACCELERATOR_MAX_BLOCKS
    ew_cpu, mm_cpu = lapsum_decode_module._block_sizes(n_rows, n_cols, None, "cpu")
    assert ew_cpu == max(1, lapsum_decode_module.BLOCK_ELEMENTS // n_cols)
    assert mm_cpu % ew_cpu == 0
    for k, d in ((64, 768), (256, 2304)):
        chunk = hierarchical_module._chunk_rows(n_rows, k, d, None, "cuda")
        assert math.ceil(n_rows / chunk) <= dispatch.ACCELERATOR_MAX_BLOCKS
        cpu = hierarchical_module._chunk_rows(n_rows, k, d, None, "cpu")
        assert cpu == max(1, hierarchical_module.DEFAULT_GATHER_ELEMENTS // (k * d))
    assert dispatch.block_rows(64, 1000, "cuda", 1 << 10) >= 64  # a small problem: one block
    assert dispatch.block_rows(64, 1000, "cpu", 1 << 10) == 1


def test_exact_float32_matmul_switches_tf32_off_only_on_cuda() -> None:
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        with dispatch.exact_float32_matmul("cuda"):
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
        with dispatch.exact_float32_matmul("cpu"):
            assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


# -- no host sync inside the ops: nothing reads a tensor's value back to Python -------------------


class _HostReads(TorchDispatchMode):
    """Records the aten calls that copy a value to the host (``.item()``/``float()``/``bool()``
    of a tensor, boolean-mask indexing): each one is a device sync on a GPU."""

    READS = frozenset(
        {
            torch.ops.aten._local_scalar_dense.default,
            torch.ops.aten.is_nonzero.default,
            torch.ops.aten.nonzero.default,
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _ops_losses():
    """Each op as a training step calls it (float32): a function returning the losses to
    differentiate."""
    sae_in, W_enc, b_enc, scale, k, up_v, up_h = (t.float() for t in _encode_problem())
    k = k.long()
    h, k_hat, W_dec, dec_scale, _ = (t.float() for t in _decode_problem())
    r, vals, W, idx = (t.float() if t.is_floating_point() else t for t in _prefix_problem(0.1))
    x, w, b, s, sh, hp, kh, wd, ds, rr, vv, ww = (
        t.clone().requires_grad_()
        for t in (sae_in, W_enc, b_enc, scale, sae_in[0], h, k_hat, W_dec, dec_scale, r, vals, W)
    )

    def encode(use_hidden_pre):
        hidden_pre, top = topk_encode(x, w, b, k, k_max=8, scale=s)
        return [(top.values * up_v).sum() + (hidden_pre * up_h).sum() * use_hidden_pre]

    def soft_decode():
        alpha = hp.detach().amax(-1).mean() * 0.1  # a device α, as alpha_relative gives
        out = lapsum_decode(hp, kh, alpha, wd, dec_scale=ds, block_rows=40).out
        return [out.sum(), lapsum_topk(hp, kh, alpha).sum()]

    return {
        "topk_encode": lambda: encode(False),
        "topk_encode (dense backward)": lambda: encode(True),
        "shifted_linear": lambda: [(shifted_linear(x, sh, w, b, s) * up_h).sum()],
        "lapsum_decode": soft_decode,
        "prefix errors": lambda: [
            prefix_reconstruction_errors(rr, vv, ww, idx, chunk_size=5).sum(),
            hierarchical_loss(rr, vv, ww, idx),
            decode_topk(vv, idx, ww, impl="gather").sum(),
            block_end_errors(rr, vv, ww, idx, chunk_size=5).sum(),
        ],
    }


@pytest.mark.parametrize("op", list(_ops_losses()))
@pytest.mark.parametrize("ctx", [None, autocast])
def test_ops_read_nothing_back_to_the_host(op: str, ctx) -> None:
    losses = _ops_losses()[op]
    with ctx() if ctx is not None else torch.enable_grad(), _HostReads() as reads:
        torch.autograd.backward(losses())
    assert reads.seen == []


@pytest.mark.parametrize("op", list(_ops_losses()))
def test_ops_trace_without_graph_breaks(op: str) -> None:
    """``torch.compile(fullgraph=True)`` raises at any graph break in the op's forward and, with
    AOT autograd, its autograd Function's backward."""
    torch._dynamo.reset()
    losses = torch.compile(_ops_losses()[op], backend="aot_eager", fullgraph=True)
    torch.autograd.backward(losses())


# -- the layout of low-precision weights: nn.Linear's ------------------------------------------


class _LowMatmuls(TorchDispatchMode):
    """Records, for each bf16 ``mm``/``addmm``, whether its right operand is laid out as
    ``nn.Linear``'s weight (a transposed view of a contiguous ``[N, K]``: stride ``(1, K)``)."""

    OPS: ClassVar[dict] = {torch.ops.aten.mm.default: 1, torch.ops.aten.addmm.default: 2}

    def __init__(self) -> None:
        super().__init__()
        self.right_is_linear_layout: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        position = self.OPS.get(func)
        if position is not None and args[position].dtype == BF16:
            right = args[position]
            self.right_is_linear_layout.append(right.stride() == (1, right.shape[0]))
        return func(*args, **(kwargs or {}))


def test_linear_weight_casts_in_nn_linear_layout_with_gradients() -> None:
    w = torch.randn(6, 10, requires_grad=True)
    low = dispatch.linear_weight(w, BF16)
    assert low.dtype == BF16 and low.shape == (6, 10) and low.stride() == (1, 6)
    assert torch.equal(low, w.detach().to(BF16))
    (low.float() * torch.arange(60.0).reshape(6, 10)).sum().backward()
    torch.testing.assert_close(w.grad, torch.arange(60.0).reshape(6, 10))
    assert dispatch.linear_weight(w, torch.float32) is w


def test_autocast_forward_matmuls_read_weights_in_nn_linear_layout() -> None:
    """Under CPU bf16 autocast, the encoder (``topk_encode``), ``shifted_linear`` and SoftSAE's
    estimator multiply by weights cast in ``nn.Linear``'s layout, whose CPU kernels are several
    times faster than a row-major right operand's on CPUs without bf16 units."""
    torch.manual_seed(0)
    x, W, b = torch.randn(32, 16), torch.randn(16, 48), torch.randn(48)
    sae = _softsae()
    recorder = _LowMatmuls()
    with autocast(), recorder:
        topk_encode(x, W, b, 4, 4)
        shifted_linear(x, torch.randn(16), W, b)
        sae.estimate_k_from_sae_in(x)
    assert len(recorder.right_is_linear_layout) == 3
    assert all(recorder.right_is_linear_layout)


def test_softsae_k_per_row_is_read_in_float32_under_autocast() -> None:
    """The hard phase's (and inference's) integer k of each row is the same under CPU bf16
    autocast as without it: the frozen estimator is read with autocast off."""
    sae = _softsae(d_in=64, d_sae=512, k=32)
    with torch.no_grad():
        sae.k_est_w_out.normal_(0, 0.3)
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(3))
    want = sae.k_for_rows(x, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sae.k_for_rows(x, x)
        in_bf16 = sae.estimate_k_from_sae_in(x).floor().long().clamp(1, sae.cfg.k_max)
    assert len(torch.unique(want)) > 5
    assert (in_bf16 != want).any()  # what reading it in bf16 would change
    assert torch.equal(got, want)
