"""Time what a training step's ``feature_acts`` costs outside the SAE: building the code from a
top-k selection, dense (``scatter_topk``, the default) or as a COO tensor (``sparse_code``, what
``use_sparse_activations=True`` gives), and SAELens's ``SAETrainer`` bookkeeping on it (the
firing mask and activation frequencies it updates every step). Checks that both forms give the
same firing mask and frequencies. Not used by the package (docs/bench.md, issue 23).

    python examples/feature_acts_bookkeeping.py                 # B 4,096, d_sae 16,384, k 64
    python examples/feature_acts_bookkeeping.py --batch 1024 --d-sae 4608 --k 32
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from sae_adaptive_plugin.ops.variable_topk import TopKResult, scatter_topk
from sae_adaptive_plugin.saes.topk_family import sparse_code


def trainer_bookkeeping(feature_acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(did_fire [d_sae], firing counts [d_sae])`` as SAELens's ``SAETrainer._train_step``
    computes them from a step's ``feature_acts`` (dense or COO)."""
    firing = feature_acts.bool().float()
    did_fire = firing.sum(-2).bool()
    if did_fire.is_sparse:
        did_fire = did_fire.to_dense()
    counts = firing.sum(0)
    return did_fire, counts.to_dense() if counts.is_sparse else counts


def _ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    top = torch.randn(args.batch, args.d_sae).topk(args.k, dim=-1)
    selection = TopKResult(
        top.values.relu(), top.indices, torch.ones(args.batch, args.k, dtype=torch.bool)
    )
    dense, coo = scatter_topk(selection, args.d_sae), sparse_code(selection, args.d_sae)
    (dense_fire, dense_counts), (coo_fire, coo_counts) = map(trainer_bookkeeping, (dense, coo))
    if not (torch.equal(dense_fire, coo_fire) and torch.equal(dense_counts, coo_counts)):
        raise SystemExit("dense and COO feature_acts gave different bookkeeping")
    rows = [
        ("build dense (scatter_topk)", lambda: scatter_topk(selection, args.d_sae)),
        ("build COO (sparse_code)", lambda: sparse_code(selection, args.d_sae)),
        ("SAETrainer bookkeeping, dense", lambda: trainer_bookkeeping(dense)),
        ("SAETrainer bookkeeping, COO", lambda: trainer_bookkeeping(coo)),
    ]
    print(f"B={args.batch} d_sae={args.d_sae} k={args.k} threads={args.threads}")
    print("| step part | ms |\n|---|---:|")
    for name, fn in rows:
        print(f"| {name} | {_ms(fn, args.repeats):.1f} |")


if __name__ == "__main__":
    main()
