"""``sae-adaptive fit-probe``: fit AdaptiveK's complexity probe on a model's activations over texts.

Labels come from a dataset column (one score per text), from surprisal, or from ``k*`` of a
trained TopK-family SAE (:func:`~sae_adaptive_plugin.probe.labels.kstar_labels`: the fewest
latents whose prefix reconstruction error is at most ``target_fvu`` times the mean variance
``‖x − mean‖²``, ``mean`` over all collected rows). The probe is a ridge regression with k-fold
cross-validated ``λ`` (:class:`~sae_adaptive_plugin.probe.ComplexityProbe`), saved as one
``.safetensors`` file for an AdaptiveK config's ``probe_path``. The flags and their defaults are
described in ``docs/probe.md`` and ``sae-adaptive fit-probe --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sae_adaptive_plugin.probe.activations import read_texts

LABEL_SOURCES = ("column", "surprisal", "kstar")


def fit_probe_from_texts(
    model: Any,
    hook: str,
    texts: list[Any],
    scores: list[float] | None = None,
    positions: str = "last",
    context_size: int | None = None,
    batch_size: int = 8,
    prepend_bos: bool | None = None,
    n_folds: int = 5,
    lambdas: list[float] | None = None,
    seed: int = 0,
    kstar_sae: Any = None,
    target_fvu: float = 0.1,
) -> Any:
    """Fit a :class:`ComplexityProbe` on ``model``'s ``hook`` activations over ``texts``.

    ``scores`` are the per-text labels; ``None`` selects surprisal labels, or ``k*`` labels under
    ``kstar_sae`` when that is given.
    """
    from sae_adaptive_plugin.probe import labels

    if scores is not None:
        missing = [i for i, v in enumerate(scores) if v is None]
        if missing:
            raise ValueError(
                f"score column has {len(missing)} missing values (rows {missing[:10]})"
            )
    common: dict[str, Any] = dict(
        model=model,
        hook=hook,
        texts=texts,
        positions=positions,
        context_size=context_size,
        batch_size=batch_size,
        prepend_bos=prepend_bos,
        n_folds=n_folds,
        seed=seed,
    )
    source: Any
    if kstar_sae is not None:
        activations = labels.TextScoreLabels(scores=[0.0] * len(texts), **common)
        source = _Relabelled(_kstar_batches(kstar_sae, hook, activations.batches(), target_fvu))
    elif scores is None:
        source = labels.SurprisalLabels(**common)
    else:
        source = labels.TextScoreLabels(scores=scores, **common)
    return labels.fit_probe(source, lambdas=lambdas, n_folds=n_folds, seed=seed)


class _Relabelled:
    """A label source over an iterator of already-labelled batches."""

    def __init__(self, batches: Any) -> None:
        self._batches = batches

    def batches(self) -> Any:
        return self._batches


def _kstar_batches(sae: Any, hook: str, make_batches: Any, target_fvu: float):
    """Relabel activation batches with ``k*`` under ``sae`` (rows held in memory for the mean)."""
    import torch

    from sae_adaptive_plugin.probe.labels import kstar_labels

    if sae.cfg.metadata.hook_name not in (None, hook):
        raise ValueError(
            f"--sae was trained at hook {sae.cfg.metadata.hook_name!r}, not --hook {hook!r}"
        )
    if not 0.0 < target_fvu < 1.0:
        raise ValueError(f"--target-fvu must lie in (0, 1), got {target_fvu}")
    cached = list(make_batches)  # activations only (no logits): rows x d_in floats
    if not cached:
        return
    d = cached[0][0].shape[1]
    if d != sae.cfg.d_in:
        raise ValueError(
            f"the hook's activations have width {d} but the SAE's d_in is {sae.cfg.d_in}"
        )
    total = torch.zeros(d, dtype=torch.float64)
    n = 0
    for X, _, _ in cached:
        total += X.double().sum(0)
        n += X.shape[0]
    mean = (total / max(n, 1)).float()
    for X, _, fold in cached:
        y = kstar_labels(sae, X.to(sae.device), target_fvu, mean.to(sae.device)).float().cpu()
        yield X, y, fold


def fit_probe_command(args: argparse.Namespace) -> int:
    from sae_adaptive_plugin.data import local_lm

    for name, value, low in (
        ("--batch-size", args.batch_size, 1),
        ("--n-folds", args.n_folds, 2),
        ("--max-texts", args.max_texts, 1),
    ):
        if value is not None and value < low:
            print(f"error: {name} must be ≥ {low}, got {value}", file=sys.stderr)
            return 2
    from sae_adaptive_plugin.outputs import OutputExistsError, refuse_existing, replacing_file

    try:
        refuse_existing(args.out, args.overwrite, "--out")
        if args.json_out:
            refuse_existing(args.json_out, args.overwrite, "--json")
    except OutputExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        texts, scores = read_texts(
            args.dataset,
            args.split,
            args.text_column,
            args.score_column if args.labels == "column" else None,
            args.max_texts,
        )
        kstar_sae = None
        if args.labels == "kstar":
            if not args.sae:
                raise ValueError("--labels kstar needs --sae SAE_DIR (a TopK-family SAE at --hook)")
            from sae_adaptive_plugin.hub import load_sae_folder

            kstar_sae = load_sae_folder(args.sae, device=args.device)
        model = local_lm.load_model(args.model, device=args.device, hook_names=[args.hook])
        probe = fit_probe_from_texts(
            model,
            args.hook,
            texts,
            scores,
            positions=args.positions,
            context_size=args.context_size,
            batch_size=args.batch_size,
            prepend_bos=args.prepend_bos,
            n_folds=args.n_folds,
            lambdas=args.lambdas,
            seed=args.seed,
            kstar_sae=kstar_sae,
            target_fvu=args.target_fvu,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with replacing_file(args.out) as tmp:
        probe.save(tmp)
    out = Path(args.out)
    r = probe.report
    print(f"probe: {out}  (d_in {probe.d_in}, labels {args.labels}, positions {args.positions})")
    print(f"rows: {r.n_samples}  folds: {r.n_folds}  lambda: {r.lam:g}")
    print(f"held-out R²: {r.r2:.4f}  Pearson: {r.pearson:.4f}  Spearman: {r.spearman:.4f}")
    print(f"label range: [{probe.label_min:g}, {probe.label_max:g}]")
    if args.json_out:
        report = {
            "probe_path": str(out),
            "model": args.model,
            "hook": args.hook,
            "dataset": args.dataset,
            "labels": args.labels,
            "positions": args.positions,
            "label_min": probe.label_min,
            "label_max": probe.label_max,
            **r.to_dict(),
        }
        with replacing_file(args.json_out) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
    return 0
