"""Relative error of the ops in bfloat16 and under CPU autocast, against float64 (docs/METHODS.md).

Prefix reconstruction errors (the Gram form HierarchicalTopK, the ``mse_at_k`` metrics and
AdaptiveK's k* labels read) at several final FVUs, for bf16 inputs (against float64 of the same
rounded inputs) and float32 inputs under ``torch.autocast("cpu", dtype=torch.bfloat16)``. With
``--graph-breaks``: ``torch._dynamo.explain``'s graph-break count of each op's forward.

    PYTHONPATH=. .venv/bin/python examples/precision_check.py [--graph-breaks]
"""

from __future__ import annotations

import sys

import torch


def problem(fvu: float, B: int = 64, K: int = 32, F: int = 512, d: int = 128, seed: int = 0):
    """Unit decoder rows, sorted decaying coefficients, a residual leaving ``fvu`` unexplained."""
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


def graph_breaks() -> None:
    """Graph breaks of each op's forward at a small shape (float32, CPU)."""
    import torch._dynamo

    from sae_adaptive_plugin.ops.hierarchical import hierarchical_loss, prefix_reconstruction_errors
    from sae_adaptive_plugin.ops.lapsum import lapsum_topk
    from sae_adaptive_plugin.ops.lapsum_decode import lapsum_decode
    from sae_adaptive_plugin.ops.shifted_linear import shifted_linear
    from sae_adaptive_plugin.ops.variable_topk import decode_topk, topk_encode

    torch.manual_seed(0)
    N, d, F, K = 64, 16, 256, 8
    x = torch.randn(N, d)
    W = torch.randn(d, F, requires_grad=True)
    b = torch.zeros(F, requires_grad=True)
    s = (torch.rand(F) + 0.5).requires_grad_()
    W_dec = torch.randn(F, d, requires_grad=True)
    k_hat = torch.full((N,), 4.0)
    idx = torch.stack([torch.randperm(F)[:K] for _ in range(N)])
    vals = torch.rand(N, K).sort(-1, descending=True).values.requires_grad_()

    def alpha():  # a device α, as SoftSAE's alpha_relative gives
        return (x @ W).amax(-1).mean() * 0.1

    cases = {
        "topk_encode": lambda: topk_encode(x, W, b, K, K, scale=s)[1].values.sum(),
        "decode_topk": lambda: decode_topk(vals, idx, W_dec).sum(),
        "shifted_linear": lambda: shifted_linear(x, x[0], W, b, s).sum(),
        "lapsum_decode": lambda: lapsum_decode(x @ W, k_hat, alpha(), W_dec, k_max=8).out.sum(),
        "lapsum_topk": lambda: lapsum_topk((x @ W).relu(), k_hat, alpha(), k_max=8).sum(),
        "prefix_reconstruction_errors": lambda: prefix_reconstruction_errors(
            x, vals, W_dec, idx
        ).sum(),
        "hierarchical_loss": lambda: hierarchical_loss(x, vals, W_dec, idx),
    }
    print("| op | graph breaks |")
    print("|---|---:|")
    for name, fn in cases.items():
        torch._dynamo.reset()
        print(f"| {name} | {torch._dynamo.explain(fn)().graph_break_count} |")


def main() -> None:
    from sae_adaptive_plugin.ops.hierarchical import (
        prefix_reconstruction_errors,
        prefix_reconstruction_errors_naive,
    )

    torch.set_num_threads(1)
    print("| final FVU | bf16 inputs: max rel. error | fp32 under bf16 autocast: max rel. error |")
    print("|---:|---:|---:|")
    for fvu in (0.27, 0.04, 0.01):
        r, v, W, idx = problem(fvu)
        rb, vb, Wb = (t.to(torch.bfloat16) for t in (r, v, W))
        ref = prefix_reconstruction_errors_naive(rb.double(), vb.double(), Wb.double(), idx)
        got = prefix_reconstruction_errors(rb, vb, Wb, idx).double()
        bf16 = float(((got - ref).abs() / ref).max())
        ref32 = prefix_reconstruction_errors_naive(r, v, W, idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = prefix_reconstruction_errors(r.float(), v.float(), W.float(), idx).double()
        amp = float(((got - ref32).abs() / ref32).max())
        print(f"| {fvu} | {bf16:.2e} | {amp:.2e} |")


if __name__ == "__main__":
    graph_breaks() if "--graph-breaks" in sys.argv[1:] else main()
