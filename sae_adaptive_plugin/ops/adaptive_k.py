"""AdaptiveK's two scalar maps (docs/METHODS.md §3), as pure tensor ops.

- :func:`complexity_to_k`: probe complexity ``ĉ`` → per-row ``k`` through the sigmoid map
  ``s = (ĉ − c_lo)/(c_hi − c_lo)``, ``k = round(clamp(k_min + σ(γ(s − ½))(k_max − k_min),
  k_min, k_max))`` (``s = ½`` when ``c_hi = c_lo``). Vectorised, no device sync.
- :func:`threshold_for_median_kstar`: the ``τ`` that puts the median ``k*`` of a batch at a given k.
- :func:`kstar_from_prefix_errors`: the label ``k* = min{j : ‖x − x̂_j‖² ≤ τ·‖x − mean‖²}`` of each
  row from its prefix reconstruction errors ``[B, K]`` (``K`` when no prefix reaches ``τ``).
- :func:`first_block_reaching` and :func:`kstar_in_block`: the same label found by search, from
  the errors at the block ends and inside one block per row (``k*`` unchanged wherever the errors
  fall with ``j``).
"""

from __future__ import annotations

import torch


def complexity_to_k(
    c: torch.Tensor,
    c_lo: torch.Tensor | float,
    c_hi: torch.Tensor | float,
    k_min: int,
    k_max: int,
    steepness: float,
) -> torch.Tensor:
    """Per-row ``k`` (long, shape of ``c``) from complexities ``c`` and the label range."""
    c = c.to(torch.float32)
    c_lo = torch.as_tensor(c_lo, dtype=torch.float32, device=c.device)
    c_hi = torch.as_tensor(c_hi, dtype=torch.float32, device=c.device)
    span = c_hi - c_lo
    s = torch.where(span > 0, (c - c_lo) / span.clamp(min=1e-12), torch.full_like(c, 0.5))
    k = k_min + torch.sigmoid(steepness * (s - 0.5)) * (k_max - k_min)
    return k.clamp(k_min, k_max).round().long()


def kstar_from_prefix_errors(
    errors: torch.Tensor, total_variance: torch.Tensor, target_fvu: float
) -> torch.Tensor:
    """``k*`` per row (long ``[B]``, in ``[1, K]``) from ``errors [B, K]`` and ``‖x − mean‖² [B]``.

    ``k*`` is the first prefix whose squared error is at most ``target_fvu · total_variance``;
    rows that never get there are labelled ``K``.
    """
    if errors.ndim != 2 or errors.shape[1] < 1:
        raise ValueError(f"errors must be [B, K] with K >= 1, got shape {tuple(errors.shape)}")
    if not 0.0 < float(target_fvu) < 1.0:
        raise ValueError(f"target_fvu must lie in (0, 1), got {target_fvu}")
    K = errors.shape[1]
    reached = errors <= target_fvu * total_variance.reshape(-1, 1).to(errors.dtype)
    first = reached.to(torch.int8).argmax(dim=-1) + 1
    return torch.where(reached.any(dim=-1), first, torch.full_like(first, K)).long()


def first_block_reaching(
    block_end_errors: torch.Tensor, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block, reached)`` per row (long and bool ``[B]``): the first block whose end error
    (``block_end_errors [B, n_blocks]``) is at most ``threshold [B]``, and whether one is (where
    none is, ``block`` is the last)."""
    if block_end_errors.ndim != 2 or block_end_errors.shape[1] < 1:
        raise ValueError(
            f"block_end_errors must be [B, n_blocks] with n_blocks >= 1, got shape "
            f"{tuple(block_end_errors.shape)}"
        )
    hit = block_end_errors <= threshold.reshape(-1, 1).to(block_end_errors.dtype)
    reached = hit.any(dim=-1)
    last = torch.full_like(reached, block_end_errors.shape[1] - 1, dtype=torch.long)
    return torch.where(reached, hit.to(torch.int8).argmax(dim=-1), last), reached


def kstar_in_block(
    in_block_errors: torch.Tensor,
    block: torch.Tensor,
    reached: torch.Tensor,
    threshold: torch.Tensor,
    K: int,
) -> torch.Tensor:
    """``k*`` per row (long ``[B]``, in ``[1, K]``) by search: in the first block whose end
    reaches ``threshold`` (:func:`first_block_reaching`), the first prefix whose error
    (``in_block_errors [B, width]``, the block's prefixes in order, ``inf`` past ``K``) is at
    most ``threshold``; ``K`` for rows that no block end reaches. Equal to
    :func:`kstar_from_prefix_errors` wherever the errors fall with ``j``; elsewhere it can be
    later (a dip below the threshold inside an earlier block is not seen)."""
    width = in_block_errors.shape[1]
    hit = in_block_errors <= threshold.reshape(-1, 1).to(in_block_errors.dtype)
    start = block.long() * width
    last = (K - 1 - start).clamp(max=width - 1)  # the block's end: reached by definition
    hit[torch.arange(hit.shape[0], device=hit.device), last] = True
    first = start + hit.to(torch.int8).argmax(dim=-1) + 1
    return torch.where(reached, first, torch.full_like(first, K)).long()


def threshold_for_median_kstar(
    errors: torch.Tensor, total_variance: torch.Tensor, middle: int
) -> float:
    """The ``τ`` at which the median ``k*`` of these rows is ``middle`` (clamped to ``[1, K]``).

    A row has ``k* ≤ m`` exactly when ``min_{j ≤ m} ‖x − x̂_j‖² ≤ τ·V``, so ``τ`` is the median
    over rows of ``min_{j ≤ m} errors_j / V``, kept inside ``(0, 1)``.
    """
    if errors.ndim != 2 or errors.shape[1] < 1:
        raise ValueError(f"errors must be [B, K] with K >= 1, got shape {tuple(errors.shape)}")
    m = min(max(int(middle), 1), errors.shape[1])
    best = errors[:, :m].min(dim=-1).values.double()
    ratio = best / total_variance.reshape(-1).double().clamp(min=torch.finfo(torch.float64).tiny)
    tau = float(ratio.median())
    if not tau == tau:  # NaN
        raise ValueError("k* threshold: the prefix errors and the variance must be finite")
    return min(max(tau, 1e-12), 1.0 - 1e-9)


def shift_for_mean_k(
    c: torch.Tensor,
    c_lo: float,
    c_hi: float,
    k_min: int,
    k_max: int,
    steepness: float,
    target: float,
    n_iter: int = 40,
) -> float:
    """The shift ``δ`` of the label range ``[c_lo + δ, c_hi + δ]`` at which the mean ``k`` of the
    rows with raw complexities ``c`` is closest to ``target`` (bisection; the mean ``k`` falls
    as ``δ`` grows)."""
    span = max(c_hi - c_lo, 1e-12)
    c = c.detach().to(torch.float32).reshape(-1)

    def mean_k(delta: float) -> float:
        lo, hi = c_lo + delta, c_hi + delta
        return float(
            complexity_to_k(c.clamp(lo, hi), lo, hi, k_min, k_max, steepness).float().mean()
        )

    lo_d, hi_d = -span, span
    for _ in range(n_iter):
        mid = 0.5 * (lo_d + hi_d)
        if mean_k(mid) > target:
            lo_d = mid
        else:
            hi_d = mid
    return 0.5 * (lo_d + hi_d)
