"""Time the HierarchicalTopK prefix errors (forward + backward) in the package's form (residuals over
``embedding_bag`` bags since commit 3be4cf8; a blocked Gram form before) against a chunked
cumulative-sum form written here (``O(B·K·d)`` work, backward by a reverse cumulative sum),
and print their largest relative differences. Not used by the package (docs/METHODS.md §1).

    python examples/prefix_errors_cumsum.py 1024 64      # B, K (d 768, F 16,384, one thread)
"""

import sys
import time

import torch

from sae_adaptive_plugin.ops.hierarchical import prefix_reconstruction_errors

torch.set_num_threads(1)


class _PrefixErrors(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r0, values, W_dec, indices, chunk):
        B, K = values.shape
        out = r0.new_empty(B, K)
        for s in range(0, B, chunk):
            rows = W_dec[indices[s : s + chunk]].to(r0.dtype)  # [b,K,d]
            r = r0[s : s + chunk].unsqueeze(1) - torch.cumsum(
                values[s : s + chunk].unsqueeze(-1) * rows, dim=1
            )
            out[s : s + chunk] = r.pow(2).sum(-1)
        ctx.save_for_backward(r0, values, W_dec, indices)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g):
        r0, values, W_dec, indices = ctx.saved_tensors
        chunk = ctx.chunk
        grad_r = torch.empty_like(r0)
        grad_v = torch.empty_like(values)
        grad_w = torch.zeros(W_dec.shape, dtype=r0.dtype, device=W_dec.device)
        d = W_dec.shape[1]
        for s in range(0, r0.shape[0], chunk):
            idx = indices[s : s + chunk]
            rows = W_dec[idx].to(r0.dtype)
            v = values[s : s + chunk]
            r = r0[s : s + chunk].unsqueeze(1) - torch.cumsum(v.unsqueeze(-1) * rows, dim=1)
            S = (2 * g[s : s + chunk]).unsqueeze(-1) * r  # dL/dr_j
            S = S.flip(1).cumsum(1).flip(1)  # Σ_{j≥i}
            grad_r[s : s + chunk] = S[:, 0]
            grad_v[s : s + chunk] = -(S * rows).sum(-1)
            grad_w.index_add_(0, idx.reshape(-1), (-v.unsqueeze(-1) * S).reshape(-1, d))
        return grad_r, grad_v, grad_w.to(W_dec.dtype), None, None


def run(fn, B, K, d=768, F=16384, reps=2):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(F, d, generator=g) / d**0.5
    W.requires_grad_(True)
    r0 = torch.randn(B, d, generator=g, requires_grad=True)
    v = torch.rand(B, K, generator=g).sort(-1, descending=True).values.requires_grad_(True)
    idx = torch.stack([torch.randperm(F, generator=g)[:K] for _ in range(B)])
    ts = []
    for _ in range(reps):
        t = time.process_time()
        e = fn(r0, v, W, idx)
        e.mean().backward()
        ts.append(time.process_time() - t)
    return min(ts), e.detach(), r0.grad, v.grad, W.grad


B = int(sys.argv[1])
K = int(sys.argv[2])
chunk = max(1, (1 << 22) // (K * 768))
t_pkg, e1, gr1, gv1, gw1 = run(lambda r, v, w, i: prefix_reconstruction_errors(r, v, w, i), B, K)
t_cum, e2, gr2, gv2, gw2 = run(lambda r, v, w, i: _PrefixErrors.apply(r, v, w, i, chunk), B, K)
print(f"B={B} K={K}: package {t_pkg:.2f}s  cumsum {t_cum:.2f}s  ratio {t_cum / t_pkg:.2f}")
for a, b, n in ((e1, e2, "err"), (gr1, gr2, "r0"), (gv1, gv2, "v"), (gw1, gw2, "W")):
    print(n, float((a - b).abs().max() / b.abs().max()))
