"""``sae-adaptive compare``: adaptive vs fixed-sparsity SAEs on variable-complexity ground truth.

Trains SAELens's ``topk``, ``batchtopk``, ``matryoshka_batchtopk`` and this package's
``softsae``, ``adaptivek``, ``hierarchical_topk`` (whichever are registered) on one synthetic
stream (:mod:`sae_adaptive_plugin.experiments.synthetic`), then writes to ``--out``:

- ``results.json``: the settings, the true-L0 statistics, skipped architectures and one entry per
  SAE (HierarchicalTopK: one per evaluated budget ``k'``);
- ``l0_vs_true_l0.png``: each SAE's per-sample L0 against the sample's true L0;
- ``ev_vs_l0.png``: explained variance against mean L0 (HierarchicalTopK as a curve over ``k'``);
- ``saes/<architecture>/``: every trained SAE in SAELens's inference format;

and prints the results as a Markdown table. The command owns ``--out``: an existing non-empty
folder is refused unless ``--overwrite``, and then replaced whole (the new run is written to a
sibling temporary folder and renamed into place), so no entry of an earlier run survives. Nothing
heavy is imported at module level.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from sae_adaptive_plugin import reporting
from sae_adaptive_plugin.experiments.plots import plot_ev_vs_l0, plot_l0_vs_true

RESULTS_FILENAME = "results.json"
L0_PLOT_FILENAME = "l0_vs_true_l0.png"
EV_PLOT_FILENAME = "ev_vs_l0.png"

#: Table columns: (header, key, format)
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("SAE", "name", "{}"),
    ("explained var.", "explained_variance", "{:.3f}"),
    ("MSE", "mse", "{:.3f}"),
    ("cos sim", "cosine_similarity", "{:.3f}"),
    ("L0 mean", "l0_mean", "{:.1f}"),
    ("L0 std", "l0_std", "{:.1f}"),
    ("L0 p90", "l0_p90", "{:.1f}"),
    ("dead", "dead_latents", "{:.0f}"),
    ("MCC", "mcc", "{:.3f}"),
    ("Spearman(L0, true L0)", "l0_spearman_vs_true", "{:.3f}"),
    ("EV − TopK at same L0", "ev_gap_vs_topk", "{:+.3f}"),
    ("train s", "train_seconds", "{:.1f}"),
)
#: Columns shown as ``mean ± std`` when the rows come from several seeds.
_WITH_STD = (
    "explained_variance",
    "l0_mean",
    "dead_latents",
    "mcc",
    "l0_spearman_vs_true",
    "ev_gap_vs_topk",
)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The result rows as a GitHub Markdown table (``mean ± std`` over seeds where present)."""
    return reporting.markdown_table(rows, TABLE_COLUMNS, cell=reporting.cell_with_std(_WITH_STD))


def build_config(args: argparse.Namespace) -> Any:
    """The :class:`CompareConfig` for the command's flags (``--quick`` = a tiny problem)."""
    from sae_adaptive_plugin.experiments.synthetic import CompareConfig, VariableComplexityConfig

    if args.quick:
        source = VariableComplexityConfig(
            num_features=64, hidden_dim=32, min_l0=1.0, max_l0=12.0, orthogonalize_steps=20
        )
        cfg = CompareConfig(source=source, steps=60, batch_size=128, eval_samples=1024)
    else:
        cfg = CompareConfig()
    source_flags = {
        "features": "num_features",
        "hidden_dim": "hidden_dim",
        "min_l0": "min_l0",
        "max_l0": "max_l0",
        "shared_component": "shared_component",
        "complexity": "complexity",
    }
    for flag, name in source_flags.items():
        if getattr(args, flag) is not None:
            setattr(cfg.source, name, getattr(args, flag))
    for flag in ("steps", "batch_size"):
        if getattr(args, flag) is not None:
            setattr(cfg, flag, getattr(args, flag))
    cfg.seed = args.seed
    cfg.source.seed = args.seed
    cfg.device = args.device
    if args.architectures:
        cfg.architectures = tuple(a.strip() for a in args.architectures.split(",") if a.strip())
    cfg.overrides = dict(getattr(args, "overrides", {}) or {})
    from sae_adaptive_plugin.experiments.registry_saes import (
        check_overrides,
        copy_recipe_arguments,
    )

    copy_recipe_arguments(args, cfg)

    check_overrides(cfg.overrides)
    return cfg


def _config_dict(cfg: Any) -> dict[str, Any]:
    import dataclasses

    d = dataclasses.asdict(cfg)
    d["architectures"] = list(cfg.architectures)
    d["hierarchical_k_fractions"] = list(cfg.hierarchical_k_fractions)
    return d


def compare_command(args: argparse.Namespace) -> int:
    if args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    import os

    # Idle OpenMP threads sleep instead of spinning: on a small, shared CPU machine spinning
    # threads made 2-thread training 5-30x slower than 1 thread (measured, see README). Only
    # effective when torch is not imported yet (the console script).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.lm:
        from sae_adaptive_plugin.experiments.lm_report import run_lm

        return run_lm(args)

    import torch

    from sae_adaptive_plugin.experiments.synthetic_compare import (
        aggregate_seeds,
        iter_finite_problems,
        run_compare,
    )
    from sae_adaptive_plugin.outputs import OutputExistsError, refuse_existing, replacing_dir

    torch.set_num_threads(args.threads)
    if args.seeds < 1:
        print(f"error: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    try:
        cfg = build_config(args)
        cfg.validate()
        out = Path(args.out or "runs/compare")
        refuse_existing(out, args.overwrite, "--out")
    except (ValueError, OutputExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = []
    with replacing_dir(out) as staging:
        for offset in range(args.seeds):
            seed_cfg = dataclasses.replace(
                cfg, seed=cfg.seed + offset, source=dataclasses.replace(cfg.source)
            )
            seed_cfg.source.seed = seed_cfg.seed
            if args.seeds > 1:
                print(f"== seed {seed_cfg.seed} ({offset + 1}/{args.seeds})")
            seed_out = staging if args.seeds == 1 else staging / f"seed{seed_cfg.seed}"
            runs.append(run_compare(seed_cfg, seed_out))
        result = aggregate_seeds(runs) if len(runs) > 1 else runs[0]
        payload = {
            "config": _config_dict(cfg),
            "true_l0": result.info,
            "fixed_k": result.fixed_k,
            "skipped": result.skipped,
            "results": result.rows,
        }
        if len(runs) > 1:
            payload["seeds"] = [r.info["seed"] for r in runs]
            payload["per_seed"] = [{"true_l0": r.info, "results": r.rows} for r in runs]
        (staging / RESULTS_FILENAME).write_text(json.dumps(payload, indent=2) + "\n")
        if result.rows:
            plot_l0_vs_true(result, staging / L0_PLOT_FILENAME)
            plot_ev_vs_l0(result, staging / EV_PLOT_FILENAME)
    for name, reason in result.skipped.items():
        print(f"skipped {name}: {reason}")
    problems = list(iter_finite_problems(result.rows))
    print()
    print(
        f"true L0: mean {result.info['true_l0_mean']:.1f} ± {result.info['true_l0_std']:.1f} "
        f"(range {result.info['true_l0_min']}–{result.info['true_l0_max']}); "
        f"fixed-k baselines at k = {result.fixed_k}; {cfg.steps} steps × {cfg.batch_size} samples"
        + (f"; mean ± std over seeds {result.info['seeds']}" if len(runs) > 1 else "")
    )
    print()
    print(markdown_table(result.rows))
    print()
    print(f"wrote {out / RESULTS_FILENAME}, {out / L0_PLOT_FILENAME}, {out / EV_PLOT_FILENAME}")
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return 1 if problems or not result.rows else 0
