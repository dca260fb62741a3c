"""Per-op profile of one training step of the bench's rows (``torch.profiler``, CPU or CUDA).

Builds the rows exactly as ``sae-adaptive bench`` does (same shapes, same soft-phase step, same
estimator centring), runs ``--warmup`` untimed steps, then profiles one step per row and prints
the ops that take the most self time (forward and backward ops are listed separately: autograd's
backward ops carry ``Backward`` in their names).

Usage: ``python examples/profile_softsae_step.py --d-in 768 --d-sae 16384 --k 64 --batch 4096
--threads 1 --rows topk softsae_soft``.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from sae_adaptive_plugin.bench import ROW_NAMES, BenchConfig, _build_rows, _prepare, _train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", nargs="+", choices=ROW_NAMES, default=["topk", "softsae_soft"])
    parser.add_argument("--top", type=int, default=20, help="ops listed per row")
    args = parser.parse_args()
    cfg = BenchConfig(
        d_in=args.d_in,
        d_sae=args.d_sae,
        k=args.k,
        batch=args.batch,
        device=args.device,
        threads=args.threads,
        rows=tuple(args.rows),
        inference=False,
    )
    cfg.validate()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch, cfg.d_in, generator=gen).to(cfg.device)
    dead = torch.zeros(cfg.d_sae, dtype=torch.bool, device=cfg.device)
    activities = [ProfilerActivity.CPU]
    if cfg.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    sort_by = "self_cuda_time_total" if cfg.device.startswith("cuda") else "self_cpu_time_total"
    for row in _build_rows(cfg, x):
        if row.status != "ok":
            print(f"{row.name}: {row.status} {row.reason}")
            continue
        _prepare(row, cfg, x)
        for _ in range(args.warmup):
            _train_step(row, x, dead)
        with profile(activities=activities) as prof:
            _train_step(row, x, dead)
        total_ms = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1000
        print(f"\n## {row.name} (threads={cfg.threads}; total self CPU time {total_ms:.0f} ms)\n")
        print(prof.key_averages().table(sort_by=sort_by, row_limit=args.top))


if __name__ == "__main__":
    main()
