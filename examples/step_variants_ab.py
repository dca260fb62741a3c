"""Time the bench's training steps with round 8's step changes switched off and on, in one
process, on the same SAEs: the dense training code (``sparse_training_code=False``) against the
COO one, and one top-k width for every row against ``rows_topk``'s grouped widths. Not used by
the package (docs/bench.md, issue 23, round 8).

    python examples/step_variants_ab.py DEAD THREADS ROUNDS [--autocast]
    python examples/step_variants_ab.py 0 1 2 --autocast     # the run quoted in docs/bench.md

Prints, per row and variant, the minimum CPU time of a step over ``ROUNDS`` rounds (each the
faster of two steps after one untimed step following the switch) and its ratio to sparsify's.
"""

import sys
import time

from sae_adaptive_plugin.experiments.bench import prepare_row, train_step
from sae_adaptive_plugin.experiments.bench_setup import BenchConfig, bench_inputs, build_rows
from sae_adaptive_plugin.ops import variable_topk

ROWS = ("sparsify_topk", "hierarchical_topk", "adaptivek", "softsae_hard")
#: variant: (sparse_training_code, GROUP_MIN_WIDTH); a width above every k_max: one top-k width
VARIANTS = {"dense code": (False, 10**9), "coo": (True, 10**9), "coo + widths": (True, 16)}


def main() -> None:
    dead, threads, rounds = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    autocast = "--autocast" in sys.argv
    cfg = BenchConfig(
        threads=threads,
        dead_fraction=dead,
        autocast=autocast,
        rows=ROWS,
        inference=False,
        memory=False,
    )
    x, dead_mask = bench_inputs(cfg)
    rows = build_rows(cfg, x)
    for row in rows:
        prepare_row(row, cfg, x)

    def timed(row) -> float:
        start = time.process_time()
        train_step(row, x, dead_mask, autocast)
        return time.process_time() - start

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for row in rows:
            variants = {"-": None} if row.name == "sparsify_topk" else VARIANTS
            for name, setting in variants.items():
                if setting is not None:
                    row.train_sae.cfg.sparse_training_code, variable_topk.GROUP_MIN_WIDTH = setting
                timed(row)  # one untimed step after a switch
                times.setdefault((row.name, name), []).append(min(timed(row), timed(row)))
    base = min(times[("sparsify_topk", "-")])
    for (row_name, variant), ts in times.items():
        print(f"{row_name:18s} {variant:13s} {min(ts):.3f} s  / sparsify {min(ts) / base:.2f}")


if __name__ == "__main__":
    main()
