"""Time SoftSAE's soft-phase training step over every latent (``soft_candidates = d_sae``)
against over each row's top ``M`` latents, in one process, on the same SAE, next to sparsify's
step. Not used by the package (docs/bench.md, issue 23).

    python examples/soft_candidates_ab.py DEAD THREADS ROUNDS [--autocast] [M ...]
    python examples/soft_candidates_ab.py 0.1 1 2 --autocast     # M = 2·k_max + 2

Prints, per variant, the minimum CPU time of a step over ``ROUNDS`` rounds (each the faster of
two steps after one untimed step following the switch) and its ratio to sparsify's.
"""

import sys

from ab_timing import prepared_rows, report


def main() -> None:
    dead, threads, rounds = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    autocast = "--autocast" in sys.argv
    widths = [int(a) for a in sys.argv[4:] if a.isdigit()]
    rows, step_time = prepared_rows(("sparsify_topk", "softsae_soft"), dead, threads, autocast)
    soft = next(row for row in rows if row.name == "softsae_soft")
    cfg = soft.train_sae.cfg  # d_sae: every latent (the published soft phase)
    variants = [cfg.d_sae, *(widths or [2 * cfg.k_max + 2])]

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for row in rows:
            for width in variants if row is soft else ["-"]:
                if row is soft:
                    row.train_sae.cfg.soft_candidates = width
                name = f"M={width}" if row is soft else "-"
                times.setdefault((row.name, name), []).append(step_time(row))
    report(times)


if __name__ == "__main__":
    main()
