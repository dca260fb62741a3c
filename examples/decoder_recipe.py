"""One SAE of the compare's protocol with EleutherAI sparsify's decoder handling on or off, and a
rate-based AuxK dead criterion; prints the saved SAE's metrics on held-out samples as JSON.

    python examples/decoder_recipe.py hierarchical_topk --set '{"decoder_unit_norm": true}'
    python examples/decoder_recipe.py topk --unit          # the same recipe on SAELens's TopK
    python examples/decoder_recipe.py adaptivek --rate 0.002 --steps 1000 --complexity uniform

``--unit`` applies the recipe by patching the SAE (unit-norm decoder rows before each step, the
gradient's component along each row removed): for SAELens's ``topk``, which has no
``decoder_unit_norm`` field. ``--rate R`` marks a latent dead for AuxK while its firing frequency
(an exponential average over steps, per sample) is below ``R``, besides SAELens's own window.
Protocol as ``sae-adaptive compare`` (docs/compare.md): only ``k`` is set, plus ``--set``.
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
    parser.add_argument("architecture")
    SingleRun.add_arguments(parser)
    parser.add_argument("--unit", action="store_true", help="patch in the decoder recipe")
    parser.add_argument("--rate", type=float, default=0.0, help="rate-based dead threshold")
    args = parser.parse_args()

    import torch
    from sae_lens import SAE

    run = SingleRun.from_args(args.architecture, args)
    sae = run.sae
    forward = sae.training_forward_pass
    freq: list[torch.Tensor] = []
    if args.unit:

        def without_parallel(grad: torch.Tensor) -> torch.Tensor:
            unit = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
            return grad - (grad * unit).sum(-1, keepdim=True) * unit

        sae.W_dec.register_hook(without_parallel)

    def step(step_input):
        if args.unit:
            with torch.no_grad():
                sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        if args.rate > 0 and freq:
            rare = freq[0] < args.rate
            mask = step_input.dead_neuron_mask
            step_input.dead_neuron_mask = rare if mask is None else mask | rare
        out = forward(step_input=step_input)
        fired = (out.feature_acts.detach() != 0).float().mean(0)
        freq[:] = [fired if not freq else 0.98 * freq[0] + 0.02 * fired]
        return out

    sae.training_forward_pass = step
    with tempfile.TemporaryDirectory() as tmp:
        metrics, _ = run.train_and_evaluate(Path(tmp))
        with torch.no_grad():
            fires = (SAE.load_from_disk(tmp).encode(run.hidden) != 0).sum(0)
    metrics["dead"] = int((fires == 0).sum())
    keys = ("explained_variance", "l0_mean", "dead", "mcc", "l0_spearman_vs_true")
    print(
        json.dumps(
            {"architecture": args.architecture, **{k: metrics[k] for k in keys if k in metrics}}
        )
    )


if __name__ == "__main__":
    main()
