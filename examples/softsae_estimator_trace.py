"""Trace SoftSAE's k-estimator while it trains on the compare's synthetic source or on cached
SmolLM2 activations.

Every ``--every`` steps it prints the penalty's target, the batch's mean and std of k̂, the mean
and spread of the estimator's logits and the share of its hidden units that are active.
Synthetic source (the default): at the end, the saved SAE's metrics on held-out samples
(explained variance, L0, Spearman of the per-sample L0 with the true L0, dead latents, MCC).
Config fields can be overridden as JSON::

    python examples/softsae_estimator_trace.py --complexity uniform --steps 333 --seed 0
    python examples/softsae_estimator_trace.py --steps 1000 --set '{"k_max": 60}'

Protocol as ``sae-adaptive compare`` (docs/compare.md): only ``k`` (the held-out mean true L0,
rounded) is set, plus the overrides. ``--lm-cache FILE`` instead trains on a training cache of
``sae-adaptive compare --lm`` (``runs/lm_cache/train-*.safetensors``) with that command's
trainer settings, and ``--stop N`` ends the run after N of its ``--steps`` steps (the schedules
still follow ``--steps``)::

    python examples/softsae_estimator_trace.py --lm-cache runs/lm_cache/train-1fdb04f35d9d24da.safetensors \\
        --steps 1000 --stop 300 --seed 1 --d-sae 4608 --k 32 --batch-size 1024
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from sae_adaptive_plugin.experiments.synthetic_compare import SingleRun


class _Stop(Exception):
    """Raised by the traced step to end an LM run at ``--stop``."""


def trace(sae, every: int, stop: int | None = None) -> None:
    """Wrap ``sae.prepare_training_step`` to print the estimator's state every ``every`` steps
    (and each of the first 20), raising :class:`_Stop` at step ``stop``."""
    import torch

    prepare = sae.prepare_training_step

    def traced(step_input):
        prepare(step_input)
        step = step_input.n_training_steps
        if stop is not None and step >= stop:
            raise _Stop
        if step >= 20 and step % every and step != sae.schedule.hard_topk_start_step:
            return
        with torch.no_grad():
            sae_in = sae.process_sae_in(step_input.sae_in)
            pre = sae_in @ sae.k_est_W_enc + sae.k_est_b_enc
            logit = torch.relu(pre) @ sae.k_est_w_out + sae.k_est_b_out[0]
            k_hat = sae.estimate_k_from_sae_in(sae_in)
        print(
            f"step {step:5d}  target {sae.schedule.k_target_at(step):6.1f}  "
            f"k̂ {float(k_hat.mean()):6.2f} ± {float(k_hat.std()):5.2f}  "
            f"logit {float(logit.mean()):7.2f} ± {float(logit.std()):6.2f}  "
            f"active hidden {float((pre > 0).float().mean()):.3f}",
            flush=True,
        )

    sae.prepare_training_step = traced


def trace_lm(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import load_file

    from sae_adaptive_plugin.experiments.lm_benchmark import (
        LMCompareConfig,
        build_sae,
        train_on_cache,
    )

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    acts = load_file(args.lm_cache)["acts"]
    cfg = LMCompareConfig(
        d_sae=args.d_sae,
        k=args.k,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        overrides={"softsae": json.loads(args.set)},
    )
    sae = build_sae("softsae", cfg, acts.shape[1], args.k)
    trace(sae, args.every, args.stop)
    with contextlib.suppress(_Stop):
        train_on_cache(sae, acts, cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    SingleRun.add_arguments(parser)
    parser.add_argument("--every", type=int, default=20, help="trace every N steps")
    lm = parser.add_argument_group("cached SmolLM2 activations")
    lm.add_argument("--lm-cache", help="a training cache of `sae-adaptive compare --lm`")
    lm.add_argument("--stop", type=int, help="end the run after N steps")
    lm.add_argument("--d-sae", type=int, default=4608)
    lm.add_argument("--k", type=int, default=32)
    lm.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()
    if args.lm_cache:
        trace_lm(args)
        return

    from sae_adaptive_plugin.stats import spearman

    run = SingleRun.from_args("softsae", args)
    trace(run.sae, args.every)
    with tempfile.TemporaryDirectory() as tmp:
        metrics, l0 = run.train_and_evaluate(Path(tmp))
    metrics["spearman_l0_vs_true_l0"] = spearman(l0.float(), run.true_l0.float())
    metrics["l0_p90"] = float(l0.float().quantile(0.9))
    metrics["true_l0_p90"] = float(run.true_l0.float().quantile(0.9))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
