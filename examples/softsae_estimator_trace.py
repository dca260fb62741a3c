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

from sae_adaptive_plugin.experiments.synthetic_compare import SingleRun


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    SingleRun.add_arguments(parser)
    parser.add_argument("--every", type=int, default=20, help="trace every N steps")
    args = parser.parse_args()

    import torch

    from sae_adaptive_plugin.stats import spearman

    run = SingleRun.from_args("softsae", args)
    sae, true_l0 = run.sae, run.true_l0
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
    with tempfile.TemporaryDirectory() as tmp:
        metrics, l0 = run.train_and_evaluate(Path(tmp))
    metrics["spearman_l0_vs_true_l0"] = spearman(l0.float(), true_l0.float())
    metrics["l0_p90"] = float(l0.float().quantile(0.9))
    metrics["true_l0_p90"] = float(true_l0.float().quantile(0.9))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
