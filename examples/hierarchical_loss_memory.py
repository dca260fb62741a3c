"""Peak memory (and wall time) of the HierarchicalTopK loss, forward + backward, in both forms.

Compares :func:`sae_adaptive_plugin.ops.hierarchical.hierarchical_loss_naive` (materialises
``B × K × d``) with :func:`~sae_adaptive_plugin.ops.hierarchical.hierarchical_loss` (``B × K × K``
Gram form, chunked gather; ``gram``) and ``prefix_reconstruction_errors(...).mean()`` (the same
loss through the per-prefix errors, as the training SAE computes it; ``prefix``) at the issue's shape ``B=4096, K=64, d=768`` on CPU, float32.

How it measures: each form runs in its own fresh Python process. The inputs (``x − b_dec``
``[B, d]``, sorted ``values`` ``[B, K]``, ``W_dec`` ``[d_sae, d]``, ``indices`` ``[B, K]``) are
allocated and touched first; the process's resident-set high-water mark
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is read before and after one forward + backward
of the loss. The difference is the peak extra memory of the loss, including the gradient
buffers of ``values``, ``W_dec`` and ``x − b_dec``, which are the same for both forms
(``d_sae·d·4`` bytes dominate them: 48 MiB at the default ``d_sae=16384``).

    .venv/bin/python examples/hierarchical_loss_memory.py            # all forms, defaults
    .venv/bin/python examples/hierarchical_loss_memory.py --batch 1024 --k 32

Measured 2026-11-21 with the first command (2 shared CPU cores, torch CPU float32, d_sae=16384):
peak extra RSS ``gram`` 314.8 MiB, ``prefix`` 326.1 MiB, ``naive`` 3812.9 MiB (one ``B×K×d``
tensor alone is 768 MiB). Wall times on that loaded machine were too noisy to quote.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _measure(form: str, batch: int, k: int, d: int, d_sae: int, threads: int) -> dict:
    import resource
    import time

    import torch

    from sae_adaptive_plugin.ops.hierarchical import (
        hierarchical_loss,
        hierarchical_loss_naive,
        prefix_reconstruction_errors,
    )

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    residual0 = torch.randn(batch, d, generator=g).requires_grad_()
    values = torch.rand(batch, k, generator=g).sort(-1, descending=True).values.requires_grad_()
    W_dec = (torch.randn(d_sae, d, generator=g) / d**0.5).requires_grad_()
    indices = torch.randint(0, d_sae, (batch, k), generator=g)
    fn = {
        "naive": hierarchical_loss_naive,
        "gram": hierarchical_loss,
        "prefix": lambda *a: prefix_reconstruction_errors(*a).mean(),  # what training uses
    }[form]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    loss = fn(residual0, values, W_dec, indices)
    loss.backward()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "form": form,
        "loss": float(loss),
        "peak_extra_MiB": round((after - before) / 1024, 1),
        "seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--form", choices=["naive", "gram", "prefix", "all"], default="all")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.form, args.batch, args.k, args.d, args.d_sae, args.threads)))
        return
    forms = ["gram", "prefix", "naive"] if args.form == "all" else [args.form]
    shape = f"B={args.batch} K={args.k} d={args.d} d_sae={args.d_sae} float32 CPU"
    print(f"HierarchicalTopK loss, forward+backward, {shape}")
    print(f"one B×K×d float32 tensor = {args.batch * args.k * args.d * 4 / 2**20:.0f} MiB")
    for form in forms:
        cmd = [sys.executable, __file__, "--child", "--form", form]
        cmd += ["--batch", str(args.batch), "--k", str(args.k), "--d", str(args.d)]
        cmd += ["--d-sae", str(args.d_sae), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{r['form']:>6}: peak extra RSS {r['peak_extra_MiB']:8.1f} MiB, "
            f"{r['seconds']:6.2f} s, loss {r['loss']:.6f}"
        )


if __name__ == "__main__":
    main()
