"""Issue 27's quality bars, read from ``sae-adaptive compare`` results: which are met, with numbers.

Synthetic compares (``sae-adaptive compare --seeds N``, ``results.json``), each given as
``LABEL=PATH``; for SoftSAE and AdaptiveK against the TopK trained at the baselines' ``k``:

- EV − TopK at the same mean L0 ≥ 0;
- Spearman(L0, true L0) ≥ 0.9;
- dead latents ≤ TopK's + 2% of ``d_sae``;
- MCC ≥ TopK's − 0.02;

and HierarchicalTopK's EV within 0.01 of the TopK trained at each budget ``k'``.

SmolLM2 compares (``sae-adaptive compare --lm --seeds N`` or ``examples/merge_lm_seeds.py``), with
``--lm LABEL=PATH``; from the per-seed pairs:

- SoftSAE and AdaptiveK: EV and CE score − the TopK at their rounded mean L0 ≥ 0 (mean over
  seeds), per-token L0 std ≥ 20% of its mean;
- HierarchicalTopK: EV and CE score within 0.01 of the TopK trained at each budget;
- every SAE: held-out dead latents ≤ 10% of ``d_sae``, and the adaptive ones ≤ their TopK's.

Prints one Markdown table per kind; a met bar is in bold::

    python examples/quality_bars.py lu1000=runs/accept/make_demo/results.json \\
        --lm demo=runs/demo_lm/results.json --lm 1m=docs/compare_lm/results_1m.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sae_adaptive_plugin.experiments.lm_report import paired_differences

ADAPTIVE = ("softsae", "adaptivek")
HIERARCHICAL = "hierarchical_topk@k="


def _labelled(text: str) -> tuple[str, dict[str, Any]]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise SystemExit(f"error: expected LABEL=PATH, got {text!r}")
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"error: {file} is not a file")
    return label, json.loads(file.read_text())


def _bar(text: str, met: bool) -> str:
    return f"**{text}**" if met else text


def _rows_by_name(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in results}


def synthetic_rows(label: str, payload: dict[str, Any]) -> list[str]:
    """Markdown rows of one synthetic compare's bars."""
    config = payload["config"]
    d_sae = config["d_sae"] or config["source"]["num_features"]
    rows = _rows_by_name(payload["results"])
    topk = rows["topk"]
    lines = []
    for name in ADAPTIVE:
        if name not in rows:
            continue
        row = rows[name]
        gap, gap_std = row["ev_gap_vs_topk"], row.get("ev_gap_vs_topk_std", 0.0)
        dead, dead_topk = row["dead_latents"], topk["dead_latents"]
        cells = [
            _bar(f"{gap:+.3f} ± {gap_std:.3f}", gap >= 0),
            _bar(f"{row['l0_spearman_vs_true']:.3f}", row["l0_spearman_vs_true"] >= 0.9),
            _bar(f"{dead:.0f} ({dead_topk:.0f})", dead <= dead_topk + 0.02 * d_sae),
            _bar(f"{row['mcc']:.3f} ({topk['mcc']:.3f})", row["mcc"] >= topk["mcc"] - 0.02),
        ]
        lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    budgets = sorted(
        (row for name, row in rows.items() if name.startswith(HIERARCHICAL)),
        key=lambda row: row["k_eval"],
    )
    if budgets:
        cells = ", ".join(
            _bar(f"{row['k_eval']}: {row['ev_gap_vs_topk']:+.3f}", row["ev_gap_vs_topk"] >= -0.01)
            for row in budgets
        )
        top = budgets[-1]
        dead_topk = rows.get(f"topk@k={top['k_eval']}", {}).get("dead_latents")
        dead = (
            _bar(
                f"{top['dead_latents']:.0f} at K ({dead_topk:.0f})",
                top["dead_latents"] <= dead_topk + 0.02 * d_sae,
            )
            if dead_topk is not None
            else ""
        )
        lines.append(f"| {label} | hierarchical_topk: EV − TopK@k' | {cells} | | {dead} | |")
    return lines


def lm_rows(label: str, payload: dict[str, Any]) -> list[str]:
    """Markdown rows of one SmolLM2 compare's bars: the compare's own per-seed pairs
    (:func:`~sae_adaptive_plugin.experiments.lm_report.paired_differences`) and its rows' means."""
    d_sae = payload["config"]["d_sae"]
    per_seed = payload.get("per_seed") or [payload]
    pairs = _rows_by_name(paired_differences(per_seed))
    means = _rows_by_name(payload["results"])
    lines = []
    for name in ADAPTIVE:
        pair = pairs.get(f"{name} − topk at its L0")
        if pair is None:
            continue
        ev, ce, dead_diff = pair["explained_variance"], pair["ce_loss_score"], pair["dead_latents"]
        spreads = [
            row["l0_std"] / row["l0_mean"]
            for seed in per_seed
            for row in seed["results"]
            if row["name"] == name
        ]
        dead = means[name]["dead_latents"]
        cells = [
            _bar(f"{ev:+.4f} ± {pair.get('explained_variance_std', 0.0):.4f}", ev >= 0),
            _bar(f"{ce:+.4f} ± {pair.get('ce_loss_score_std', 0.0):.4f}", ce >= 0),
            _bar(f"{min(spreads):.2f}–{max(spreads):.2f}", min(spreads) >= 0.2),
            _bar(f"{dead:.0f} = {dead / d_sae:.1%} ({dead - dead_diff:.0f})", dead <= 0.1 * d_sae)
            + " / "
            + _bar("≤ TopK" if dead_diff <= 0 else "> TopK", dead_diff <= 0),
        ]
        lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    per_seed_budgets = [
        {
            int(row["name"].split("=")[1])
            for row in seed["results"]
            if row["name"].startswith(HIERARCHICAL)
        }
        for seed in per_seed
    ]
    budgets = sorted(set.intersection(*per_seed_budgets))  # evaluated in every seed
    for k in budgets:
        pair = pairs.get(f"{HIERARCHICAL}{k} − topk@k={k}")
        if pair is None:
            continue
        ev, ce = pair["explained_variance"], pair["ce_loss_score"]
        dead = means[f"{HIERARCHICAL}{k}"]["dead_latents"]
        cells = [
            _bar(f"{ev:+.4f} ± {pair.get('explained_variance_std', 0.0):.4f}", ev >= -0.01),
            _bar(f"{ce:+.4f} ± {pair.get('ce_loss_score_std', 0.0):.4f}", ce >= -0.01),
            "–",
            # dead latents count at the trained budget K: smaller budgets leave latents unused
            _bar(f"{dead:.0f} = {dead / d_sae:.1%} at K", dead <= 0.1 * d_sae)
            if k == budgets[-1]
            else "–",
        ]
        n_seeds = pair.get("n_seeds", 1)
        seeds = "" if n_seeds == len(per_seed) else f" ({n_seeds} seeds)"
        lines.append(
            f"| {label} | hierarchical_topk at k' = {k}{seeds} | " + " | ".join(cells) + " |"
        )
    topk_name = f"topk@k={payload['config']['k']}"  # the TopK at the target k, for reference
    if topk_name in means:
        dead = means[topk_name]["dead_latents"]
        cell = _bar(f"{dead:.0f} = {dead / d_sae:.1%}", dead <= 0.1 * d_sae)
        lines.append(f"| {label} | {topk_name} | | | | {cell} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("synthetic", nargs="*", help="LABEL=results.json of a synthetic compare")
    parser.add_argument("--lm", action="append", default=[], help="LABEL=results.json of --lm")
    args = parser.parse_args()
    if args.synthetic:
        print("| setting | SAE | EV − TopK | Spearman | dead (TopK) | MCC (TopK) |")
        print("|---|---|---:|---:|---:|---:|")
        for text in args.synthetic:
            print("\n".join(synthetic_rows(*_labelled(text))))
        print()
    if args.lm:
        print(
            "| run | SAE | EV − TopK | CE score − TopK | L0 std / mean | dead held-out (TopK's) |"
        )
        print("|---|---|---:|---:|---:|---:|")
        for text in args.lm:
            print("\n".join(lm_rows(*_labelled(text))))


if __name__ == "__main__":
    main()
