"""``sae-adaptive fit-probe``: fit AdaptiveK's complexity probe from labelled texts or surprisal.

Runs a language model over a text dataset (a Hub dataset name, or a local parquet / jsonl / csv
file or ``save_to_disk`` folder with a text column and, for ``--labels column``, a score column),
collects the activations at ``--hook`` — the **last** token of each text (the paper's setting) or
**all** tokens — and fits :class:`sae_adaptive_plugin.probe.ComplexityProbe` with streamed ridge
regression and k-fold cross-validated ``λ``. Folds are assigned per text, so a text's tokens never
sit on both sides of a split. The probe is saved (one ``.safetensors`` file) for an AdaptiveK
config's ``probe_path``, and its held-out R², Pearson and Spearman are printed.

Label sources:

- ``--labels column`` (default): the ``--score-column`` value of each text (e.g. a 0–10 complexity
  score from a judge); with ``--positions all`` every token of the text gets the text's score.
- ``--labels surprisal``: no labels needed. With ``--positions last`` a text's label is its mean
  token surprisal ``−log p(x_t | x_<t)`` in nats over positions ``1 … T−1``; with
  ``--positions all`` position ``t``'s label is that token's own surprisal (position 0 has none
  and is skipped).
- ``--labels kstar --sae SAE_DIR``: no labels needed either. Each activation's label is ``k*``, the
  fewest latents of a TopK-family SAE trained at that hook (``topk``, ``hierarchical_topk``,
  ``adaptivek``) whose prefix reconstruction error is at most ``--target-fvu`` times the mean
  variance ``‖x − mean‖²`` of the rows of its batch
  (:func:`sae_adaptive_plugin.probe.labels.kstar_labels`, ``scale="dataset"``); ``mean`` is the mean
  activation over all collected rows, so those rows are held in memory (rows × d_in floats).

With ``--positions all`` the first position is skipped when a BOS token was prepended (its
activation is an outlier that carries no information about the text). Texts are truncated to
``--context-size`` tokens (default: the model's ``n_ctx``). Tokenisation is ``model.to_tokens``
for every model with a tokenizer; the tokenizer-less local test models take token-id lists or the
byte-level fallback of :func:`sae_adaptive_plugin.data.local_lm.texts_to_token_lists`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

LABEL_SOURCES = ("column", "surprisal", "kstar")
POSITIONS = ("last", "all")


def _hook_activations(cache: Any, hook: str) -> Any:
    act = cache[hook]
    if act.ndim == 4:  # [batch, pos, head, d_head] hooks: flatten heads as SAELens does
        act = act.flatten(-2, -1)
    return act


def collect_activations(
    model: Any,
    hook: str,
    token_lists: list[list[int]],
    scores: list[float] | None,
    positions: str = "last",
    batch_size: int = 8,
    skip_first: bool = False,
    n_folds: int = 5,
    seed: int = 0,
):
    """Yield ``(X [N, d], y [N], fold [N])`` batches of hook activations and their labels.

    ``scores`` gives one label per text (``--labels column``); ``None`` means surprisal labels.
    """
    import torch
    from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if hook not in model.hook_dict:
        raise ValueError(
            f"hook {hook!r} is not a hook point of the model (e.g. blocks.0.hook_resid_post)"
        )
    gen = torch.Generator().manual_seed(seed)
    text_folds = torch.randint(0, n_folds, (len(token_lists),), generator=gen)
    device = next(model.parameters()).device
    surprisal = scores is None
    stop = None if surprisal else extract_stop_at_layer_from_tlens_hook_name(hook)
    for start in range(0, len(token_lists), batch_size):
        chunk = token_lists[start : start + batch_size]
        lengths = torch.tensor([len(t) for t in chunk])
        T = int(lengths.max())
        # right padding: with causal attention the padded tail cannot change earlier positions
        tokens = torch.zeros(len(chunk), T, dtype=torch.long)
        for i, t in enumerate(chunk):
            tokens[i, : len(t)] = torch.tensor(t)
        tokens = tokens.to(device)
        with torch.no_grad():
            out, cache = model.run_with_cache(
                tokens, names_filter=[hook], stop_at_layer=stop, prepend_bos=False
            )
        act = _hook_activations(cache, hook).float()
        pos = torch.arange(T)
        valid = pos[None, :] < lengths[:, None]  # [B, T]
        if surprisal:
            logp = torch.log_softmax(out.float(), dim=-1)
            tok_s = torch.zeros(len(chunk), T, device=logp.device)
            tok_s[:, 1:] = -logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
            tok_s = tok_s.cpu()
        folds_b = text_folds[start : start + len(chunk)]
        if positions == "last":
            idx = lengths - 1
            X = act[torch.arange(len(chunk)), idx.to(act.device)].cpu()
            if surprisal:
                s_valid = valid & (pos[None, :] >= 1)
                n = s_valid.sum(1)
                if (n == 0).any():
                    raise ValueError("surprisal labels need texts of at least 2 tokens")
                y = (tok_s * s_valid).sum(1) / n
            else:
                y = torch.tensor(scores[start : start + len(chunk)], dtype=torch.float32)
            yield X, y.float(), folds_b
        else:
            keep = valid.clone()
            if skip_first or surprisal:
                keep[:, 0] = False
            X = act.cpu()[keep]
            if surprisal:
                y = tok_s[keep]
            else:
                per_text = torch.tensor(scores[start : start + len(chunk)], dtype=torch.float32)
                y = per_text[:, None].expand(-1, T)[keep]
            f = folds_b[:, None].expand(-1, T)[keep]
            if X.shape[0]:
                yield X, y.float(), f


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


def read_texts(
    dataset: str,
    split: str,
    text_column: str,
    score_column: str | None,
    max_texts: int | None = None,
) -> tuple[list[Any], list[Any] | None]:
    """Texts (and scores, when ``score_column`` is given) of a local or Hub dataset.

    A Hub dataset is streamed when ``max_texts`` is set, so only those rows are downloaded.
    """
    import itertools

    from sae_adaptive_plugin.data import local_lm

    hint = "" if score_column is None else " (or use --labels surprisal / kstar)"
    if local_lm.is_local_dataset(dataset) or max_texts is None:
        ds = local_lm.load_dataset_any(dataset, split=split)
        if max_texts is not None:
            ds = ds.select(range(min(max_texts, len(ds))))
        rows_columns = list(ds.column_names)
        get = ds.__getitem__
    else:
        stream = local_lm.load_dataset_any(dataset, split=split, streaming=True)
        rows = list(itertools.islice(iter(stream), max_texts))
        rows_columns = list(rows[0]) if rows else []

        def get(column: str) -> list[Any]:
            return [row[column] for row in rows]

    for flag, column in (("--text-column", text_column), ("--score-column", score_column)):
        if column is not None and column not in rows_columns:
            raise ValueError(
                f"{flag} {column!r} is not in the dataset; columns: {rows_columns}"
                + (hint if flag == "--score-column" else "")
            )
    texts = list(get(text_column))
    scores = list(get(score_column)) if score_column is not None else None
    return texts, scores


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
