"""Complexity label sources for the AdaptiveK probe, behind one small interface.

A label source is anything with ``batches()`` yielding ``(X [N, d_in], y [N], fold)``: activations,
their complexity labels and each row's cross-validation fold (``None``: random), what
:meth:`~sae_adaptive_plugin.probe.ridge.RidgeAccumulator.update` takes; :func:`fit_probe` streams
a source into a :class:`~sae_adaptive_plugin.probe.ComplexityProbe`. Sources (docs/METHODS.md §3):
:class:`TextScoreLabels` (a score per text), :class:`SurprisalLabels` (the model's own
``−log p(x_t | x_<t)``) and :class:`KStarLabels` (``k*``: the fewest latents of a TopK-family SAE
whose prefix reconstruction error is at most ``target_fvu`` times the batch's mean variance
``mean_rows ‖x − mean‖²``, or the row's own with ``scale="row"``). Details: ``docs/probe.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from sae_adaptive_plugin.ops.adaptive_k import kstar_from_prefix_errors
from sae_adaptive_plugin.ops.hierarchical import prefix_reconstruction_errors
from sae_adaptive_plugin.probe import ComplexityProbe, RidgeAccumulator

#: Scales of the ``k*`` threshold (as ``AdaptiveKTrainingSAEConfig.kstar_scale``).
_KSTAR_SCALES = ("dataset", "row")

LabelledBatch = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


class LabelSource(Protocol):
    """Yields ``(X [N, d_in], y [N], fold [N] or None)`` batches."""

    def batches(self) -> Iterator[LabelledBatch]: ...


def fit_probe(
    source: LabelSource,
    lambdas: Sequence[float] | None = None,
    n_folds: int = 5,
    seed: int = 0,
) -> ComplexityProbe:
    """Stream ``source`` into a :class:`RidgeAccumulator` and fit the probe (CV ``λ``)."""
    acc: RidgeAccumulator | None = None
    for X, y, fold in source.batches():
        if acc is None:
            acc = RidgeAccumulator(X.shape[-1], n_folds=n_folds, seed=seed)
        acc.update(X, y, fold=fold)
    if acc is None:
        raise ValueError("the label source yielded no rows: nothing to fit the probe on")
    return ComplexityProbe.from_accumulator(acc, lambdas)


# ---------------------------------------------------------------------------------------------
# (a) user scores and (b) surprisal: a language model over texts
# ---------------------------------------------------------------------------------------------


@dataclass
class _TextSource:
    model: Any
    hook: str
    texts: Sequence[Any]
    positions: str = "last"
    context_size: int | None = None
    batch_size: int = 8
    prepend_bos: bool | None = None
    n_folds: int = 5
    seed: int = 0

    def _scores(self) -> list[float] | None:
        raise NotImplementedError

    def batches(self) -> Iterator[LabelledBatch]:
        from sae_adaptive_plugin.data import local_lm
        from sae_adaptive_plugin.probe.activations import collect_activations

        _, n_ctx, default_bos = local_lm.model_limits(self.model)
        prepend_bos = default_bos if self.prepend_bos is None else self.prepend_bos
        ctx = int(self.context_size or n_ctx)
        if not 1 <= ctx <= n_ctx:
            raise ValueError(f"context_size must be in [1, n_ctx={n_ctx}], got {ctx}")
        scores = self._scores()
        tokens = local_lm.texts_to_token_lists(self.model, list(self.texts), prepend_bos)
        yield from collect_activations(
            self.model,
            self.hook,
            [t[:ctx] for t in tokens],
            scores,
            positions=self.positions,
            batch_size=self.batch_size,
            skip_first=prepend_bos,
            n_folds=self.n_folds,
            seed=self.seed,
        )


@dataclass
class TextScoreLabels(_TextSource):
    """(a) One user score per text (``scores``, same length as ``texts``, all finite)."""

    scores: Sequence[float] = ()

    def _scores(self) -> list[float]:
        if len(self.scores) != len(self.texts):
            raise ValueError(
                f"scores must hold one value per text: {len(self.texts)} texts, "
                f"{len(self.scores)} scores"
            )
        out = [float(s) for s in self.scores]
        bad = [i for i, s in enumerate(out) if s != s or s in (float("inf"), float("-inf"))]
        if bad:
            raise ValueError(f"scores must be finite; NaN/inf at rows {bad[:10]}")
        return out

    @classmethod
    def from_dataset(
        cls,
        model: Any,
        hook: str,
        dataset: Any,
        text_column: str = "text",
        score_column: str = "score",
        **kwargs: Any,
    ) -> TextScoreLabels:
        """From a ``datasets.Dataset`` (or dict of columns) with a text and a score column."""
        columns = list(getattr(dataset, "column_names", None) or dataset.keys())
        for name, col in (("text_column", text_column), ("score_column", score_column)):
            if col not in columns:
                raise ValueError(f"{name}={col!r} is not a column of the dataset ({columns})")
        return cls(
            model=model,
            hook=hook,
            texts=list(dataset[text_column]),
            scores=list(dataset[score_column]),
            **kwargs,
        )


@dataclass
class SurprisalLabels(_TextSource):
    """(b) The model's surprisal: per token (``positions="all"``) or a text's mean (``"last"``)."""

    positions: str = "all"

    def _scores(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# (c) k* from a TopK-family SAE's prefix reconstructions
# ---------------------------------------------------------------------------------------------


def _prefix_budget(sae: Any) -> int:
    cfg = sae.cfg
    for name in ("k_max", "trained_k", "k"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(
        f"{type(sae).__name__} has no top-k budget (cfg.k_max / trained_k / k): k* labels need a "
        "TopK-family SAE (topk, hierarchical_topk, adaptivek)"
    )


@torch.no_grad()
def prefix_errors(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """``‖x − x̂_j‖²`` for every prefix ``j = 1..K`` of ``sae``'s sorted top-``K``: ``[N, K]``.

    ``K`` is ``cfg.k_max`` (adaptivek), ``cfg.trained_k`` (hierarchical_topk) or ``cfg.k`` (topk).
    ``x`` is flattened to ``[N, d_in]``. Run-time normalisations are refused (the errors would not
    be those of the SAE's outputs).
    """
    if sae.cfg.normalize_activations not in ("none", "expected_average_only_in"):
        raise ValueError(
            f"k* labels need normalize_activations 'none' (or a folded scaling), got "
            f"{sae.cfg.normalize_activations!r}"
        )
    K = _prefix_budget(sae)
    x = x.reshape(-1, sae.cfg.d_in).to(sae.dtype)
    sae_in = sae.process_sae_in(x)
    hidden_pre = sae_in @ sae.W_enc + sae.b_enc
    norms = sae.W_dec.norm(dim=-1)
    rescale = bool(getattr(sae.cfg, "rescale_acts_by_decoder_norm", False))
    if rescale:
        hidden_pre = hidden_pre * norms
    values, indices = hidden_pre.topk(K, dim=-1, sorted=True)
    values = values.relu()
    if rescale:
        values = values / norms[indices]
    return prefix_reconstruction_errors(x - sae.b_dec, values, sae.W_dec, indices)


@torch.no_grad()
def kstar_labels(
    sae: Any,
    x: torch.Tensor,
    target_fvu: float = 0.1,
    mean: torch.Tensor | None = None,
    scale: str = "dataset",
) -> torch.Tensor:
    """``k*`` of each row of ``x`` (long ``[N]``, in ``[1, K]``; ``K`` when never reached).

    ``mean`` is the activation mean of the variance ``‖x − mean‖²`` (default: the batch mean).
    ``scale``: ``"dataset"`` — the threshold is ``target_fvu`` times the mean of that variance
    over the rows of ``x`` (one error budget for all rows); ``"row"`` — times each row's own.
    """
    if scale not in _KSTAR_SCALES:
        raise ValueError(f"scale must be one of {_KSTAR_SCALES}, got {scale!r}")
    x2 = x.reshape(-1, sae.cfg.d_in).to(sae.dtype)
    errors = prefix_errors(sae, x2)
    m = x2.mean(0) if mean is None else mean.to(x2.device, x2.dtype)
    variance = (x2 - m).pow(2).sum(-1)
    if scale == "dataset":
        variance = variance.mean().expand_as(variance)
    return kstar_from_prefix_errors(errors, variance, target_fvu)


@dataclass
class KStarLabels:
    """(c) ``k*`` labels of ``activations`` (an iterable of ``[N, d_in]`` batches) under ``sae``.

    ``mean``: the activation mean for the variance (default: each batch's own mean).
    ``scale``: as in :func:`kstar_labels` (``"dataset"``: over each batch's rows).
    """

    sae: Any
    activations: Iterable[torch.Tensor]
    target_fvu: float = 0.1
    mean: torch.Tensor | None = None
    scale: str = "dataset"

    def batches(self) -> Iterator[LabelledBatch]:
        for x in self.activations:
            x2 = x.reshape(-1, self.sae.cfg.d_in)
            yield (
                x2,
                kstar_labels(self.sae, x2, self.target_fvu, self.mean, self.scale).float(),
                None,
            )


__all__ = [
    "KStarLabels",
    "LabelSource",
    "SurprisalLabels",
    "TextScoreLabels",
    "fit_probe",
    "kstar_labels",
    "prefix_errors",
]
