"""Per-op profile of one training step of the bench's rows (``torch.profiler``), forward and
backward separately, printed as Markdown tables.

Builds the rows exactly as ``sae-adaptive bench`` does (same shapes, same soft-phase step, same
estimator centring), runs ``--warmup`` untimed steps, then profiles one step per row in three
parts: ``training_forward_pass``, ``loss.backward()`` and the rest (grad clip, ``Adam.step``,
``zero_grad``). ``--plain-soft`` adds the soft phase through the plain composition
(``fused_soft = False``: what the soft phase computed before the blocked ops).

Usage: ``python examples/profile_softsae_step.py --d-in 768 --d-sae 16384 --batch 1024
--threads 1``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from sae_lens.saes.sae import TrainStepInput
from torch.profiler import ProfilerActivity, profile

from sae_adaptive_plugin.experiments.bench import prepare_row, train_step
from sae_adaptive_plugin.experiments.bench_setup import (
    ROW_NAMES,
    BenchConfig,
    add_shape_arguments,
    bench_inputs,
    build_rows,
    shape_from_args,
)


def _profiled(fn: Callable[[], Any]) -> tuple[Any, list[tuple[str, float, int]], float]:
    """``(fn(), [(op, self CPU ms, calls)], wall ms)`` — ops sorted by self CPU time."""
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    wall = 1000 * (time.perf_counter() - start)
    ops = [(e.key, e.self_cpu_time_total / 1000, e.count) for e in prof.key_averages()]
    return result, sorted(ops, key=lambda op: -op[1]), wall


def _table(title: str, ops: list[tuple[str, float, int]], wall: float, top: int) -> str:
    total = sum(ms for _, ms, _ in ops)
    lines = [
        f"{title}: {total:.0f} ms self CPU time in ops ({wall:.0f} ms wall)",
        "",
        "| op | self CPU (ms) | share | calls |",
        "|---|---|---|---|",
    ]
    for name, ms, calls in ops[:top]:
        lines.append(f"| `{name}` | {ms:.0f} | {100 * ms / max(total, 1e-9):.0f}% | {calls} |")
    return "\n".join(lines)


def _profile_row(
    row: Any, x: torch.Tensor, dead: torch.Tensor, top: int, autocast: bool = False
) -> str:
    sae = row.train_sae
    step_input = TrainStepInput(
        sae_in=x,
        coefficients=row.coefficients,
        dead_neuron_mask=dead,
        n_training_steps=row.step_index,
        is_logging_step=False,
    )

    def forward() -> Any:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            return sae.training_forward_pass(step_input)

    out, fwd, fwd_wall = _profiled(forward)
    _, bwd, bwd_wall = _profiled(lambda: out.loss.backward())

    def rest() -> None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        row.optimizer.step()
        row.optimizer.zero_grad(set_to_none=True)

    _, opt, opt_wall = _profiled(rest)
    opt_total = sum(ms for _, ms, _ in opt)
    return "\n\n".join(
        [
            _table("Forward (`training_forward_pass`)", fwd, fwd_wall, top),
            _table("Backward (`loss.backward()`)", bwd, bwd_wall, top),
            f"Grad clip + Adam + zero_grad: {opt_total:.0f} ms self CPU ({opt_wall:.0f} ms wall).",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_shape_arguments(parser, BenchConfig(d_in=256, d_sae=4096, batch=1024))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", nargs="+", choices=ROW_NAMES, default=["topk", "softsae_soft"])
    parser.add_argument("--plain-soft", action="store_true", help="also the plain soft phase")
    parser.add_argument("--top", type=int, default=10, help="ops listed per table")
    parser.add_argument("--autocast", action="store_true", help="forward under bf16 autocast")
    parser.add_argument(
        "--dead-fraction", type=float, default=0.1, help="latents marked dead for AuxK"
    )
    args = parser.parse_args()
    cfg = BenchConfig(
        **shape_from_args(args),
        device=args.device,
        threads=args.threads,
        rows=tuple(args.rows),
        inference=False,
        dead_fraction=args.dead_fraction,
        autocast=args.autocast,
    )
    x, dead = bench_inputs(cfg)
    print(
        f"d_in={cfg.d_in} d_sae={cfg.d_sae} k={cfg.k} batch={cfg.batch} threads={cfg.threads} "
        f"device={cfg.device}, torch {torch.__version__}"
    )
    for row in build_rows(cfg, x):
        if row.status != "ok":
            print(f"\n{row.name}: {row.status} {row.reason}")
            continue
        prepare_row(row, cfg, x)
        variants = [(row.name, True)]
        if row.name == "softsae_soft" and args.plain_soft:
            variants.append(("softsae_soft, plain composition (fused_soft=False)", False))
        for name, fused in variants:
            if hasattr(row.train_sae, "fused_soft"):
                row.train_sae.fused_soft = fused
            for _ in range(args.warmup):
                train_step(row, x, dead, args.autocast)
            print(f"\n#### {name} ({cfg.threads} thread{'s' * (cfg.threads > 1)})\n")
            print(_profile_row(row, x, dead, args.top, args.autocast))


if __name__ == "__main__":
    main()
