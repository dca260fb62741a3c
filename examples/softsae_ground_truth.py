"""SoftSAE vs. SAELens TopK and BatchTopK on variable-complexity synthetic ground truth.

Data: ``sae_adaptive_plugin.experiments.synthetic.VariableComplexitySource`` (SAELens ``FeatureDictionary`` +
``ActivationGenerator`` with a per-sample density gate; true L0 ≈ 2–50 per sample). SoftSAE is
trained first; TopK and BatchTopK are then trained with ``k`` = SoftSAE's measured mean L0 (matched
mean L0) and the same step budget, stream, optimiser and learning rate, all through SAELens's
``SAETrainer``. Each inference SAE (saved and reloaded via ``SAE.load_from_disk``) is evaluated on
one held-out set: explained variance, mean/std L0, dead latents, MCC, and the Spearman correlation
between each sample's SAE L0 and its true L0.

Usage: ``python examples/softsae_ground_truth.py [--steps 2000] [--seeds 0 1 2] [--threads 1]
[--alpha-end 0.02]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def softsae_config(d_in: int, d_sae: int, k: int, k_max: int, steps: int, alpha_end: float = 0.02):
    """The SoftSAE settings used by the acceptance test and this script (step budget ``steps``)."""
    from sae_adaptive_plugin.saes.softsae import SoftSAETrainingSAEConfig

    return SoftSAETrainingSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        k_max=k_max,
        k_estimator_hidden=64,
        alpha_start=0.99,
        alpha_end=alpha_end,
        alpha_anneal_steps=steps // 5,
        k_anneal_steps=max(1, steps // 100),
        hard_topk_start_step=(9 * steps) // 10,
    )


def run(steps: int, seed: int, alpha_end: float = 0.02, log=print) -> dict[str, dict[str, float]]:
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )

    from sae_adaptive_plugin.experiments.synthetic import (
        CompareConfig,
        VariableComplexityConfig,
        VariableComplexitySource,
        evaluate_sae,
        spearman,
        to_inference_sae,
        train_sae,
    )
    from sae_adaptive_plugin.saes.softsae import SoftSAETrainingSAE

    src_cfg = VariableComplexityConfig(  # every field pinned: the numbers depend on them
        num_features=128,
        hidden_dim=32,
        min_l0=2,
        max_l0=50,
        zipf_exponent=0.5,
        magnitude_mean=1.0,
        magnitude_std=0.25,
        orthogonalize_steps=50,
        shared_component=0.3,
        seed=seed,
    )
    cfg = CompareConfig(source=src_cfg, steps=steps, batch_size=256, lr=3e-3, seed=seed)
    torch.manual_seed(seed)
    source = VariableComplexitySource(src_cfg)
    feature_acts, hidden, true_l0 = source.sample(4096, seed=seed + 1)
    true_l0 = true_l0.float()
    log(
        f"seed {seed}: true L0 mean {true_l0.mean():.1f}, range [{int(true_l0.min())}, "
        f"{int(true_l0.max())}]"
    )
    out: dict[str, dict[str, float]] = {}

    def fit(name: str, sae) -> dict[str, float]:
        start = time.perf_counter()
        train_sae(sae, source, cfg)
        seconds = time.perf_counter() - start
        inference = to_inference_sae(sae, Path(tempfile.mkdtemp()))
        metrics, l0 = evaluate_sae(inference, hidden, feature_acts, source.true_features)
        metrics["spearman"] = spearman(l0, true_l0)
        metrics["train_seconds"] = seconds
        out[name] = metrics
        log(
            f"  {name:10s} EV {metrics['explained_variance']:.4f}  L0 {metrics['l0_mean']:.2f} ± "
            f"{metrics['l0_std']:.2f}  Spearman {metrics['spearman']:.3f}  dead "
            f"{metrics['dead_latents']}  MCC {metrics['mcc']:.3f}  {seconds:.1f}s"
        )
        return metrics

    k_target = max(1, round(float(true_l0.mean())))
    torch.manual_seed(seed)
    soft = fit(
        "softsae", SoftSAETrainingSAE(softsae_config(32, 128, k_target, 50, steps, alpha_end))
    )
    k = max(1, round(soft["l0_mean"]))
    torch.manual_seed(seed)
    fit("topk", TopKTrainingSAE(TopKTrainingSAEConfig(d_in=32, d_sae=128, k=k)))
    torch.manual_seed(seed)
    fit("batchtopk", BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=32, d_sae=128, k=k)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--alpha-end", type=float, default=0.02, help="SoftSAE's final α")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [run(args.steps, seed, args.alpha_end) for seed in args.seeds]
    print(f"\nmean over seeds {args.seeds}, {args.steps} steps of 256 samples:")
    for name in results[0]:
        ev = statistics.mean(r[name]["explained_variance"] for r in results)
        sp = statistics.mean(r[name]["spearman"] for r in results)
        l0 = statistics.mean(r[name]["l0_mean"] for r in results)
        print(f"  {name:10s} EV {ev:.4f}  mean L0 {l0:.2f}  Spearman {sp:.3f}")


if __name__ == "__main__":
    main()
