"""Dead latents of the SAEs saved by ``sae-adaptive compare --lm`` runs, counted on the held-out
text and on the compare's fixed sample of training tokens (``dead_latents_train``), for runs made
before that column existed (single-seed runs: ``--seed S``, not ``--seeds N``). HierarchicalTopK is
counted at its saved largest budget. Prints one Markdown row per SAE and run::

    python examples/lm_dead_latents.py --train-cache runs/lm_cache/train-1fdb04f35d9d24da.safetensors \\
        --heldout-cache runs/lm_cache/heldout-4ca02f9aeaacbd95.safetensors runs/lm_1m/seed0 runs/lm_1m/seed1

The training cache must be the one the runs trained on (the first ``train_tokens`` rows of it
are used, as the compare does); the saved results are read, never written.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="+", type=Path, help="--out folders of single-seed compare --lm runs"
    )
    parser.add_argument("--train-cache", required=True, type=Path)
    parser.add_argument("--heldout-cache", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from sae_lens import SAE
    from safetensors.torch import load_file

    from sae_adaptive_plugin.experiments.lm_benchmark import dead_latent_sample
    from sae_adaptive_plugin.experiments.registry_saes import dead_latents

    torch.set_num_threads(args.threads)
    held = load_file(args.heldout_cache)["acts"]
    train = load_file(args.train_cache)["acts"]
    print("| run | SAE | d_sae | dead (held-out) | dead (train) |")
    print("|---|---|---:|---:|---:|")
    for run in args.runs:
        results = json.loads((run / "results.json").read_text())
        sample = dead_latent_sample(train[: results["config"]["train_tokens"]])
        for folder in sorted((run / "saes").iterdir()):
            sae = SAE.load_from_disk(str(folder))
            d_sae = sae.cfg.d_sae
            row = (dead_latents(sae, held), dead_latents(sae, sample))
            print(f"| {run} | {folder.name} | {d_sae} | {row[0]} | {row[1]} |", flush=True)


if __name__ == "__main__":
    main()
