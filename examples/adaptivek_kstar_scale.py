"""Why AdaptiveK's ``k*`` label is thresholded on the dataset variance, not each row's own.

Trains an AdaptiveK SAE in its warm-up phase only (``k_max`` = 50, HierarchicalTopK all-prefix
loss, never switching to adaptive k) on the default variable-complexity synthetic source
(:mod:`sae_adaptive_plugin.experiments.synthetic`: 256 features / 64 dims, true L0 2–50, shared component
0.3), then labels held-out rows with ``k*`` under both ``kstar_scale`` settings and prints, per
setting and ``target_fvu``: the share of labels stuck at ``k_max``, the Spearman of ``k*`` with the
true L0, the ridge probe's cross-validated R² / Spearman / λ (on ``k*`` and on ``log k*``), and the
median ``k*`` per true-L0 band. Also prints ``‖x − mean‖²`` per band (the per-row scale).

Usage: ``python examples/adaptivek_kstar_scale.py [--steps 1000] [--threads 2]`` (~1 min on 2
CPU cores).
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="warm-up steps")
    parser.add_argument("--eval-samples", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sae_adaptive_plugin.experiments.synthetic import (
        CompareConfig,
        VariableComplexityConfig,
        VariableComplexitySource,
        train_sae,
    )
    from sae_adaptive_plugin.ops.adaptive_k import kstar_from_prefix_errors
    from sae_adaptive_plugin.probe import ComplexityProbe
    from sae_adaptive_plugin.saes.adaptivek import (
        KSTAR_SCALES,
        AdaptiveKTrainingSAE,
        AdaptiveKTrainingSAEConfig,
    )
    from sae_adaptive_plugin.stats import spearman

    src_cfg = VariableComplexityConfig(seed=args.seed)
    source = VariableComplexitySource(src_cfg)
    torch.manual_seed(args.seed)
    k_max = 50
    sae = AdaptiveKTrainingSAE(
        AdaptiveKTrainingSAEConfig(
            d_in=src_cfg.hidden_dim,
            d_sae=src_cfg.num_features,
            k=k_max // 2,  # the target mean L0 (required; unused here, the labels set target_fvu)
            k_min=1,
            k_max=k_max,
            # warm-up until the last step (the run must fit a probe; it is not used here)
            probe_warmup_steps=args.steps - 1,
            probe_min_r2=float("-inf"),
        )
    )
    run = CompareConfig(
        source=src_cfg, d_sae=src_cfg.num_features, steps=args.steps, batch_size=256, lr=3e-3
    )
    train_sae(sae, source, run)

    _, x, true_l0 = source.sample(args.eval_samples, seed=args.seed + 1)
    true_l0 = true_l0.float()
    errors, xs = [], x.split(256)
    with torch.no_grad():
        for xb in xs:
            x_in = sae.read_input(xb)  # the prefixes of every row's top k_max, as in the warm-up
            every_row_k_max = torch.full(x_in.shape[:-1], k_max)
            _, selection = sae.select_top_k(sae.center_input(x_in), every_row_k_max)
            errors.append(sae.prefix_errors_from_selection(x_in, selection))
    err = torch.cat(errors)
    row_var = torch.cat([(xb - xb.mean(0)).pow(2).sum(-1) for xb in xs])
    mean_var = torch.cat([(xb - xb.mean(0)).pow(2).sum(-1).mean().expand(len(xb)) for xb in xs])
    bands = [(lo, lo * 1.3) for lo in (2, 5, 10, 20, 40)]
    sel = [(true_l0 >= a) & (true_l0 < b) for a, b in bands]
    print("mean ||x - batch mean||^2 per true-L0 band", [f"{row_var[s].mean():.1f}" for s in sel])
    for tau in (0.1, 0.2):
        for scale in KSTAR_SCALES:
            var = mean_var if scale == "dataset" else row_var
            ks = kstar_from_prefix_errors(err, var, tau).float()
            fit = ComplexityProbe.fit(x, ks).report
            fit_log = ComplexityProbe.fit(x, ks.log()).report
            assert fit is not None and fit_log is not None
            print(
                f"target_fvu={tau} kstar_scale={scale}: at k_max {(ks == k_max).float().mean():.3f}"
                f"  spearman(k*, true L0) {spearman(ks, true_l0):.3f}"
                f"  probe R2 {fit.r2:.3f} spearman {fit.spearman:.3f} lambda {fit.lam:g}"
                f"  | log k* probe R2 {fit_log.r2:.3f} spearman {fit_log.spearman:.3f}"
                f"  | median k* per band {[int(ks[s].median()) for s in sel]}"
            )


if __name__ == "__main__":
    main()
