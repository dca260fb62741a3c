"""Time the bench's training steps under CPU bf16 autocast with the weights of our low-precision
matmuls cast in ``nn.Linear``'s layout (``ops.dispatch.linear_weight``, the package's) against
cast in their own row-major layout (``w.to(dtype)``, what autocast does), in one process, on the
same SAEs, next to sparsify's and SAELens's TopK steps. Not used by the package (docs/bench.md,
issue 23, round 9).

    python examples/linear_layout_ab.py DEAD THREADS ROUNDS [D_IN D_SAE K BATCH]
    python examples/linear_layout_ab.py 0.1 1 1 576 4608 32 1024     # the run quoted in docs/bench.md

Prints, per row and variant, the minimum CPU time of a step over ``ROUNDS`` rounds (each the
faster of two steps after one untimed step following the switch) and its ratio to sparsify's.
"""

import sys

from ab_timing import prepared_rows, report

import sae_adaptive_plugin.ops.shifted_linear as shifted_linear_module
import sae_adaptive_plugin.ops.variable_topk as variable_topk_module
import sae_adaptive_plugin.saes.softsae as softsae_module
from sae_adaptive_plugin.ops.dispatch import linear_weight

ROWS = (
    "sparsify_topk",
    "topk",
    "hierarchical_topk",
    "softsae_soft",
    "softsae_hard",
    "adaptivek",
    "adaptivek_warmup",
)
MODULES = (variable_topk_module, shifted_linear_module, softsae_module)
VARIANTS = {"nn.Linear layout": linear_weight, "row-major": lambda w, dtype: w.to(dtype)}


def main() -> None:
    dead, threads, rounds = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    shape = dict(zip(("d_in", "d_sae", "k", "batch"), map(int, sys.argv[4:8]), strict=False))
    rows, step_time = prepared_rows(ROWS, dead, threads, True, **shape)

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for row in rows:
            ours = row.name not in ("sparsify_topk", "topk")
            for name, cast in VARIANTS.items() if ours else [("-", None)]:
                for module in MODULES if cast is not None else ():
                    module.linear_weight = cast
                times.setdefault((row.name, name), []).append(step_time(row))
    report(times)


if __name__ == "__main__":
    main()
