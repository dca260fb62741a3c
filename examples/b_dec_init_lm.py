"""One SAE trained on a cached ``compare --lm`` activation set with ``b_dec`` started at zeros or
at the first batch's mean, evaluated on the held-out cache; prints one JSON line.

The SAE is built and trained as ``sae-adaptive compare --lm`` trains its first SAE of a seed
(only ``k`` set, SAELens's ``SAETrainer`` on the cache, ``torch.manual_seed(seed + 1000)``).
``--b-dec-init-method mean`` sets the field on ours and patches the same start into SAELens's
own SAEs (as ``compare --b-dec-init-method mean`` does); ``--set JSON`` sets more fields of
ours; ``--unit-patch`` gives an SAE without ``decoder_unit_norm`` (SAELens's TopK) the same
decoder handling; ``--auxk-rare-tokens N`` sets ``auxk_rare_tokens`` (patched into SAELens's
own SAEs likewise). Reported: held-out explained variance,
mean L0, latents dead on the held-out cache and on the compare's fixed sample of 65,536
training tokens, and training seconds::

    python examples/b_dec_init_lm.py topk --b-dec-init-method mean --seed 0 \\
        --train-cache runs/lm_cache/train-1fdb04f35d9d24da.safetensors \\
        --heldout-cache runs/lm_cache/heldout-4ca02f9aeaacbd95.safetensors \\
        --d-sae 4608 --batch-size 1024 --steps 1000
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
    parser.add_argument("architecture")
    parser.add_argument("--b-dec-init-method", choices=("zeros", "mean"), required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-cache", required=True, type=Path)
    parser.add_argument("--heldout-cache", required=True, type=Path)
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", default="{}", help="more config fields of ours, as JSON")
    parser.add_argument(
        "--auxk-rare-tokens",
        type=int,
        default=None,
        help="auxk_rare_tokens for the SAE (patched into SAELens's own, as compare does)",
    )
    parser.add_argument(
        "--unit-patch",
        action="store_true",
        help="patch decoder_unit_norm's recipe into an SAE without the field (SAELens's TopK)",
    )
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file

    from sae_adaptive_plugin.experiments.lm_benchmark import (
        LMCompareConfig,
        build_sae,
        dead_latent_sample,
        train_on_cache,
    )
    from sae_adaptive_plugin.experiments.registry_saes import (
        dead_latents,
        reconstruction_metrics,
        to_inference_sae,
    )

    torch.set_num_threads(args.threads)
    train = load_file(str(args.train_cache))["acts"]
    held = load_file(str(args.heldout_cache))["acts"]
    cfg = LMCompareConfig(
        model="(cached)",
        text="(cached)",
        heldout_text="(cached)",
        seed=args.seed,
        steps=args.steps,
        d_sae=args.d_sae,
        k=args.k,
        batch_size=args.batch_size,
        b_dec_init_method=args.b_dec_init_method,
        auxk_rare_tokens=args.auxk_rare_tokens,
        overrides={args.architecture: json.loads(args.set)},
    )
    torch.manual_seed(args.seed + 1000)
    sae = build_sae(args.architecture, cfg, train.shape[1], args.k)
    if args.unit_patch:
        from sae_adaptive_plugin.saes.topk_family import keep_decoder_unit

        step = sae.training_forward_pass

        def unit_step(step_input):  # unit rows before each step, the parallel gradient removed
            keep_decoder_unit(sae)
            return step(step_input)

        sae.training_forward_pass = unit_step
    seconds = train_on_cache(sae, train, cfg)
    with tempfile.TemporaryDirectory() as folder:
        inference = to_inference_sae(sae, Path(folder) / "sae")
        metrics, _ = reconstruction_metrics(inference, held)
        dead_train = dead_latents(inference, dead_latent_sample(train))
    row = {
        "architecture": args.architecture,
        "b_dec_init_method": args.b_dec_init_method,
        "set": json.loads(args.set),
        "unit_patch": args.unit_patch,
        "auxk_rare_tokens": args.auxk_rare_tokens,
        "seed": args.seed,
        "steps": args.steps,
        "d_sae": args.d_sae,
        "explained_variance": round(metrics["explained_variance"], 4),
        "l0_mean": round(metrics["l0_mean"], 1),
        "dead_latents": metrics["dead_latents"],
        "dead_latents_train": dead_train,
        "train_seconds": round(seconds, 1),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
