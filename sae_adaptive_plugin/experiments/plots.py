"""The pictures of ``sae-adaptive compare`` (synthetic) and ``compare --lm`` (real model).

matplotlib is imported inside each function (Agg backend), so importing this module is cheap.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

#: Marker of each architecture drawn as a point in the ``… vs L0`` pictures.
L0_POINT_MARKERS = {
    "topk": "s",
    "batchtopk": "D",
    "matryoshka_batchtopk": "v",
    "softsae": "o",
    "adaptivek": "^",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(name: str) -> str:
    return name.replace("hierarchical_topk", "HTopK").replace("matryoshka_batchtopk", "matryoshka")


def plot_l0_vs_true(result: Any, path: Path) -> None:
    """One hexbin panel per SAE: its per-sample L0 against the sample's true L0."""
    plt = _pyplot()

    rows = [r for r in result.rows if r["architecture"] not in ("hierarchical_topk", "topk_sweep")]
    hier = [r for r in result.rows if r["architecture"] == "hierarchical_topk"]
    if hier:  # the HierarchicalTopK budget closest to the fixed-k baselines
        rows.append(min(hier, key=lambda r: abs(r["k_eval"] - result.fixed_k)))
    n = max(1, len(rows))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(4.0 * ncols + 1.2, 3.6 * nrows + 0.6),
        squeeze=False,
        layout="constrained",
    )
    true_l0 = result.true_l0.numpy()
    top = max([float(true_l0.max())] + [float(result.sae_l0[r["name"]].max()) for r in rows])
    image = None
    for ax, row in zip(axes.flat, rows):
        sae_l0 = result.sae_l0[row["name"]].numpy()
        image = ax.hexbin(
            true_l0,
            sae_l0,
            gridsize=30,
            extent=(0, top + 1, 0, top + 1),
            mincnt=1,
            bins="log",
            cmap="viridis",
        )
        ax.plot([0, top + 1], [0, top + 1], "r--", lw=1, label="SAE L0 = true L0")
        ax.set_title(
            f"{_short(row['name'])}\nSpearman {row['l0_spearman_vs_true']:.2f}", fontsize=10
        )
        ax.set_xlabel("true L0 (active true features)")
        ax.set_ylabel("SAE L0 (active latents)")
        ax.set_aspect("equal")
        ax.legend(loc="upper left", fontsize=8)
    for ax in list(axes.flat)[len(rows) :]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="samples per bin (log)")
    fig.suptitle(f"Per-sample SAE L0 vs true L0 ({len(true_l0)} held-out samples)", fontsize=12)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def draw_budget_curve(
    ax: Any,
    rows: list[dict[str, Any]],
    architectures: tuple[str, ...],
    metric: str,
    style: str,
    color: str,
    label: str,
    alpha: float = 1.0,
) -> None:
    """One line through the rows of ``architectures`` (one per budget ``k``), sorted by mean L0;
    nothing when fewer than two. ``label`` is followed by the budgets and ``)``."""
    curve = sorted(
        (r for r in rows if r["architecture"] in architectures), key=lambda r: r["l0_mean"]
    )
    if len(curve) < 2:
        return
    ax.plot(
        [r["l0_mean"] for r in curve],
        [r[metric] for r in curve],
        style,
        color=color,
        ms=4,
        alpha=alpha,
        label=label + ", ".join(str(r["k_eval"]) for r in curve) + ")",
    )


def draw_l0_points(ax: Any, rows: list[dict[str, Any]], metric: str, ms: int = 8) -> None:
    """Each row as a point at its mean L0, with ± the L0 std over samples as error bar."""
    for row in rows:
        ax.errorbar(
            row["l0_mean"],
            row[metric],
            xerr=row["l0_std"],
            fmt=L0_POINT_MARKERS.get(row["architecture"], "x"),
            ms=ms,
            capsize=3,
            label=f"{row['name']} (L0 {row['l0_mean']:.1f} ± {row['l0_std']:.1f})",
        )


def plot_ev_vs_l0(result: Any, path: Path) -> None:
    """Explained variance against mean L0; HierarchicalTopK as a curve over its budgets."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(10.5, 5.0), layout="constrained")
    draw_budget_curve(
        ax,
        result.rows,
        ("hierarchical_topk",),
        "explained_variance",
        "-o",
        "tab:gray",
        "hierarchical_topk (one SAE, k' = ",
    )
    draw_budget_curve(
        ax,
        result.rows,
        ("topk_sweep", "topk"),
        "explained_variance",
        "--s",
        "tab:blue",
        "topk (one SAE per k = ",
        alpha=0.6,
    )
    fixed_budget = ("hierarchical_topk", "topk_sweep")
    draw_l0_points(
        ax, [r for r in result.rows if r["architecture"] not in fixed_budget], "explained_variance"
    )
    ax.axvline(result.info["true_l0_mean"], color="k", ls=":", lw=1, label="mean true L0")
    ax.set_xlabel("mean L0 per sample (error bar: ± std over samples)")
    ax.set_ylabel("explained variance (held-out)")
    ax.set_title("Reconstruction vs sparsity on variable-complexity ground truth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _variable_rows(result: Any) -> list[dict[str, Any]]:
    return [r for r in result.rows if r["architecture"] not in ("topk", "hierarchical_topk")]


def plot_k_per_token(result: Any, path: Path, n_tokens: int = 60) -> None:
    """Per-token L0 of the variable-k SAEs over the first held-out sequence, surprisal below."""
    plt = _pyplot()

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
    plt = _pyplot()
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
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(10.5, 5.0), layout="constrained")
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
