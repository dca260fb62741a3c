"""Time SoftSAE's soft-phase training step over every latent (``soft_candidates=None``) against
over each row's top ``M`` latents, in one process, on the same SAE, next to sparsify's step. Not
used by the package (docs/bench.md, issue 23).

    python examples/soft_candidates_ab.py DEAD THREADS ROUNDS [--autocast] [M ...]
    python examples/soft_candidates_ab.py 0.1 1 2 --autocast     # M = 2·k_max + 2

Prints, per variant, the minimum CPU time of a step over ``ROUNDS`` rounds (each the faster of
two steps after one untimed step following the switch) and its ratio to sparsify's.
"""

import sys
import time

from sae_adaptive_plugin.experiments.bench import prepare_row, train_step
from sae_adaptive_plugin.experiments.bench_setup import BenchConfig, bench_inputs, build_rows


def main() -> None:
    dead, threads, rounds = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    autocast = "--autocast" in sys.argv
    widths = [int(a) for a in sys.argv[4:] if a.isdigit()]
    cfg = BenchConfig(
        threads=threads,
        dead_fraction=dead,
        autocast=autocast,
        rows=("sparsify_topk", "softsae_soft"),
        inference=False,
        memory=False,
    )
    x, dead_mask = bench_inputs(cfg)
    rows = build_rows(cfg, x)
    for row in rows:
        prepare_row(row, cfg, x)
    soft = next(row for row in rows if row.name == "softsae_soft")
    variants = [None, *(widths or [2 * soft.train_sae.cfg.k_max + 2])]

    def timed(row) -> float:
        start = time.process_time()
        train_step(row, x, dead_mask, autocast)
        return time.process_time() - start

    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for row in rows:
            for width in variants if row is soft else ["-"]:
                if row is soft:
                    row.train_sae.cfg.soft_candidates = width
                timed(row)  # one untimed step after a switch
                name = f"{row.name} M={width}" if row is soft else row.name
                times.setdefault(name, []).append(min(timed(row), timed(row)))
    base = min(times["sparsify_topk"])
    for name, ts in times.items():
        print(f"{name:28s} {min(ts):.3f} s  / sparsify {min(ts) / base:.2f}")


if __name__ == "__main__":
    main()
