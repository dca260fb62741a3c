"""How often AdaptiveK's warm-up labels by search differ from the first-crossing ``k*``.

After its first labelled batch, AdaptiveK's warm-up finds each row's ``k*`` by search: the first
block of 8 prefixes whose end error reaches ``τ·V``, then the first prefix inside that block
(:func:`~sae_adaptive_plugin.ops.adaptive_k.kstar_in_block`). It equals the first crossing over
every prefix (:func:`~sae_adaptive_plugin.ops.adaptive_k.kstar_from_prefix_errors`) unless an
earlier block dips below ``τ·V`` and rises above it again by its end. This trains AdaptiveK with
the compare's settings (only ``k``, the defaults otherwise, SAELens's trainer) on the synthetic
compare sources and, at every labelled step, also computes the first-crossing labels of the same
rows from every prefix's error; prints per source, run length and seed the share of rows whose
labels agree, the mean label of each, and the mean ``|difference|`` where they differ.

With ``--quality`` it instead trains AdaptiveK twice per setting and seed through the synthetic
compare (``run_compare``, the same stream and held-out set): labels by search (the package) and
labels by the first crossing over every prefix (patched in), and prints both SAEs' held-out
explained variance, dead latents, MCC and Spearman(L0, true L0).

Usage: ``python examples/kstar_search_agreement.py [--seeds 3] [--steps 1000 333]
[--threads 1] [--quality] [--json OUT [--overwrite]]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from typing import Any

import torch

from sae_adaptive_plugin.outputs import refuse_existing, replacing_file


def _recording(sae: Any, tally: dict[str, float]) -> None:
    """Wrap ``sae._warmup_labels`` to add, per labelled step, the first-crossing labels of the
    same rows into ``tally``."""
    search = sae._warmup_labels

    def both(encoding: Any) -> torch.Tensor:
        labels = search(encoding)
        exact = sae.kstar_from_errors(sae.prefix_errors_of(encoding).detach(), encoding.sae_in)
        differ = labels != exact
        tally["rows"] += labels.numel()
        tally["agree"] += float((~differ).sum())
        tally["search_sum"] += float(labels.float().sum())
        tally["exact_sum"] += float(exact.float().sum())
        tally["diff_sum"] += float((labels - exact).abs()[differ].float().sum())
        return labels

    sae._warmup_labels = both


def _first_crossing_labels(sae: Any, encoding: Any) -> torch.Tensor:
    """The labels from every prefix's error (what the warm-up computed before the search)."""
    from sae_adaptive_plugin.distributed import gather_rows

    errors = gather_rows(sae.prefix_errors_of(encoding).detach())
    return sae.kstar_from_errors(errors, gather_rows(encoding.sae_in))


def _quality(args: Any) -> list[dict[str, Any]]:
    """Held-out metrics of AdaptiveK trained with each labelling, same data and seeds."""
    from unittest import mock

    from sae_adaptive_plugin.experiments.synthetic import CompareConfig, VariableComplexityConfig
    from sae_adaptive_plugin.experiments.synthetic_compare import run_compare
    from sae_adaptive_plugin.saes.adaptivek import AdaptiveKTrainingSAE

    rows = []
    keys = ("explained_variance", "dead_latents", "mcc", "l0_spearman_vs_true", "l0_mean")
    print("| source | steps | seed | labels | EV | dead | MCC | Spearman | mean L0 |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for complexity in args.sources:
        for steps in args.steps:
            for seed in range(args.seeds):
                for variant in ("search", "first_crossing"):
                    cfg = CompareConfig(
                        source=VariableComplexityConfig(complexity=complexity),
                        steps=steps,
                        seed=seed,
                        architectures=("adaptivek",),
                        topk_sweep=False,
                    )
                    patch = (
                        mock.patch.object(
                            AdaptiveKTrainingSAE, "_warmup_labels", _first_crossing_labels
                        )
                        if variant == "first_crossing"
                        else contextlib.nullcontext()
                    )
                    with tempfile.TemporaryDirectory() as out, patch:
                        result = run_compare(cfg, out, log=lambda _: None)
                    (found,) = [r for r in result.rows if r["architecture"] == "adaptivek"]
                    row = {"source": complexity, "steps": steps, "seed": seed, "labels": variant}
                    row.update({key: found.get(key) for key in keys})
                    rows.append(row)
                    print(
                        "| "
                        + " | ".join(
                            str(v) if not isinstance(v, float) else f"{v:.4f}" for v in row.values()
                        )
                        + " |",
                        flush=True,
                    )
    return rows


def _write(rows: list[dict[str, Any]], args: Any) -> None:
    """``rows`` as JSON to ``--json`` (if given), written beside it and renamed into place."""
    if args.json:
        with replacing_file(args.json) as tmp:
            tmp.write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 333])
    parser.add_argument("--sources", nargs="+", default=["loguniform", "uniform"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument(
        "--quality", action="store_true", help="held-out metrics of both labellings"
    )
    args = parser.parse_args()
    if args.json:  # refused before training, not after it
        refuse_existing(args.json, args.overwrite, "--json")
    torch.set_num_threads(args.threads)
    if args.quality:
        rows = _quality(args)
        _write(rows, args)
        return

    from sae_adaptive_plugin.experiments.synthetic import (
        CompareConfig,
        VariableComplexityConfig,
        train_sae,
    )
    from sae_adaptive_plugin.experiments.synthetic_compare import build_compare_sae, compare_data

    rows = []
    print(
        "| source | steps | seed | labelled rows | agree | mean k* search | first crossing "
        "| mean abs diff where they differ |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for complexity in args.sources:
        for steps in args.steps:
            for seed in range(args.seeds):
                cfg = CompareConfig(
                    source=VariableComplexityConfig(complexity=complexity),
                    steps=steps,
                    seed=seed,
                    architectures=("adaptivek",),
                )
                source, _, _, _, target_l0 = compare_data(cfg)
                sae = build_compare_sae("adaptivek", cfg, target_l0, round(target_l0))
                tally = dict.fromkeys(("rows", "agree", "search_sum", "exact_sum", "diff_sum"), 0.0)
                _recording(sae, tally)
                with tempfile.TemporaryDirectory():
                    train_sae(sae, source, cfg)
                n, differ = tally["rows"], tally["rows"] - tally["agree"]
                row = {
                    "source": complexity,
                    "steps": steps,
                    "seed": seed,
                    "labelled_rows": int(n),
                    "agree": tally["agree"] / max(n, 1),
                    "mean_search": tally["search_sum"] / max(n, 1),
                    "mean_first_crossing": tally["exact_sum"] / max(n, 1),
                    "mean_abs_diff_where_differ": tally["diff_sum"] / max(differ, 1),
                }
                rows.append(row)
                print(
                    f"| {complexity} | {steps} | {seed} | {int(n)} | {row['agree']:.4f} | "
                    f"{row['mean_search']:.2f} | {row['mean_first_crossing']:.2f} | "
                    f"{row['mean_abs_diff_where_differ']:.2f} |",
                    flush=True,
                )
    _write(rows, args)


if __name__ == "__main__":
    main()
