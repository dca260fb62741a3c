"""Time the bench's training steps with round 8's step changes switched off and on, in one
process, on the same SAEs: the dense training code (``sparse_training_code=False``) against the
COO one, one top-k width for every row against ``rows_topk``'s grouped widths, and the block-end
backward's decoder-row gradient index-added against added by one sparse product (AdaptiveK's
warm-up). Not used by the package (docs/bench.md, issue 23, round 8).

    python examples/step_variants_ab.py DEAD THREADS ROUNDS [--autocast]
    python examples/step_variants_ab.py 0 1 2 --autocast     # the run quoted in docs/bench.md

Prints, per row and variant, the minimum CPU time of a step over ``ROUNDS`` rounds (each the
faster of two steps after one untimed step following the switch) and its ratio to sparsify's.
"""

import sys

from ab_timing import prepared_rows, report

from sae_adaptive_plugin.ops import dispatch, hierarchical, variable_topk

ROWS = ("sparsify_topk", "hierarchical_topk", "adaptivek", "softsae_hard", "adaptivek_warmup")
#: variant: (sparse_training_code, GROUP_MIN_WIDTH, the sparse product); a width above every
#: k_max: one top-k width
VARIANTS = {
    "dense code": (False, 10**9, False),
    "coo": (True, 10**9, False),
    "coo + widths": (True, 16, False),
    "+ rank-one": (True, 16, True),
}


def main() -> None:
    dead, threads, rounds = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    autocast = "--autocast" in sys.argv
    rows, step_time = prepared_rows(ROWS, dead, threads, autocast)

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for row in rows:
            variants = {"-": None} if row.name == "sparsify_topk" else VARIANTS
            for name, setting in variants.items():
                if setting is not None:
                    code, variable_topk.GROUP_MIN_WIDTH, product = setting
                    row.train_sae.cfg.sparse_training_code = code
                    hierarchical.host_check_is_free = (
                        dispatch.host_check_is_free if product else (lambda t: False)
                    )
                times.setdefault((row.name, name), []).append(step_time(row))
    report(times)


if __name__ == "__main__":
    main()
