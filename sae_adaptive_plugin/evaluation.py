"""``sae-adaptive eval``: SAELens ``run_evals`` plus the per-token k distribution, for saved SAEs.

For each SAE folder (anything ``SAE.load_from_disk`` reads, i.e. what ``sae-adaptive train`` or
SAELens's runner saved) this runs SAELens's own ``run_evals`` — explained variance, MSE, cosine
similarity, CE-loss score, KL score, L0, L1, L2 ratio — on the model and dataset named in the SAE's
metadata (overridable), and then, on the same kind of batches, the distribution of the per-token
L0 (the number of non-zero latents of each token: the k each token actually used) on exactly the
tokens of ``run_evals``'s sparsity pass: mean (equal to SAELens's L0), std, min, quantiles, max,
plus the latents that never fired on those tokens. Results print as
a Markdown table and are written as JSON.

Special tokens are excluded (as SAELens's evals do) when the model has a tokenizer; tokenizer-less
local test models use every token. The activation scaler is the identity: SAELens folds any
training-time normalisation into the saved weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sae_adaptive_plugin import reporting
from sae_adaptive_plugin.outputs import OutputExistsError, refuse_existing, replacing_file

#: quantiles of per-token L0 reported in ``k_distribution``.
K_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def per_token_l0(
    sae: Any,
    model: Any,
    token_batches: list[Any],
    ignore_tokens: list[int] | None = None,
) -> tuple[Any, Any]:
    """Per-token L0 of ``sae`` on the model's activations for each ``[batch, ctx]`` token batch.

    Returns ``(l0 [n_tokens] long tensor, fired [d_sae] bool tensor)``.
    """
    import torch
    from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

    hook_name = sae.cfg.metadata.hook_name
    head = sae.cfg.metadata.hook_head_index
    l0s = []
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.device)
    with torch.no_grad():
        for tokens in token_batches:
            _, cache = model.run_with_cache(
                tokens,
                prepend_bos=False,
                names_filter=[hook_name],
                stop_at_layer=extract_stop_at_layer_from_tlens_hook_name(hook_name),
            )
            act = cache[hook_name]
            if head is not None:
                act = act[:, :, head]
            elif any(s in hook_name for s in ("hook_q", "hook_k", "hook_v", "hook_z")):
                act = act.flatten(-2, -1)
            feats = sae.encode(act.to(sae.device))
            if feats.is_sparse:
                feats = feats.to_dense()
            feats = feats.reshape(-1, feats.shape[-1])
            keep = torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device)
            if ignore_tokens:
                flat = tokens.reshape(-1).to(feats.device)
                keep = ~torch.isin(flat, torch.tensor(ignore_tokens, device=feats.device))
            feats = feats[keep]
            l0s.append((feats != 0).sum(-1).cpu())
            fired |= (feats != 0).any(0)
    return torch.cat(l0s), fired.cpu()


def k_distribution(l0: Any, fired: Any) -> dict[str, float]:
    """Summary of a per-token L0 vector (``mean``, ``std``, ``min``, ``p05`` … ``p95``, ``max``)."""
    import torch

    x = l0.to(torch.float64)
    out = {
        "n_tokens": int(x.numel()),
        "mean": float(x.mean()),
        "std": float(x.std(unbiased=False)),
        "min": float(x.min()),
    }
    qs = torch.quantile(x, torch.tensor(K_QUANTILES, dtype=torch.float64))
    for q, v in zip(K_QUANTILES, qs.tolist()):
        out[f"p{round(q * 100):02d}"] = float(v)
    out["max"] = float(x.max())
    out["never_fired"] = int((~fired).sum())
    out["never_fired_fraction"] = float((~fired).float().mean())
    return out


def sae_lens_evals(
    sae: Any,
    model: Any,
    dataset: Any,
    n_batches: int = 10,
    batch_size_prompts: int = 8,
    context_size: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """``run_evals`` metrics (SAELens's nested dict) plus ``k_distribution`` for one SAE."""
    from sae_lens import ActivationsStore
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.util import get_special_token_ids

    if sae.cfg.metadata.hook_name is None:
        raise ValueError("the SAE's metadata has no hook_name: it was not saved by a runner")
    store = ActivationsStore.from_sae(
        model,
        sae,
        dataset=dataset,
        context_size=context_size,
        streaming=isinstance(dataset, str),
        store_batch_size_prompts=batch_size_prompts,
        n_batches_in_buffer=2,
        train_batch_size_tokens=batch_size_prompts * (context_size or 128),
        device=device,
    )
    tokenizer = getattr(model, "tokenizer", None)
    ignore = list(get_special_token_ids(tokenizer)) if tokenizer is not None else None
    eval_cfg = EvalConfig(
        batch_size_prompts=batch_size_prompts,
        n_eval_reconstruction_batches=n_batches,
        n_eval_sparsity_variance_batches=n_batches,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
    )
    # Record the token batches run_evals draws: its sparsity pass (the last n_batches drawn) is
    # where its L0 comes from, and the k distribution is measured on exactly those tokens.
    drawn: list[Any] = []
    draw = store.get_batch_tokens

    def recording_draw(*args: Any, **kwargs: Any) -> Any:
        tokens = draw(*args, **kwargs)
        drawn.append(tokens)
        return tokens

    store.get_batch_tokens = recording_draw
    try:
        metrics, _ = run_evals(
            sae=sae,
            activation_store=store,
            model=model,
            activation_scaler=ActivationScaler(),
            eval_config=eval_cfg,
            exclude_special_tokens=ignore if ignore else False,
        )
    finally:
        store.get_batch_tokens = draw
    l0, fired = per_token_l0(sae, model, drawn[-n_batches:], ignore)
    metrics["k_distribution"] = k_distribution(l0, fired)
    metrics["sae"] = {
        "architecture": sae.cfg.architecture(),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "hook_name": sae.cfg.metadata.hook_name,
        "model_name": sae.cfg.metadata.model_name,
    }
    return metrics


#: (column title, path in the metrics dict, format)
TABLE_COLUMNS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("architecture", ("sae", "architecture"), "{}"),
    ("d_sae", ("sae", "d_sae"), "{}"),
    ("L0", ("sparsity", "l0"), "{:.2f}"),
    ("k std", ("k_distribution", "std"), "{:.2f}"),
    ("k p05", ("k_distribution", "p05"), "{:.0f}"),
    ("k p50", ("k_distribution", "p50"), "{:.0f}"),
    ("k p95", ("k_distribution", "p95"), "{:.0f}"),
    ("expl. var.", ("reconstruction_quality", "explained_variance"), "{:.4f}"),
    ("MSE", ("reconstruction_quality", "mse"), "{:.4g}"),
    ("CE score", ("model_performance_preservation", "ce_loss_score"), "{:.4f}"),
    ("KL score", ("model_behavior_preservation", "kl_div_score"), "{:.4f}"),
    ("never fired", ("k_distribution", "never_fired"), "{}"),
)


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per SAE (keyed by its name/path) with :data:`TABLE_COLUMNS`."""
    rows = []
    for name, metrics in results.items():
        row = {"SAE": name}
        for title, path, _ in TABLE_COLUMNS:
            value: Any = metrics
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            row[title] = value
        rows.append(row)
    columns = [("SAE", "SAE", "{}"), *((title, title, fmt) for title, _, fmt in TABLE_COLUMNS)]
    return reporting.markdown_table(rows, columns)


def evaluate_paths(
    paths: list[str],
    model_name: str | None = None,
    dataset_path: str | None = None,
    n_batches: int = 10,
    batch_size_prompts: int = 8,
    context_size: int | None = None,
    device: str = "cpu",
    model: Any = None,
    dataset: Any = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate each saved SAE; the model/dataset default to those in each SAE's metadata."""
    from sae_adaptive_plugin.data import local_lm
    from sae_adaptive_plugin.hub import load_sae_folder
    from sae_adaptive_plugin.training.preflight import check_hook_and_width

    models: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    for path in paths:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"SAE folder {path} does not exist")
        sae = load_sae_folder(path, device=device)
        meta = sae.cfg.metadata
        m = model
        if m is None:
            name = model_name or meta.model_name
            if not name:
                raise ValueError(f"{path}: no model_name in the SAE's metadata; pass --model")
            if name not in models:
                models[name] = local_lm.load_model(
                    name,
                    device=device,
                    model_class_name=meta.model_class_name or "HookedTransformer",
                    model_from_pretrained_kwargs=meta.model_from_pretrained_kwargs,
                    hook_names=[meta.hook_name] if meta.hook_name else None,
                )
            m = models[name]
        if meta.hook_name:  # before any batch: the nearest hook names, or the width mismatch
            check_hook_and_width(
                m,
                meta.hook_name,
                sae.cfg.d_in,
                meta.hook_head_index,
                hook_key=f"{path}: metadata hook_name",
                d_in_key=f"{path}: the SAE's d_in",
                advice="evaluate it on the model it was trained on (--model)",
            )
        ds = dataset
        if ds is None:
            ds_name = dataset_path or meta.dataset_path
            if not ds_name:
                raise ValueError(f"{path}: no dataset_path in the SAE's metadata; pass --dataset")
            ds = (
                local_lm.load_local_dataset(ds_name)
                if local_lm.is_local_dataset(ds_name)
                else ds_name
            )
        results[str(path)] = sae_lens_evals(
            sae,
            m,
            ds,
            n_batches=n_batches,
            batch_size_prompts=batch_size_prompts,
            context_size=context_size or meta.context_size,
            device=device,
        )
    return results


def eval_command(args: argparse.Namespace) -> int:
    for name, value in (
        ("--n-batches", args.n_batches),
        ("--batch-size-prompts", args.batch_size_prompts),
    ):
        if value < 1:
            print(f"error: {name} must be ≥ 1, got {value}", file=sys.stderr)
            return 2
    try:
        if args.json_out:
            refuse_existing(args.json_out, args.overwrite, "--json")
        results = evaluate_paths(
            args.saes,
            model_name=args.model,
            dataset_path=args.dataset,
            n_batches=args.n_batches,
            batch_size_prompts=args.batch_size_prompts,
            context_size=args.context_size,
            device=args.device,
        )
    except (FileNotFoundError, OutputExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(results))
    if args.json_out:
        with replacing_file(args.json_out) as tmp:
            tmp.write_text(json.dumps(reporting.jsonable(results), indent=2))
        print(f"wrote {args.json_out}")
    return 0


def per_token_k_on_text(
    sae: Any, model: Any, text: str | list[int], prepend_bos: bool | None = None
) -> tuple[list[str], list[int]]:
    """The k (per-token L0) ``sae`` uses at each token of one text: ``(token strings, k list)``.

    Tokenised with ``model.to_tokens`` when the model has a tokenizer (token strings from
    ``to_str_tokens``); a tokenizer-less local model uses the byte-level fallback of
    :func:`sae_adaptive_plugin.data.local_lm.texts_to_token_lists` and token ids as labels.
    """
    import torch

    from sae_adaptive_plugin.data import local_lm

    if prepend_bos is None:
        prepend_bos = bool(sae.cfg.metadata.prepend_bos)
    ids = local_lm.texts_to_token_lists(model, [text], prepend_bos)[0][
        : local_lm.model_limits(model)[1]
    ]
    tokens = torch.tensor([ids], device=next(model.parameters()).device)
    l0, _ = per_token_l0(sae, model, [tokens])
    if getattr(model, "tokenizer", None) is not None:
        labels = (
            [str(s) for s in model.to_str_tokens(tokens[0])]
            if hasattr(model, "to_str_tokens")
            else [model.tokenizer.decode([i]) for i in ids]
        )
    else:
        labels = [str(i) for i in ids]
    return labels, [int(v) for v in l0.tolist()]
