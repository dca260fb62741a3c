"""How many true features each SAE recovers, by decoder cosine, on the compare's synthetic source.

MCC (the compare's column) is the Hungarian-matched mean |cos| over every true feature, so a dead
latent, still at its random start, counts in it like a poorly aligned live one. This script trains
one SAE per architecture and seed as ``sae-adaptive compare`` does (only ``k`` set; SAELens's
trainer; the SAE saved and reloaded), then counts the true features whose best decoder row has
|cos| above 0.5, 0.7 and 0.9, the same for the quarters of the features by firing rate, and the
mean best |cos| of the live and of the dead latents. Fixed-k SAEs get ``k`` = the source's mean
true L0, rounded (the compare gives them the adaptive SAEs' measured mean L0 instead)::

    python examples/feature_recovery.py --architectures adaptivek,softsae,topk --seeds 3
    python examples/feature_recovery.py --complexity uniform --json runs/recovery_uniform.jsonl

One JSON line per SAE on stdout (and appended to ``--json``), then a mean-over-seeds table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from sae_lens import SAE

from sae_adaptive_plugin.experiments.synthetic_compare import SingleRun

THRESHOLDS = (0.5, 0.7, 0.9)
COLUMNS = ("mcc", "dead", "recovered>0.5", "recovered>0.7", "recovered>0.9")


def recovery(decoder: torch.Tensor, true: torch.Tensor, fires: torch.Tensor, rate: torch.Tensor):
    """Counts of true features recovered above each threshold (all, and by firing-rate quarter)
    and the mean best |cos| of live and dead latents."""
    cos = (
        torch.nn.functional.normalize(decoder.float(), dim=-1)
        @ torch.nn.functional.normalize(true.float(), dim=-1).T
    ).abs()
    best_true, best_latent = cos.max(0).values, cos.max(1).values
    out: dict[str, float] = {f"recovered>{t}": int((best_true > t).sum()) for t in THRESHOLDS}
    order = rate.argsort(descending=True)
    for i, part in enumerate(order.chunk(4)):
        out[f"recovered>0.7_q{i + 1}"] = int((best_true[part] > 0.7).sum())
    dead = fires == 0
    out["best_cos_live"] = float(best_latent[~dead].mean())
    out["best_cos_dead"] = float(best_latent[dead].mean()) if dead.any() else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    SingleRun.add_arguments(parser)
    parser.add_argument("--architectures", default="adaptivek,softsae,topk")
    parser.add_argument("--seeds", type=int, default=1, help="seeds SEED..SEED+N-1")
    parser.add_argument("--json", type=Path, default=None, help="append one line per SAE here")
    args = parser.parse_args()
    rows = []
    for seed in range(args.seed, args.seed + args.seeds):
        for arch in args.architectures.split(","):
            run = SingleRun.from_args(arch, argparse.Namespace(**{**vars(args), "seed": seed}))
            with tempfile.TemporaryDirectory() as tmp:
                metrics, _ = run.train_and_evaluate(Path(tmp))
                with torch.no_grad():
                    inference = SAE.load_from_disk(tmp)
                    fires = (inference.encode(run.hidden) != 0).sum(0)
                    decoder = inference.W_dec.detach()
            rate = (run.feature_acts != 0).float().mean(0)
            row = {
                "architecture": arch,
                "complexity": args.complexity,
                "steps": args.steps,
                "seed": seed,
                "set": args.set,
                "explained_variance": metrics["explained_variance"],
                "l0_mean": metrics["l0_mean"],
                "mcc": metrics["mcc"],
                "dead": int((fires == 0).sum()),
                **recovery(decoder, run.source.true_features, fires, rate),
            }
            rows.append(row)
            line = json.dumps(
                {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
            )
            print(line, flush=True)
            if args.json is not None:
                with args.json.open("a") as f:
                    f.write(line + "\n")
    print("\n| SAE | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for arch in args.architectures.split(","):
        mine = [r for r in rows if r["architecture"] == arch]
        cells = []
        for col in COLUMNS:
            values = [r[col] for r in mine]
            std = statistics.pstdev(values) if len(values) > 1 else 0.0
            cells.append(
                f"{statistics.fmean(values):.3f} ± {std:.3f}"
                if col == "mcc"
                else f"{statistics.fmean(values):.0f} ± {std:.0f}"
            )
        print(f"| {arch} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
