"""Hook activations of a language model over texts, with one label per text or per token.

:func:`collect_activations` runs a TransformerLens model over token lists and yields
``(X, y, fold)`` batches at one hook: the last token of each text or every token, labelled by a
per-text score or by surprisal ``−log p(x_t | x_<t)`` (nats; a text's mean over positions
``1 … T−1`` with ``positions="last"``). Folds are assigned per text, so a text never sits on both
sides of a split. :func:`read_texts` reads the texts (and scores) of a local or Hub dataset.
"""

from __future__ import annotations

from typing import Any

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
