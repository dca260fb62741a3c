"""How many latents per row carry a soft-phase mask weight that float32 can see.

Builds the bench's ``softsae_soft`` row (``sae-adaptive bench``'s shapes, soft-phase step and
estimator centring), solves the LapSum threshold ``τ`` on one random batch and counts, per row,
the positive pre-activations ``z`` with ``u = (z − τ)/α > −c``: outside that window the mask
``½eᵘ`` is below ``½e^{−c}`` (``c = 16``: below float32's ε). Prints the mean and largest count for
a few ``c``, and ``τ/α`` (where the zeros of the ReLU sit, in units of α).

Usage: ``python examples/softsae_mask_window.py --d-in 768 --d-sae 16384 --batch 1024``.
"""

from __future__ import annotations

import argparse

import torch

from sae_adaptive_plugin.experiments.bench_setup import (
    BenchConfig,
    add_shape_arguments,
    bench_inputs,
    build_rows,
    shape_from_args,
)
from sae_adaptive_plugin.ops.lapsum import lapsum_threshold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_shape_arguments(parser, BenchConfig(batch=1024))
    args = parser.parse_args()
    cfg = BenchConfig(**shape_from_args(args), rows=("softsae_soft",))
    x, _ = bench_inputs(cfg)
    row = build_rows(cfg, x)[0]
    sae = row.train_sae
    with torch.no_grad():
        sae_in = sae.process_sae_in(x)
        z = sae.plain_hidden_pre(sae_in).relu()
        k_hat = sae.estimate_k_from_sae_in(sae_in)
        alpha = float(sae.schedule.alpha_at(row.step_index) * sae._alpha_unit(z.amax(dim=-1)))
        tau = lapsum_threshold(z, k_hat, alpha, sae.cfg.k_max)
        u = (z - tau[:, None]) / alpha
    print(
        f"d_in={cfg.d_in} d_sae={cfg.d_sae} k={cfg.k} batch={cfg.batch}, step {row.step_index}: "
        f"α = {alpha:.3g}, mean τ/α = {float((tau / alpha).mean()):.1f}, "
        f"positive z per row {float((z > 0).sum(-1).float().mean()):.0f}\n"
    )
    print("| c | latents with z > 0 and u > −c per row: mean | max | share of d_sae |")
    print("|---|---|---|---|")
    for c in (10, 16, 20, 25):
        n = ((u > -c) & (z > 0)).sum(dim=-1).float()
        print(
            f"| {c} | {float(n.mean()):.0f} | {float(n.max()):.0f} | {float(n.mean()) / cfg.d_sae:.1%} |"
        )


if __name__ == "__main__":
    main()
