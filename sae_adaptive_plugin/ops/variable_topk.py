"""Per-row variable-k top-k and the sparse decode it feeds; shared by all adaptive architectures.

Each row ``b`` keeps its own ``k[b]`` largest pre-activations (ReLU'd). It is computed without a
Python loop over rows: one ``topk`` at the batch's largest k (``k_max``), then a rank mask
``rank < k[b]``. Results stay in the compact ``[..., k_max]`` form (:class:`TopKResult`), from which
:func:`scatter_topk` builds the dense ``[..., d_sae]`` code and :func:`decode_topk` the
reconstruction ``Σ_i values_i · W_dec[indices_i]`` (no bias).

:func:`decode_topk` has two implementations with the same values and gradients: a dense reference
(scatter to ``[B, d_sae]`` then one matmul, what SAELens's TopK does) and a gather path
(``embedding_bag`` over the k selected decoder rows) that touches only ``B·k`` rows.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F


class TopKResult(NamedTuple):
    """Selected latents of each row, sorted by pre-activation, descending.

    ``values``: ReLU'd activations, exactly zero where ``mask`` is False. ``indices``: latent ids.
    ``mask``: True for the first ``k[b]`` ranks of row ``b``. All three are ``[..., k_max]``.
    """

    values: torch.Tensor
    indices: torch.Tensor
    mask: torch.Tensor


def check_k(k_per_row: torch.Tensor, d_sae: int, name: str = "k") -> None:
    """Raise a clear ``ValueError`` unless every ``k`` lies in ``[0, d_sae]``."""
    if k_per_row.numel() == 0:
        return
    lo, hi = int(k_per_row.min()), int(k_per_row.max())
    if lo < 0 or hi > d_sae:
        raise ValueError(f"{name} must lie in [0, d_sae={d_sae}] for every row, got [{lo}, {hi}]")


def variable_topk(
    hidden_pre: torch.Tensor, k_per_row: torch.Tensor | int, k_max: int | None = None
) -> TopKResult:
    """Top-``k[b]`` of each row of ``hidden_pre`` ``[..., d_sae]``, ReLU'd.

    ``k_per_row`` is an integer tensor of shape ``hidden_pre.shape[:-1]`` (or an int for all rows).
    ``k_max`` (≥ every ``k``) fixes the width of the result; by default the batch's largest k
    (one device sync). Gradients flow to the selected entries of ``hidden_pre``.
    """
    d_sae = hidden_pre.shape[-1]
    if isinstance(k_per_row, int):
        k_per_row = torch.full(hidden_pre.shape[:-1], k_per_row, device=hidden_pre.device)
    if k_per_row.shape != hidden_pre.shape[:-1]:
        raise ValueError(
            f"k_per_row has shape {tuple(k_per_row.shape)}, expected {tuple(hidden_pre.shape[:-1])}"
        )
    if k_max is None:
        k_max = int(k_per_row.max()) if k_per_row.numel() else 0
    if not 0 <= k_max <= d_sae:
        raise ValueError(f"k_max must lie in [0, d_sae={d_sae}], got {k_max}")
    top = hidden_pre.topk(k_max, dim=-1, sorted=True)
    ranks = torch.arange(k_max, device=hidden_pre.device)
    mask = ranks < k_per_row.unsqueeze(-1).to(ranks.dtype)
    values = torch.where(mask, top.values.relu(), torch.zeros((), dtype=hidden_pre.dtype))
    return TopKResult(values, top.indices, mask)


def variable_topk_reference(hidden_pre: torch.Tensor, k_per_row: torch.Tensor) -> torch.Tensor:
    """Plain per-row loop, dense ``[B, d_sae]`` output: the test reference for :func:`variable_topk`."""
    out = torch.zeros_like(hidden_pre)
    for b in range(hidden_pre.shape[0]):
        k = int(k_per_row[b])
        if k:
            v, i = hidden_pre[b].topk(k)
            out[b, i] = v.relu()
    return out


def scatter_topk(result: TopKResult, d_sae: int) -> torch.Tensor:
    """Dense feature activations ``[..., d_sae]`` from a :class:`TopKResult`."""
    shape = (*result.values.shape[:-1], d_sae)
    out = result.values.new_zeros(shape)
    return out.scatter(-1, result.indices, result.values)


def decode_topk_dense(
    values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor
) -> torch.Tensor:
    """Reference decode: scatter to ``[..., d_sae]`` then one dense matmul with ``W_dec``."""
    dense = values.new_zeros((*values.shape[:-1], W_dec.shape[0]))
    return dense.scatter(-1, indices, values) @ W_dec


def decode_topk_gather(
    values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor
) -> torch.Tensor:
    """Gather decode: ``embedding_bag`` sums the selected decoder rows weighted by ``values``."""
    lead = values.shape[:-1]
    k = values.shape[-1]
    if k == 0:
        return W_dec.new_zeros((*lead, W_dec.shape[1]))
    out = F.embedding_bag(
        indices.reshape(-1, k),
        W_dec,
        per_sample_weights=values.reshape(-1, k).to(W_dec.dtype),
        mode="sum",
    )
    return out.reshape(*lead, W_dec.shape[1])


DecodeImpl = Literal["auto", "dense", "gather"]


def decode_topk(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    impl: DecodeImpl = "auto",
) -> torch.Tensor:
    """``Σ_i values[..., i] · W_dec[indices[..., i]]`` (no bias), shape ``[..., d_in]``.

    ``impl="auto"`` takes the gather path when the selected rows are a small part of the
    dictionary (``k_max ≤ d_sae / 8``) and the dense reference otherwise.
    """
    if impl == "auto":
        impl = "gather" if values.shape[-1] * 8 <= W_dec.shape[0] else "dense"
    if impl == "gather":
        return decode_topk_gather(values, indices, W_dec)
    if impl == "dense":
        return decode_topk_dense(values, indices, W_dec)
    raise ValueError(f"impl must be 'auto', 'dense' or 'gather', got {impl!r}")
