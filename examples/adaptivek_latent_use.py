"""How many of AdaptiveK's latents are in use, while it trains and after, on the compare's source.

Every ``--every`` steps it prints how many distinct latents fire in the training batch and the
batch's mean and std of L0; at the end, the saved SAE's metrics on held-out samples plus how many
latents never fire (dead), fire on 1–7 samples (rare) or on 8 or more (used). Config fields can be
overridden as JSON, and ``--dead-window`` sets SAELens's AuxK dead-feature window (steps)::

    python examples/adaptivek_latent_use.py
    python examples/adaptivek_latent_use.py --set '{"warmup_loss": "mse"}'
    python examples/adaptivek_latent_use.py --dead-window 20

Protocol as ``sae-adaptive compare`` (docs/compare.md): only ``k`` is set, plus the overrides; the
dead-feature window is otherwise the compare's (a fifth of the steps, at most 1000).
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
    parser.add_argument("--every", type=int, default=50, help="report every N steps")
    parser.add_argument("--dead-window", type=int, default=None, help="AuxK dead window (steps)")
    parser.add_argument(
        "--architecture", default="adaptivek", help="the SAE to follow (default adaptivek)"
    )
    args = parser.parse_args()

    import sae_lens.config
    import torch
    from sae_lens import SAE

    if args.dead_window is not None:
        trainer_init = sae_lens.config.SAETrainerConfig.__init__

        def with_window(self, *a, **kw):
            kw["dead_feature_window"] = args.dead_window
            trainer_init(self, *a, **kw)

        sae_lens.config.SAETrainerConfig.__init__ = with_window

    run = SingleRun.from_args(args.architecture, args)
    sae = run.sae
    forward = sae.training_forward_pass

    def reported(step_input):
        out = forward(step_input=step_input)
        if step_input.n_training_steps % args.every == 0:
            acts = out.feature_acts.detach()
            fired = (acts.to_dense() if acts.is_sparse else acts) != 0  # COO code on the CPU
            l0 = fired.sum(-1).float()
            print(
                f"step {step_input.n_training_steps:5d}  latents firing in the batch "
                f"{int(fired.any(0).sum()):4d}  L0 {float(l0.mean()):5.1f} ± {float(l0.std()):5.1f}",
                flush=True,
            )
        return out

    sae.training_forward_pass = reported
    with tempfile.TemporaryDirectory() as tmp:
        metrics, _ = run.train_and_evaluate(Path(tmp))
        with torch.no_grad():
            inference = SAE.load_from_disk(tmp)
            fires = (inference.encode(run.hidden) != 0).sum(0)
    metrics["dead"] = int((fires == 0).sum())
    metrics["rare_1_to_7"] = int(((fires > 0) & (fires < 8)).sum())
    metrics["used_8_or_more"] = int((fires >= 8).sum())
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
