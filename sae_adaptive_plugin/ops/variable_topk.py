"""Per-row variable-k top-k and the sparse decode it feeds; shared by all adaptive architectures.

Each row ``b`` keeps its own ``k[b]`` largest pre-activations (ReLU'd). It is computed without a
Python loop over rows: a sorted ``topk`` at ``k_max`` (the batch's largest k by default), then a
rank mask ``rank < k[b]``. On the CPU (:func:`rows_topk`) rows whose k is well below ``k_max`` take
their ``topk`` at a narrower width, a group per width. Results stay in the compact
``[..., k_max]`` form (:class:`TopKResult`), from which :func:`scatter_topk` builds the dense
``[..., d_sae]`` code and :func:`decode_topk` the reconstruction ``Σ_i values_i ·
W_dec[indices_i]`` (no bias).

:func:`decode_topk` has two implementations with the same values and gradients: a dense reference
(scatter to ``[B, d_sae]`` then one matmul, what SAELens's TopK does) and a gather path
(``embedding_bag`` over the k selected decoder rows) that touches only ``B·k`` rows.

:func:`topk_encode` fuses the encoder and the selection, with a backward that touches only the
selected latents (``impl="sparse"``) next to the plain autograd reference (``impl="dense"``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from sae_adaptive_plugin.ops.dispatch import (
    accumulation_dtype,
    autocast_dtype,
    autocast_off,
    host_check_is_free,
    linear_weight,
)


class TopKResult(NamedTuple):
    """Selected latents of each row, sorted by pre-activation, descending.

    ``values``: ReLU'd activations, exactly zero where ``mask`` is False. ``indices``: latent ids.
    ``mask``: True for the first ``k[b]`` ranks of row ``b``. All three are ``[..., k_max]``.
    Past a row's ``topk`` width (:func:`rows_topk`; never inside its ``k``) the indices repeat
    the row's first one: sums over slots (scatter-add, bags, index-add) are exact, since those
    slots' values are 0, but an overwriting scatter is not.
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


#: :func:`rows_topk` groups rows by width only from this ``k_max`` up; its narrowest width.
GROUP_MIN_WIDTH = 16
#: Elements of the reused buffer :func:`rows_topk` gathers a group's rows into (64 MiB in fp32).
GROUP_GATHER_ELEMENTS = 1 << 24


def rows_topk(
    hidden_pre: torch.Tensor, k_per_row: torch.Tensor, k_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` ``[N, k_max]`` of ``hidden_pre`` ``[N, d_sae]``, sorted descending,
    each row exact up to its ``k``: ``hidden_pre.topk(k_max)``'s values and indices up to the row's
    ``topk`` width. On the CPU, where reading ``k_per_row`` is free, a row whose ``k`` fits a
    narrower width (``⌈k_max / 2⌉``, ``⌈k_max / 4⌉``, … down to :data:`GROUP_MIN_WIDTH`) takes its
    ``topk`` at the narrowest such width, its rows gathered by groups into one reused buffer; the
    slots past that width hold value 0 and the row's first index (see :class:`TopKResult`).
    Elsewhere, or when every row needs ``k_max``: one ``topk`` at ``k_max``."""
    N, d_sae = hidden_pre.shape
    if not host_check_is_free(k_per_row) or k_max < 2 * GROUP_MIN_WIDTH or N == 0:
        return tuple(hidden_pre.topk(k_max, dim=-1, sorted=True))  # type: ignore[return-value]
    widths = [k_max]
    while -(-widths[-1] // 2) >= GROUP_MIN_WIDTH:
        widths.append(-(-widths[-1] // 2))
    bounds = torch.tensor(widths[::-1], device=k_per_row.device)  # ascending
    group = torch.bucketize(k_per_row, bounds)  # index of the narrowest width ≥ k, ascending
    counts = torch.bincount(group, minlength=len(widths)).tolist()
    if counts[-1] == N:
        return tuple(hidden_pre.topk(k_max, dim=-1, sorted=True))  # type: ignore[return-value]
    values = hidden_pre.new_zeros(N, k_max)
    indices = torch.empty(N, k_max, dtype=torch.long, device=hidden_pre.device)
    chunk = max(1, GROUP_GATHER_ELEMENTS // max(d_sae, 1))
    buffer = hidden_pre.new_empty(min(chunk, N), d_sae)
    with torch.no_grad():
        for g, count in enumerate(counts):
            if count == 0:
                continue
            width = int(bounds[g])
            rows = (group == g).nonzero().squeeze(-1)
            for s in range(0, count, chunk):
                ids = rows[s : s + chunk]
                part = torch.index_select(hidden_pre, 0, ids, out=buffer[: ids.numel()])
                top = part.topk(width, dim=-1, sorted=True)
                values[ids, :width] = top.values
                indices[ids] = top.indices[:, :1].expand(-1, k_max)
                indices[ids, :width] = top.indices
    if hidden_pre.requires_grad and torch.is_grad_enabled():
        # the same values with a gradient to the selected entries (zero past each row's width)
        ranks = torch.arange(k_max, device=hidden_pre.device)
        inside = ranks < bounds[group].unsqueeze(-1)
        values = torch.where(inside, hidden_pre.gather(-1, indices), 0)
    return values, indices


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
    top_values, top_indices = rows_topk(hidden_pre.reshape(-1, d_sae), k_per_row.reshape(-1), k_max)
    top_values = top_values.reshape(*hidden_pre.shape[:-1], k_max)
    top_indices = top_indices.reshape(*hidden_pre.shape[:-1], k_max)
    ranks = torch.arange(k_max, device=hidden_pre.device)
    mask = ranks < k_per_row.unsqueeze(-1).to(ranks.dtype)
    values = torch.where(mask, top_values.relu(), 0)
    return TopKResult(values, top_indices, mask)


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
    # an add: slots past a row's topk width repeat an index with value 0 (TopKResult)
    return result.values.new_zeros(shape).scatter_add_(-1, result.indices, result.values)


def decode_topk_dense(
    values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor
) -> torch.Tensor:
    """Reference decode: scatter to ``[..., d_sae]`` then one dense matmul with ``W_dec``."""
    dense = values.new_zeros((*values.shape[:-1], W_dec.shape[0]))
    return dense.scatter_add(-1, indices, values) @ W_dec


#: Below this fraction of used slots a CPU bag keeps only the used ones (:func:`weighted_bag`).
COMPACT_BELOW = 0.75


def weighted_bag(
    indices: torch.Tensor,
    weight: torch.Tensor,
    per_slot: torch.Tensor,
    used: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[n] = Σ_i per_slot[n, i] · weight[indices[n, i]]`` (``indices``/``per_slot``
    ``[N, m]``) as one ``embedding_bag``. ``used`` (``[N, m]`` bool): the slots that count; the
    others get no gradient. On the CPU, where reading ``used`` back is free, the bag holds only
    the used slots once they are fewer than :data:`COMPACT_BELOW` of all (a per-row k well
    under its ``k_max``); elsewhere every slot is summed, the unused ones weighted zero."""
    if used is not None:
        per_slot = torch.where(used, per_slot, 0)
        if host_check_is_free(used) and float(used.float().mean()) < COMPACT_BELOW:
            counts = used.sum(-1)
            offsets = torch.zeros_like(counts)
            offsets[1:] = counts.cumsum(0)[:-1]
            return F.embedding_bag(
                indices[used], weight, offsets, mode="sum", per_sample_weights=per_slot[used]
            )
    return F.embedding_bag(indices, weight, per_sample_weights=per_slot, mode="sum")


def decode_topk_gather(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather decode: ``embedding_bag`` sums the selected decoder rows weighted by ``values``, in
    at least float32 (a bf16 bag's backward sums a latent's rows in bf16 on the CPU), returned in
    ``W_dec``'s dtype; ``mask``: the slots in use (:func:`weighted_bag`)."""
    lead = values.shape[:-1]
    k = values.shape[-1]
    if k == 0:
        return W_dec.new_zeros((*lead, W_dec.shape[1]))
    acc = accumulation_dtype(W_dec.dtype)
    out = weighted_bag(
        indices.reshape(-1, k),
        W_dec.to(acc),
        values.reshape(-1, k).to(acc),
        None if mask is None else mask.reshape(-1, k),
    )
    return out.reshape(*lead, W_dec.shape[1]).to(W_dec.dtype)


DecodeImpl = Literal["auto", "dense", "gather"]


def decode_topk(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    impl: DecodeImpl = "auto",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σ_i values[..., i] · W_dec[indices[..., i]]`` (no bias), shape ``[..., d_in]``.

    ``impl="auto"`` takes the gather path when the selected rows are a small part of the
    dictionary (``k_max ≤ d_sae / 8``) and the dense reference otherwise. ``mask`` (a
    :class:`TopKResult`'s): the slots in use, where ``values`` may be non-zero; the gather path
    sums only those on the CPU.
    """
    if impl == "auto":
        impl = "gather" if values.shape[-1] * 8 <= W_dec.shape[0] else "dense"
    if impl == "gather":
        return decode_topk_gather(values, indices, W_dec, mask)
    if impl == "dense":
        return decode_topk_dense(values, indices, W_dec)
    raise ValueError(f"impl must be 'auto', 'dense' or 'gather', got {impl!r}")


# ---------------------------------------------------------------------------------------------
# Encoder + selection with a backward that touches only the selected latents
# ---------------------------------------------------------------------------------------------


class _TopKEncode(torch.autograd.Function):
    """``hidden_pre = (sae_in @ W_enc + b_enc) · scale`` and its per-row top-``k`` (see
    :func:`topk_encode`). Outputs: ``hidden_pre``, ``values``, ``indices``, ``mask``. Matmuls run
    in ``W_enc``'s dtype; sums over rows (``b_enc``, ``scale`` and, for bf16/fp16, ``W_enc``
    gradients) in at least float32, cast back at the end."""

    @staticmethod
    @autocast_off
    def forward(ctx, sae_in, W_enc, b_enc, scale, k_per_row, k_max):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        hidden_pre = torch.addmm(b_enc, sae_in, W_enc)
        if scale is not None:
            # the values of SAELens's h * scale (float32 for bf16 h under autocast) in one
            # [N, d_sae] buffer: `to` is a no-op at the same dtype, else one conversion (a
            # mixed-dtype multiply on the CPU copies h to float32, then writes a second buffer)
            hidden_pre = hidden_pre.to(torch.promote_types(hidden_pre.dtype, scale.dtype))
            hidden_pre.mul_(scale)
        top_values, top_indices = rows_topk(hidden_pre, k_per_row, k_max)
        ranks = torch.arange(k_max, device=hidden_pre.device)
        mask = ranks < k_per_row.unsqueeze(-1).to(ranks.dtype)
        positive = mask & (top_values > 0)
        values = torch.where(positive, top_values, 0)
        h_sel = unscaled_at(top_values, scale, top_indices) if scale is not None else None
        ctx.save_for_backward(sae_in, W_enc, b_enc, scale, top_indices, positive, h_sel)
        ctx.mark_non_differentiable(top_indices, mask)
        return hidden_pre, values, top_indices, mask

    @staticmethod
    @autocast_off
    def backward(ctx, grad_hidden_pre, grad_values, _grad_indices, _grad_mask):  # type: ignore[override]
        sae_in, W_enc, b_enc, scale, indices, positive, h_sel = ctx.saved_tensors
        if grad_values is None and grad_hidden_pre is None:
            return None, None, None, None, None, None
        if grad_hidden_pre is not None:
            # something used hidden_pre densely (e.g. the AuxK loss): plain dense backward
            g = grad_hidden_pre.clone()
            if grad_values is not None:
                g.scatter_add_(-1, indices, torch.where(positive, grad_values, 0))
            return _dense_backward(ctx.needs_input_grad[:4], g, sae_in, W_enc, b_enc, scale)
        return sparse_encoder_backward(
            ctx.needs_input_grad[:4],
            grad_values,
            sae_in,
            W_enc,
            b_enc,
            scale,
            indices,
            positive,
            h_sel,
        )


def _dense_backward(needs, g, sae_in, W_enc, b_enc, scale):
    """Gradients from ``g = ∂L/∂hidden_pre`` ``[N, d_sae]``. With a scale, ``∂L/∂W_enc =
    (sae_inᵀ g) ⊙ s`` and ``∂L/∂s_j = Σ_n g_nj h_nj = Σ_i W_ij (sae_inᵀ g)_ij + b_j Σ_n g_nj``
    share the one matmul ``sae_inᵀ g`` (no division by ``s``, so a zero scale needs no check)."""
    need_x, need_w, need_b, need_s = needs
    acc = accumulation_dtype(g.dtype, W_enc.dtype)
    grad_w = grad_s = None
    col_sum = g.sum(0, dtype=acc) if (need_b or need_s) else None
    if need_w or (need_s and scale is not None):
        m = sae_in.t() @ g.to(W_enc.dtype)  # sae_inᵀ g (unscaled)
        if need_s and scale is not None:
            grad_s = (W_enc.to(acc) * m.to(acc)).sum(0) + b_enc.to(acc) * col_sum
            grad_s = grad_s.to(scale.dtype)
        if need_w:
            grad_w = (m * scale).to(W_enc.dtype) if scale is not None else m
    if scale is not None:
        g = g * scale
        if col_sum is not None:
            col_sum = col_sum * scale.to(acc)
    grad_x = g.to(W_enc.dtype) @ W_enc.t() if need_x else None
    grad_b = col_sum.to(b_enc.dtype) if need_b else None
    return grad_x, grad_w, grad_b, grad_s, None, None


def unscaled_at(values: torch.Tensor, scale: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``values / scale[indices]``: the unscaled pre-activations ``h`` at the slots ``indices``
    from the scaled ``h · scale`` there (the ``h_sel`` of :func:`sparse_encoder_backward`). A
    zero scale gives 0: its scaled value is 0 whatever ``h`` is, so it contributes nothing to
    ``∂L/∂scale`` (a zero decoder row's norm has zero gradient) and is never a positive
    selection."""
    s = scale[indices]
    return torch.where(s != 0, values / torch.where(s != 0, s, 1), 0)


def sparse_encoder_backward(
    needs, grad_values, sae_in, W_enc, b_enc, scale, indices, positive, h_sel
):
    """Gradients ``(sae_in, W_enc, b_enc, scale, None, None)`` when only the ``N·k`` pairs
    ``indices`` ``[N, k]`` carry one: ``grad_values`` is ``∂L/∂hidden_pre`` there, counted where
    ``positive`` (``None``: everywhere); ``h_sel`` the unscaled pre-activations there."""
    need_x, need_w, need_b, need_s = needs
    d_sae = W_enc.shape[1]
    acc = accumulation_dtype(grad_values.dtype, W_enc.dtype)
    # ∂L/∂hidden_pre at the selected slots
    g_sel = grad_values if positive is None else torch.where(positive, grad_values, 0)
    flat_idx = indices.reshape(-1)
    grad_s = None
    if scale is not None:
        if need_s:
            contrib = (g_sel.to(acc) * h_sel.to(acc)).reshape(-1)
            grad_s = scale.new_zeros(d_sae, dtype=acc).index_add_(0, flat_idx, contrib)
            grad_s = grad_s.to(scale.dtype)
        g_sel = g_sel * scale[indices]
    grad_b = None
    if need_b:
        grad_b = W_enc.new_zeros(d_sae, dtype=acc).index_add_(
            0, flat_idx, g_sel.reshape(-1).to(acc)
        )
        grad_b = grad_b.to(b_enc.dtype)
    grad_x = grad_w = None
    if need_x or need_w:
        # ∂L/∂sae_in[n] = Σ_i g[n, i] · W_enc[:, idx[n, i]]: an embedding_bag over W_encᵀ;
        # ∂L/∂W_encᵀ[j] = Σ_{(n,i): idx=j} g[n, i] · sae_in[n]: that bag's weight gradient
        # (in at least float32: a bf16 bag sums a latent's rows in bf16 on the CPU)
        bag = accumulation_dtype(W_enc.dtype)
        W_t = W_enc.detach().t().to(bag).contiguous().requires_grad_(need_w)
        with torch.enable_grad():
            grad_x = weighted_bag(indices, W_t, g_sel.to(bag), positive)
            if need_w:
                (grad_w_t,) = torch.autograd.grad(grad_x, W_t, grad_outputs=sae_in.to(bag))
                # a transposed view: autograd lays the first gradient of W_enc out as W_enc
                # (one copy) and adds later ones (AuxK's) in place, without a copy of each
                grad_w = grad_w_t.t().to(W_enc.dtype)
        grad_x = grad_x.detach().to(sae_in.dtype) if need_x else None
    return grad_x, grad_w, grad_b, grad_s, None, None


EncodeImpl = Literal["auto", "dense", "sparse"]


def topk_encode(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k_per_row: torch.Tensor | int,
    k_max: int | None = None,
    scale: torch.Tensor | None = None,
    impl: EncodeImpl = "auto",
) -> tuple[torch.Tensor, TopKResult]:
    """Encoder and per-row top-k in one op: ``(hidden_pre, variable_topk(hidden_pre, k, k_max))``.

    ``hidden_pre = (sae_in @ W_enc + b_enc) · scale`` (``scale``: optional ``[d_sae]``, e.g. the
    decoder-row norms of SAELens's ``rescale_acts_by_decoder_norm``), shape ``[..., d_sae]``.
    Values and gradients (to ``sae_in``, ``W_enc``, ``b_enc``, ``scale``) equal the plain
    autograd composition (``impl="dense"``, the reference). ``impl="sparse"`` computes the
    backward from the ``N·k_max`` selected slots only when nothing else uses ``hidden_pre``
    with gradient: ``∂L/∂W_enc`` and ``∂L/∂sae_in`` become an ``embedding_bag`` over ``W_encᵀ``
    and its weight gradient (``N·k·d_in`` work) instead of two ``N × d_in × d_sae`` matmuls;
    ``∂L/∂b_enc`` and ``∂L/∂scale`` are index-adds. When ``hidden_pre`` itself receives a
    gradient (e.g. SAELens's AuxK loss on dead latents), the backward is the dense one.
    ``"auto"`` = ``"sparse"``. Under autocast the sparse path casts ``sae_in``, ``W_enc`` and
    ``b_enc`` to the autocast dtype, as autocast's ``addmm`` does in the dense path, so both
    select the same latents; sums over rows run in float32. Double backward is not supported by
    the sparse path.
    """
    if impl == "auto":
        impl = "sparse"
    d_sae = W_enc.shape[-1]
    lead = sae_in.shape[:-1]
    if isinstance(k_per_row, int):
        k_per_row = torch.full(lead, k_per_row, device=sae_in.device)
    if k_per_row.shape != lead:
        raise ValueError(f"k_per_row has shape {tuple(k_per_row.shape)}, expected {tuple(lead)}")
    if k_max is None:
        k_max = int(k_per_row.max()) if k_per_row.numel() else 0
    if not 0 <= k_max <= d_sae:
        raise ValueError(f"k_max must lie in [0, d_sae={d_sae}], got {k_max}")
    if scale is not None and scale.shape != (d_sae,):
        raise ValueError(f"scale must have shape ({d_sae},), got {tuple(scale.shape)}")
    if impl == "dense":
        # addmm, as the sparse path does, so both give bit-identical hidden_pre (and selections)
        hidden_pre = torch.addmm(b_enc, sae_in.reshape(-1, sae_in.shape[-1]), W_enc)
        hidden_pre = hidden_pre.reshape(*lead, d_sae)
        if scale is not None:
            hidden_pre = hidden_pre * scale
        return hidden_pre, variable_topk(hidden_pre, k_per_row, k_max)
    if impl != "sparse":
        raise ValueError(f"impl must be 'auto', 'dense' or 'sparse', got {impl!r}")
    low = autocast_dtype(sae_in.device.type)
    if low is not None:  # what autocast's addmm does to its operands
        sae_in, W_enc, b_enc = sae_in.to(low), linear_weight(W_enc, low), b_enc.to(low)
    hidden_pre, values, indices, mask = _TopKEncode.apply(
        sae_in.reshape(-1, sae_in.shape[-1]), W_enc, b_enc, scale, k_per_row.reshape(-1), k_max
    )
    return hidden_pre.reshape(*lead, d_sae), TopKResult(
        values.reshape(*lead, k_max), indices.reshape(*lead, k_max), mask.reshape(*lead, k_max)
    )
