"""The ``sae-adaptive compare`` runner: adaptive vs fixed-sparsity SAEs on synthetic ground truth.

Each architecture is trained with SAELens's own ``SAETrainer`` on the same RNG-isolated stream
(:mod:`sae_adaptive_plugin.experiments.synthetic`), the same step budget and hyper-parameters;
then its *inference* form (saved with ``save_inference_model`` and reloaded, so BatchTopK is
judged as the JumpReLU SAE it is saved as) is evaluated on one held-out set with known true
features. The fixed-k baselines get ``k`` = the adaptive SAEs' measured mean L0; the
HierarchicalTopK is evaluated at several budgets ``k'``, each beside a TopK trained at ``k'``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_adaptive_plugin.experiments.registry_saes import (
    RESULT_ROW_HEAD,
    build_training_sae,
    recipe_settings,
    registered_training_architectures,
    to_inference_sae,
)
from sae_adaptive_plugin.experiments.synthetic import (
    ALL_ARCHITECTURES,
    COMPLEXITY_DISTRIBUTIONS,
    FIXED_K_ARCHITECTURES,
    CompareConfig,
    VariableComplexityConfig,
    VariableComplexitySource,
    evaluate_sae,
    train_sae,
)
from sae_adaptive_plugin.outputs import refuse_existing
from sae_adaptive_plugin.registration.plugin import (
    ADAPTIVE_ARCHITECTURES,
    HIERARCHICAL_ARCHITECTURE,
)
from sae_adaptive_plugin.reporting import aggregate_rows
from sae_adaptive_plugin.stats import spearman

#: Keys every result entry carries (``results.json`` schema); all values are finite numbers
#: except ``architecture``/``name`` (str) and ``k_eval`` (int or null).
RESULT_KEYS: tuple[str, ...] = (
    *RESULT_ROW_HEAD,
    "l0_mean",
    "l0_std",
    "l0_p90",
    "dead_latents",
    "mcc",
    "l0_spearman_vs_true",
    "train_seconds",
)


@dataclass
class CompareResult:
    """Everything a comparison produced: table rows, skipped architectures, data for plots."""

    rows: list[dict[str, Any]]
    skipped: dict[str, str]
    true_l0: torch.Tensor
    sae_l0: dict[str, torch.Tensor]
    fixed_k: int
    target_l0: float
    info: dict[str, Any]


def architecture_settings(
    architecture: str, cfg: CompareConfig, target_l0: float, fixed_k: int
) -> dict[str, Any]:
    """Config fields for ``architecture`` in this comparison (only those its config has are used).

    Fixed-k baselines get ``k = fixed_k``; HierarchicalTopK is trained with ``K = max_l0``; the
    adaptive SAEs get only their target mean ``k = target_l0`` and otherwise their defaults, as a
    user would train them (schedules follow the run's length).
    """
    k_hi = max(2, min(cfg.width, math.ceil(cfg.source.max_l0)))
    width = cfg.width
    if architecture in ("topk", "batchtopk"):
        return {"k": fixed_k}
    if architecture == "matryoshka_batchtopk":
        widths = sorted({max(1, width // 8), max(1, width // 4), max(1, width // 2), width})
        return {"k": fixed_k, "matryoshka_widths": widths}
    if architecture == HIERARCHICAL_ARCHITECTURE:
        return {"k": k_hi}
    if architecture in ADAPTIVE_ARCHITECTURES:
        return {"k": max(1, round(target_l0))}
    raise ValueError(f"architecture: no compare settings for {architecture!r}")


def build_compare_sae(architecture: str, cfg: CompareConfig, target_l0: float, fixed_k: int) -> Any:
    """A fresh training SAE of ``architecture`` from SAELens's registry."""
    settings = architecture_settings(architecture, cfg, target_l0, fixed_k)
    settings.update(recipe_settings(cfg))
    return build_training_sae(
        architecture,
        settings,
        cfg.overrides,
        d_in=cfg.source.hidden_dim,
        d_sae=cfg.width,
        device=cfg.device,
    )


def compare_data(
    cfg: CompareConfig,
) -> tuple[VariableComplexitySource, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Seed torch with ``cfg.seed`` and build the comparison's source and held-out set (seed
    ``cfg.seed + 1``); returns (source, true activations, hidden, true L0, target mean L0 — the
    held-out mean true L0 unless ``cfg.target_l0`` is set)."""
    torch.manual_seed(cfg.seed)
    source = VariableComplexitySource(cfg.source, device=cfg.device)
    feature_acts, hidden, true_l0 = source.sample(cfg.eval_samples, seed=cfg.seed + 1)
    target_l0 = cfg.target_l0 if cfg.target_l0 is not None else float(true_l0.float().mean())
    return source, feature_acts, hidden, true_l0, target_l0


def run_compare(
    cfg: CompareConfig,
    out_dir: Path,
    log: Callable[[str], None] = print,
) -> CompareResult:
    """Train every requested, registered architecture on one stream and evaluate each.

    Writes each inference SAE to ``out_dir/saes/<name>/``. Architectures not registered in
    SAELens are returned in ``skipped`` with the reason; any other failure propagates.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    registered = registered_training_architectures()
    skipped = {
        a: "not registered in SAELens (its sae_adaptive_plugin module is not in "
        "PACKAGE_ARCHITECTURES yet)"
        for a in cfg.architectures
        if a not in registered
    }
    # training order is fixed (adaptive SAEs first, so the fixed-k baselines can match them)
    to_run = [a for a in ALL_ARCHITECTURES if a in cfg.architectures and a in registered]

    source, feature_acts, hidden, true_l0, target_l0 = compare_data(cfg)
    true_l0_f = true_l0.float()
    info = {
        "true_l0_mean": float(true_l0_f.mean()),
        "true_l0_std": float(true_l0_f.std()),
        "true_l0_min": int(true_l0.min()),
        "true_l0_max": int(true_l0.max()),
        "true_l0_p90": float(true_l0_f.quantile(0.9)),
        "target_l0": target_l0,
        "seed": cfg.seed,
    }
    log(
        f"true L0 on {cfg.eval_samples} held-out samples: mean {info['true_l0_mean']:.1f}, "
        f"std {info['true_l0_std']:.1f}, range [{info['true_l0_min']}, {info['true_l0_max']}]"
    )

    rows: list[dict[str, Any]] = []
    sae_l0: dict[str, torch.Tensor] = {}
    fixed_k = max(1, round(target_l0))
    adaptive_l0s: list[float] = []
    fixed_k_set = False

    for index, architecture in enumerate(to_run, start=1):
        if architecture not in ADAPTIVE_ARCHITECTURES and not fixed_k_set:
            # fixed-k baselines are matched to the adaptive SAEs' measured mean L0
            if adaptive_l0s:
                fixed_k = max(1, round(sum(adaptive_l0s) / len(adaptive_l0s)))
            fixed_k_set = True
            log(f"fixed-k baselines use k = {fixed_k}")
        torch.manual_seed(cfg.seed + 1000 * index)
        sae = build_compare_sae(architecture, cfg, target_l0, fixed_k)
        log(f"[{index}/{len(to_run)}] training {architecture} for {cfg.steps} steps")
        seconds = train_sae(sae, source, cfg)
        inference = to_inference_sae(sae, out_dir / "saes" / architecture)
        if architecture == HIERARCHICAL_ARCHITECTURE:
            big_k = int(inference.cfg.k)
            ks = sorted(
                {max(1, round(f * big_k)) for f in cfg.hierarchical_k_fractions}
                | {min(fixed_k, big_k)}
            )
            for k_eval in ks:
                inference.cfg.k = k_eval
                metrics, l0 = evaluate_sae(inference, hidden, feature_acts, source.true_features)
                name = f"{architecture}@k={k_eval}"
                rows.append(_row(name, architecture, k_eval, metrics, l0, true_l0_f, seconds))
                sae_l0[name] = l0.cpu()
            inference.cfg.k = big_k
            if cfg.topk_sweep and "topk" in registered:
                _topk_sweep(cfg, source, ks, rows, (hidden, feature_acts, true_l0_f), out_dir, log)
        else:
            metrics, l0 = evaluate_sae(inference, hidden, feature_acts, source.true_features)
            k_eval = fixed_k if architecture in FIXED_K_ARCHITECTURES else None
            rows.append(_row(architecture, architecture, k_eval, metrics, l0, true_l0_f, seconds))
            sae_l0[architecture] = l0.cpu()
            if architecture in ADAPTIVE_ARCHITECTURES:
                adaptive_l0s.append(metrics["l0_mean"])
        last = rows[-1]
        log(
            f"    {last['name']}: EV {last['explained_variance']:.3f}, L0 {last['l0_mean']:.1f}"
            f" ± {last['l0_std']:.1f}, Spearman vs true L0 {last['l0_spearman_vs_true']:.3f},"
            f" {seconds:.1f}s"
        )
    add_gap_to_topk_curve(rows)
    return CompareResult(rows, skipped, true_l0_f.cpu(), sae_l0, fixed_k, target_l0, info)


def add_gap_to_topk_curve(rows: list[dict[str, Any]]) -> None:
    """Give every variable-L0 row ``ev_gap_vs_topk``: its explained variance minus the TopK
    curve's (SAELens TopKs trained at several k, linearly interpolated in mean L0) at the row's
    mean L0. Needs TopKs at two or more k; rows outside the curve's L0 range get none."""
    curve = sorted(
        (r["l0_mean"], r["explained_variance"])
        for r in rows
        if r["architecture"] in ("topk", "topk_sweep")
    )
    if len(curve) < 2:
        return
    for row in rows:
        if row["architecture"] in ("topk", "topk_sweep", HIERARCHICAL_ARCHITECTURE):
            continue
        l0 = row["l0_mean"]
        for (x0, y0), (x1, y1) in itertools.pairwise(curve):
            if x0 <= l0 <= x1:
                at = y0 if x1 == x0 else y0 + (y1 - y0) * (l0 - x0) / (x1 - x0)
                row["ev_gap_vs_topk"] = row["explained_variance"] - at
                break


def _topk_sweep(
    cfg: CompareConfig,
    source: VariableComplexitySource,
    ks: list[int],
    rows: list[dict[str, Any]],
    held_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    out_dir: Path,
    log: Callable[[str], None],
) -> None:
    """Train a SAELens TopK at each budget ``k`` and add ``ev_gap_vs_topk`` to the
    HierarchicalTopK row at that ``k`` (its EV minus the TopK's)."""
    hidden, feature_acts, true_l0 = held_out
    by_k = {r["k_eval"]: r for r in rows if r["architecture"] == "topk"}
    for k in ks:
        if k not in by_k:
            torch.manual_seed(cfg.seed + 7 * k)
            sae = build_compare_sae("topk", cfg, float(k), k)
            log(f"    TopK sweep: training topk at k = {k}")
            seconds = train_sae(sae, source, cfg)
            inference = to_inference_sae(sae, out_dir / "saes" / f"topk_k{k}")
            metrics, l0 = evaluate_sae(inference, hidden, feature_acts, source.true_features)
            row = _row(f"topk@k={k}", "topk_sweep", k, metrics, l0, true_l0, seconds)
            rows.append(row)
            by_k[k] = row
        for r in rows:
            if r["architecture"] == HIERARCHICAL_ARCHITECTURE and r["k_eval"] == k:
                r["ev_gap_vs_topk"] = r["explained_variance"] - by_k[k]["explained_variance"]


def _row(
    name: str,
    architecture: str,
    k_eval: int | None,
    metrics: dict[str, float],
    l0: torch.Tensor,
    true_l0: torch.Tensor,
    seconds: float,
) -> dict[str, Any]:
    return {
        "name": name,
        "architecture": architecture,
        "k_eval": k_eval,
        **metrics,
        "l0_spearman_vs_true": spearman(l0, true_l0),
        "train_seconds": float(seconds),
    }


def iter_finite_problems(rows: Sequence[dict[str, Any]]) -> Iterator[str]:
    """Describe every missing key or non-finite number in result rows (empty when all fine)."""
    for row in rows:
        for key in RESULT_KEYS:
            if key not in row:
                yield f"{row.get('name', '?')}: missing {key}"
                continue
            value = row[key]
            if key in ("name", "architecture") or (key == "k_eval" and value is None):
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                yield f"{row['name']}: {key} = {value!r} is not a finite number"


def aggregate_seeds(results: Sequence[CompareResult]) -> CompareResult:
    """One result from several seeds' runs: each row's numbers are the mean over the seeds that
    have it, with ``<key>_std`` (population std) and ``n_seeds`` beside them; per-sample data
    (L0 scatter) are the first run's."""
    first = results[0]
    rows = aggregate_rows([result.rows for result in results])
    info = dict(first.info)
    for key in ("true_l0_mean", "true_l0_std", "true_l0_p90", "target_l0"):
        info[key] = float(sum(r.info[key] for r in results) / len(results))
    info["seeds"] = [r.info.get("seed") for r in results]
    return CompareResult(
        rows, first.skipped, first.true_l0, first.sae_l0, first.fixed_k, first.target_l0, info
    )


@dataclass
class SingleRun:
    """One architecture set up as ``run_compare`` sets it up (for scripts that watch one SAE
    train): the seeded source, its held-out set and a fresh SAE with only its compare settings
    plus ``cfg.overrides``."""

    cfg: CompareConfig
    source: VariableComplexitySource
    feature_acts: torch.Tensor
    hidden: torch.Tensor
    true_l0: torch.Tensor
    sae: Any

    @staticmethod
    def add_arguments(parser: Any) -> None:
        """``--complexity``, ``--steps``, ``--seed``, ``--set`` (config overrides as JSON) and
        ``--threads`` on an ``argparse`` parser, for :meth:`from_args`."""
        parser.add_argument("--complexity", default="loguniform", choices=COMPLEXITY_DISTRIBUTIONS)
        parser.add_argument("--steps", type=int, default=1000, help="training steps")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--set", default="{}", help="config overrides as JSON")
        parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")

    @classmethod
    def from_args(cls, architecture: str, args: Any) -> SingleRun:
        """:meth:`build` from the arguments of :meth:`add_arguments` (sets the thread count)."""
        torch.set_num_threads(args.threads)
        overrides = json.loads(args.set)
        if not isinstance(overrides, dict):
            raise ValueError(f"--set must be a JSON object of config fields, got {args.set!r}")
        cfg = CompareConfig(
            source=VariableComplexityConfig(complexity=args.complexity),
            steps=args.steps,
            seed=args.seed,
            architectures=(architecture,),
            overrides={architecture: overrides},
        )
        return cls.build(architecture, cfg)

    @classmethod
    def build(cls, architecture: str, cfg: CompareConfig) -> SingleRun:
        cfg.validate()
        source, feature_acts, hidden, true_l0, target = compare_data(cfg)
        sae = build_compare_sae(architecture, cfg, target, max(1, round(target)))
        return cls(cfg, source, feature_acts, hidden, true_l0, sae)

    def train_and_evaluate(self, out_dir: Path) -> tuple[dict[str, float], torch.Tensor]:
        """Train with SAELens's trainer, save to ``out_dir`` (refused if it already holds
        something) and evaluate the reloaded SAE on the held-out set; returns (metrics,
        per-sample L0)."""
        refuse_existing(out_dir, overwrite=False, what="out_dir")
        train_sae(self.sae, self.source, self.cfg)
        inference = to_inference_sae(self.sae, Path(out_dir))
        return evaluate_sae(inference, self.hidden, self.feature_acts, self.source.true_features)
