"""Time the LapSum threshold solve: exact sort-based closed form vs. 40-step bisection.

Usage: ``python examples/bench_lapsum.py [--device cuda] [--threads 2]``. Prints the median of 5
timed calls (after 2 warm-up calls) for a few ``rows × F`` shapes, float32 scores, α = 0.01,
``k̂`` uniform in ``[1, 64]``; also the largest row-sum error of each method.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sae_adaptive_plugin.ops.lapsum import laplace_cdf, lapsum_threshold, lapsum_threshold_bisect


def _time(fn, device: str) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [(256, 4096), (64, 16384)]
    if args.device.startswith("cuda"):
        shapes = [(4096, 16384), (4096, 65536)]
    alpha = 0.01
    for rows, f in shapes:
        g = torch.Generator(device=args.device).manual_seed(0)
        s = torch.randn(rows, f, device=args.device, generator=g).relu()
        k = torch.rand(rows, device=args.device, generator=g) * 63 + 1
        t_sort = _time(lambda s=s, k=k: lapsum_threshold(s, k, alpha), args.device)
        t_bis = _time(lambda s=s, k=k: lapsum_threshold_bisect(s, k, alpha, 40), args.device)
        errs = []
        for tau in (lapsum_threshold(s, k, alpha), lapsum_threshold_bisect(s, k, alpha, 40)):
            errs.append((laplace_cdf((s - tau[:, None]) / alpha).sum(-1) - k).abs().max().item())
        print(
            f"{args.device} {rows}x{f}: sort {t_sort * 1e3:.2f} ms (max |Σm-k̂| {errs[0]:.2e}), "
            f"bisection-40 {t_bis * 1e3:.2f} ms (max |Σm-k̂| {errs[1]:.2e})"
        )


if __name__ == "__main__":
    main()
