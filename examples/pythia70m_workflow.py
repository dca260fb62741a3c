"""Pythia-70M end to end: fit a complexity probe, train AdaptiveK / SoftSAE / HierarchicalTopK and
the TopK / BatchTopK baselines from the example YAMLs, evaluate them with SAELens's metrics, and plot
the k each SAE uses at every token of a text.

    python examples/pythia70m_workflow.py --device cuda            # the full runs (a GPU job)
    python examples/pythia70m_workflow.py --device cuda --quick    # 2M tokens each: a smoke run

Steps (each is one ``sae-adaptive`` command, run in-process here):

1. ``fit-probe``: surprisal labels (no labelled data needed) on the last token of each text of
   ``--probe-dataset`` → ``OUT/probe.safetensors``. With your own labelled texts use
   ``--probe-labels column`` and a dataset/file with ``text`` and ``score`` columns.
2. ``train`` each ``examples/pythia70m_*.yaml``; AdaptiveK gets ``sae.probe_path`` = that probe
   (the paper's order: probe first, then the SAE with the probe frozen).
3. ``eval`` all five: explained variance, CE-loss score, KL score, L0 and the per-token k
   distribution → ``OUT/eval.json`` and a Markdown table.
4. Plot per-token k over ``--text`` for every SAE → ``OUT/per_token_k.png``.

``--set KEY=VALUE`` is passed to every ``train`` (e.g. ``--set training_tokens=10_000_000``);
``--model`` / ``--probe-dataset`` replace the model and the probe texts (a local model folder and
file work too, which is how this script was smoke-tested offline on a tiny random model).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARCHITECTURES = ("topk", "batchtopk", "hierarchical_topk", "softsae", "adaptivek")
DEFAULT_TEXT = (
    "The cat sat on the mat. Notwithstanding the heterogeneity of the epistemological "
    "frameworks under consideration, the committee's conclusions remain provisional."
)


def main(argv: list[str] | None = None) -> int:
    from sae_adaptive_plugin.cli import main as sae_adaptive

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/pythia70m", help="output folder")
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="pythia-70m-deduped")
    p.add_argument("--hook", default="blocks.3.hook_resid_post")
    p.add_argument("--probe-dataset", default="NeelNanda/pile-10k")
    p.add_argument("--probe-labels", choices=("surprisal", "column"), default="surprisal")
    p.add_argument("--probe-texts", type=int, default=4000)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="2M training tokens per SAE")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--text", default=DEFAULT_TEXT, help="text for the per-token k plot")
    p.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    probe = out / "probe.safetensors"

    # 1. probe
    rc = sae_adaptive(
        [
            "fit-probe",
            "--model",
            args.model,
            "--hook",
            args.hook,
            "--dataset",
            args.probe_dataset,
            "--labels",
            args.probe_labels,
            "--positions",
            "last",
            "--max-texts",
            str(args.probe_texts),
            "--context-size",
            str(args.context_size),
            "--device",
            args.device,
            "--out",
            str(probe),
            "--json",
            str(out / "probe.json"),
        ]
    )
    if rc:
        return rc

    # 2. train
    common = [f"device={args.device}", f"model_name={args.model}", f"hook_name={args.hook}"]
    if args.quick:
        common += ["training_tokens=2_000_000", "lr_warm_up_steps=50", "lr_decay_steps=100"]
    finals = []
    for arch in args.architectures:
        run = out / arch
        sets = [
            *common,
            f"checkpoint_path={run / 'checkpoints'}",
            f"output_path={run / 'final'}",
            *args.overrides,
        ]
        if arch == "adaptivek":
            sets.append(f"sae.probe_path={probe}")
        cmd = ["train", str(HERE / f"pythia70m_{arch}.yaml")]
        for s in sets:
            cmd += ["--set", s]
        rc = sae_adaptive(cmd)
        if rc:
            return rc
        finals.append(run / "final")

    # 3. evaluate
    rc = sae_adaptive(
        [
            "eval",
            *map(str, finals),
            "--n-batches",
            str(args.eval_batches),
            "--device",
            args.device,
            "--json",
            str(out / "eval.json"),
        ]
    )
    if rc:
        return rc

    # 4. per-token k over one text
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sae_lens import SAE

    from sae_adaptive_plugin.data import local_lm
    from sae_adaptive_plugin.evaluation import per_token_k_on_text

    model = local_lm.load_model(args.model, device=args.device, hook_names=[args.hook])
    fig, ax = plt.subplots(figsize=(12, 4))
    per_sae = {}
    labels: list[str] = []
    for path in finals:
        sae = SAE.load_from_disk(str(path), device=args.device)
        labels, ks = per_token_k_on_text(sae, model, args.text)
        per_sae[path.parent.name] = ks
        ax.plot(range(len(ks)), ks, marker="o", markersize=3, label=path.parent.name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_ylabel("active latents (k) at this token")
    ax.set_title(f"{args.model} {args.hook}: per-token k")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "per_token_k.png", dpi=150)
    (out / "per_token_k.json").write_text(json.dumps({"tokens": labels, "k": per_sae}, indent=2))
    print(f"wrote {out / 'per_token_k.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
