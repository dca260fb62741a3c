"""SoftSAE's soft phase before and after the blocked ops, against SAELens's TopK, in one process.

Builds the bench's ``topk`` and ``softsae_soft`` rows (``sae-adaptive bench``'s shapes and
soft-phase step) and times full training steps (forward, backward, grad clip, Adam) of TopK, the
soft phase through the blocked ops (``fused_soft = True``, the default) and through the plain
composition (``fused_soft = False``, what the soft phase computed before), in alternating rounds.
Reports the median process CPU time per step (``time.process_time``: far less sensitive than wall
time to other jobs on a shared CPU), its ratio to TopK, and the peak step memory measured as the
bench does (``torch.profiler`` allocator events).

Usage: ``python examples/bench_softsae_soft_phase.py --d-in 768 --d-sae 16384 --batch 1024
--threads 1 --steps 3``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sae_adaptive_plugin.experiments.bench import cpu_peak_bytes, prepare_row, train_step
from sae_adaptive_plugin.experiments.bench_setup import (
    BenchConfig,
    add_shape_arguments,
    bench_inputs,
    build_rows,
    shape_from_args,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_shape_arguments(parser, BenchConfig(batch=1024))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    cfg = BenchConfig(
        **shape_from_args(args),
        threads=args.threads,
        rows=("topk", "softsae_soft"),
        inference=False,
    )
    x, dead = bench_inputs(cfg)
    topk, soft = build_rows(cfg, x)
    for row in (topk, soft):
        prepare_row(row, cfg, x)
    variants = {"topk": (topk, None), "softsae soft, blocked": (soft, True)}
    variants["softsae soft, plain (before)"] = (soft, False)

    def step(name: str) -> None:
        row, fused = variants[name]
        if fused is not None:
            row.train_sae.fused_soft = fused
        train_step(row, x, dead)

    for name in variants:  # warm-up
        step(name)
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.steps):
        for name in variants:
            start = time.process_time()
            step(name)
            cpu[name].append(time.process_time() - start)
    peak = {name: cpu_peak_bytes(lambda name=name: step(name)) / 2**20 for name in variants}
    print(
        f"d_in={cfg.d_in} d_sae={cfg.d_sae} k={cfg.k} batch={cfg.batch} threads={cfg.threads}, "
        f"median of {args.steps} steps, torch {torch.__version__}\n"
    )
    print("| row | step CPU time (ms) | / TopK | peak step mem (MiB) | / TopK |")
    print("|---|---|---|---|---|")
    ref_cpu, ref_mem = statistics.median(cpu["topk"]), peak["topk"]
    for name in variants:
        t = statistics.median(cpu[name])
        print(
            f"| {name} | {1000 * t:.0f} | {t / ref_cpu:.2f} | {peak[name]:.0f} "
            f"| {peak[name] / ref_mem:.2f} |"
        )


if __name__ == "__main__":
    main()
