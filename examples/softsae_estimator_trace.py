"""Trace SoftSAE's k-estimator while it trains on the compare's synthetic source.

Every ``--every`` steps it prints the batch's mean and std of k̂, the spread of the estimator's
logits and the share of its hidden units that are active; at the end, the saved SAE's metrics on
held-out samples (explained variance, L0, Spearman of the per-sample L0 with the true L0, dead
latents, MCC). Config fields can be overridden as JSON::

    python examples/softsae_estimator_trace.py --complexity uniform --steps 333 --seed 0
    python examples/softsae_estimator_trace.py --steps 1000 --set '{"k_max": 60}'

Protocol as ``sae-adaptive compare`` (docs/compare.md): only ``k`` (the held-out mean true L0,
rounded) is set, plus the overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--complexity", default="loguniform", choices=("loguniform", "uniform"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=20, help="trace every N steps")
    parser.add_argument("--set", default="{}", help="SoftSAE config overrides as JSON")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from sae_adaptive_plugin.experiments.registry_saes import to_inference_sae
    from sae_adaptive_plugin.experiments.synthetic import (
        CompareConfig,
        VariableComplexityConfig,
        VariableComplexitySource,
        evaluate_sae,
        train_sae,
    )
    from sae_adaptive_plugin.experiments.synthetic_compare import build_compare_sae
    from sae_adaptive_plugin.stats import spearman

    cfg = CompareConfig(
        source=VariableComplexityConfig(complexity=args.complexity),
        steps=args.steps,
        seed=args.seed,
        architectures=("softsae",),
        overrides={"softsae": json.loads(args.set)},
    )
    torch.manual_seed(cfg.seed)
    source = VariableComplexitySource(cfg.source)
    feature_acts, hidden, true_l0 = source.sample(cfg.eval_samples, seed=cfg.seed + 1)
    target = float(true_l0.float().mean())
    sae = build_compare_sae("softsae", cfg, target, round(target))
    prepare = sae.prepare_training_step

    def traced(step_input):
        prepare(step_input)
        step = step_input.n_training_steps
        if step % args.every and step != sae.schedule.hard_topk_start_step:
            return
        with torch.no_grad():
            sae_in = sae.process_sae_in(step_input.sae_in)
            pre = sae_in @ sae.k_est_W_enc + sae.k_est_b_enc
            logit = torch.relu(pre) @ sae.k_est_w_out + sae.k_est_b_out[0]
            k_hat = sae.estimate_k_from_sae_in(sae_in)
        print(
            f"step {step:5d}  k̂ {float(k_hat.mean()):6.2f} ± {float(k_hat.std()):5.2f}  "
            f"logit std {float(logit.std()):.3f}  active hidden {float((pre > 0).float().mean()):.3f}",
            flush=True,
        )

    sae.prepare_training_step = traced
    train_sae(sae, source, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        inference = to_inference_sae(sae, Path(tmp))
        metrics, l0 = evaluate_sae(inference, hidden, feature_acts, source.true_features)
    metrics["spearman_l0_vs_true_l0"] = spearman(l0.float(), true_l0.float())
    metrics["l0_p90"] = float(l0.float().quantile(0.9))
    metrics["true_l0_p90"] = float(true_l0.float().quantile(0.9))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
