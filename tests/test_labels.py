"""Tests of the AdaptiveK label sources: k* from prefix reconstructions, user scores, surprisal."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import D_MODEL, HOOK_NAME, tiny_model

from sae_adaptive_plugin.probe.labels import (
    KStarLabels,
    SurprisalLabels,
    TextScoreLabels,
    fit_probe,
    kstar_labels,
    prefix_errors,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _identity_topk_sae(d: int = 8):
    """A SAELens TopK SAE whose latents are the coordinates (W_enc = W_dec = I, no biases)."""
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=d, k=d))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_kstar_counts_planted_features():
    d = 8
    sae = _identity_topk_sae(d)
    rows = []
    for j in range(1, d + 1):
        row = torch.zeros(d)
        row[:j] = torch.linspace(3.0, 2.0, j)  # j active coordinates, distinct magnitudes
        rows.append(row[torch.randperm(d)])
    x = torch.stack(rows)
    errors = prefix_errors(sae, x)
    assert errors.shape == (d, d)
    assert torch.all(errors[:, 1:] <= errors[:, :-1] + 1e-5)  # monotone prefixes
    # against zero mean, row j needs exactly its j features to reach a 1e-3 FVU
    ks = kstar_labels(sae, x, target_fvu=1e-3, mean=torch.zeros(d))
    assert ks.tolist() == list(range(1, d + 1))


def test_kstar_source_fits_a_probe():
    d = 8
    sae = _identity_topk_sae(d)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        n_active = torch.randint(1, d + 1, (64, 1), generator=g)
        mask = torch.rand(64, d, generator=g).argsort(-1) < n_active
        batches.append(mask.float() * (1.0 + torch.rand(64, d, generator=g)))
    probe = fit_probe(KStarLabels(sae, batches, target_fvu=0.01, mean=torch.zeros(d)))
    assert probe.d_in == d and probe.report is not None
    # k* ~ number of active coordinates, which the (non-negative) sum of x tracks linearly
    assert probe.report.spearman > 0.8
    assert 1 <= probe.label_min <= probe.label_max <= d


def test_kstar_errors():
    sae = _identity_topk_sae(4)
    with pytest.raises(ValueError, match="target_fvu must lie in"):
        kstar_labels(sae, torch.rand(3, 4), target_fvu=1.5)


def test_text_scores_and_surprisal_labels_with_tiny_model():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    texts = [torch.randint(1, 100, (int(n),), generator=g).tolist() for n in range(4, 16)]
    scores = [float(len(t)) for t in texts]
    last = TextScoreLabels(model, HOOK_NAME, texts, scores=scores, positions="last")
    X, y, fold = next(iter(last.batches()))
    assert X.shape == (8, D_MODEL) and y.tolist() == scores[:8] and fold.shape == (8,)
    every = TextScoreLabels(model, HOOK_NAME, texts, scores=scores, positions="all")
    n_rows = sum(b[0].shape[0] for b in every.batches())
    assert n_rows == sum(len(t) - 1 for t in texts)  # BOS position skipped (prepend_bos default)
    probe = fit_probe(every)
    assert probe.d_in == D_MODEL and probe.label_min == 4.0 and probe.label_max == 15.0

    surprisal = SurprisalLabels(model, HOOK_NAME, texts, positions="all", prepend_bos=False)
    Xs, ys, _ = next(iter(surprisal.batches()))
    assert torch.isfinite(ys).all() and (ys > 0).all()
    assert Xs.shape[0] == ys.shape[0] == sum(len(t) - 1 for t in texts[:8])


def test_text_score_errors():
    model = tiny_model()
    texts = [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match="scores must be finite"):
        next(iter(TextScoreLabels(model, HOOK_NAME, texts, scores=[1.0, float("nan")]).batches()))
    with pytest.raises(ValueError, match="one value per text"):
        next(iter(TextScoreLabels(model, HOOK_NAME, texts, scores=[1.0]).batches()))
    with pytest.raises(ValueError, match="score_column='score' is not a column"):
        TextScoreLabels.from_dataset(model, HOOK_NAME, {"text": texts, "y": [1.0, 2.0]})


@pytest.mark.parametrize("K", [1, 7, 8, 20, 64])
def test_kstar_by_search_is_the_first_crossing_where_errors_fall(K):
    """``first_block_reaching`` + ``kstar_in_block`` (block ends, then one block) give
    ``kstar_from_prefix_errors``'s label on falling errors, ``K`` where no prefix reaches, and a
    later label where an earlier block dips below the threshold and rises again."""
    from sae_adaptive_plugin.ops.adaptive_k import (
        first_block_reaching,
        kstar_from_prefix_errors,
        kstar_in_block,
    )

    g = torch.Generator().manual_seed(K)
    steps = torch.rand(300, K, generator=g, dtype=torch.float64)
    errors = 1.0 - steps.cumsum(-1) / (steps.sum(-1, keepdim=True) * 1.1)  # falling, > 0
    variance = 1.0 + torch.rand(300, generator=g, dtype=torch.float64)
    tau = 0.3

    def search(errors):
        width = min(8, K)
        ends = [min(width * (b + 1), K) - 1 for b in range(-(-K // width))]
        threshold = tau * variance
        block, reached = first_block_reaching(errors[:, ends], threshold)
        slot = block.unsqueeze(-1) * width + torch.arange(width)
        in_block = errors.gather(1, slot.clamp(max=K - 1)).masked_fill(slot >= K, float("inf"))
        return kstar_in_block(in_block, block, reached, threshold, K)

    want = kstar_from_prefix_errors(errors, variance, tau)
    assert torch.equal(search(errors), want)
    assert (want < K).any() or K == 1
    never = errors + 10.0  # no prefix reaches: K
    assert torch.equal(search(never), torch.full_like(want, K))
    if K >= 16:
        dip = errors.clone()
        dip[:, 2] = 0.0  # inside the first block, which then ends above the threshold
        dip[:, : min(8, K)] = dip[:, : min(8, K)].clamp(min=0.0)
        dip[:, 7] = 10.0
        exact = kstar_from_prefix_errors(dip, variance, tau)
        assert (exact == 3).all()
        assert (search(dip) > 3).all()
