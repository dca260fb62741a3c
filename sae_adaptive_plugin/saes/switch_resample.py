"""Restarting rarely used latents along the batch's residuals (``resample_below``).

AdaptiveK, at the switch: during the warm-up every row keeps ``k_max`` latents; after the
switch a row keeps ``k(x)``, about its label ``k*``. A latent that the warm-up trained only in
the slots past its rows' ``k*`` is left with (almost) nothing to do after the switch, yet it
fires often enough on the tails of the densest rows that SAELens's dead-feature window never
hands it to AuxK. Over the labelled half of the warm-up each latent's firings inside its rows'
first ``k*`` slots are counted (:func:`fires_within_labels`); at the switch every latent counted
less than ``resample_below`` times the mean latent's count is started again.

SoftSAE, at the start of its hard phase and a few times after it: the latents counted (rows
fired on, :func:`fires_in_selection`) less than ``resample_below`` times the mean since the
previous restart start again; each restart draws rows by their residual relative to the row
(``relative``).

A restart (:func:`resample_rarely_used`) works on one batch's residuals after the SAE's encode,
at most one latent per row of the batch, the lowest counts first: a restarted latent's decoder
row is the unit residual of a row drawn without replacement with probability ∝ its squared
residual (or, ``relative``, its squared residual over its squared centred input), scaled to the
kept latents' mean decoder norm; its encoder column is the same direction at the kept latents'
mean encoder norm; its encoder bias is 0. Under data parallelism the counts are summed over the
ranks at every counted step and the rows drawn from the global batch with a generator seeded by
the step, so every rank resamples alike. The optimizer's moments of the restarted entries are
left as they are (the SAE does not hold SAELens's optimizer). Measured in docs/compare.md.
"""

from __future__ import annotations

from typing import Any

import torch

from sae_adaptive_plugin.ops.variable_topk import TopKResult, decode_topk


@torch.no_grad()
def fires_within_labels(selection: TopKResult, labels: torch.Tensor, d_sae: int) -> torch.Tensor:
    """How many rows each latent fired on inside the row's first ``labels`` slots: float32
    ``[d_sae]`` from a sorted ``selection`` (``[..., width]``) and labels ``[rows]`` of the same
    rows. No host read."""
    width = selection.values.shape[-1]
    indices = selection.indices.reshape(-1, width)
    slots = torch.arange(width, device=indices.device)
    inside = slots < labels.to(indices.device)[:, None]
    rows = TopKResult(selection.values.reshape(-1, width), indices, inside)
    return fires_in_selection(rows, d_sae)


@torch.no_grad()
def fires_in_selection(selection: TopKResult, d_sae: int) -> torch.Tensor:
    """How many rows each latent fired on in ``selection`` (slots inside each row's mask with a
    positive value): float32 ``[d_sae]``. No host read."""
    fired = (selection.values.detach() > 0) & selection.mask
    counts = torch.zeros(d_sae, dtype=torch.float32, device=selection.indices.device)
    return counts.index_add_(0, selection.indices.reshape(-1), fired.reshape(-1).float())


def latents_to_resample(
    fires: torch.Tensor, below: float, at_most: int | None = None
) -> torch.Tensor:
    """Ids (long, ascending) of the latents whose count is below ``below`` × the mean count,
    at most ``at_most`` of them (those with the lowest counts, the lower id first on a tie);
    none when ``below`` is 0 or every count is 0 (one host read)."""
    if below <= 0.0:
        return torch.zeros(0, dtype=torch.long, device=fires.device)
    ids = (fires < below * fires.mean()).nonzero().squeeze(-1)
    if at_most is not None and ids.numel() > at_most:
        order = torch.argsort(fires[ids], stable=True)  # ids ascending: ties keep the lower id
        ids = ids[order[:at_most]].sort().values
    return ids


def draw_weights(residual: torch.Tensor, centred: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's chance of being drawn, ∝ its squared residual, or with ``centred`` (the rows'
    centred inputs ``x − b_dec``) ∝ its squared residual over its squared centred input
    (float32, CPU); rows whose weight is 0 or not finite get 0; uniform when no row is left."""
    weight = residual.float().pow(2).sum(-1).cpu()
    if centred is not None:
        weight = weight / centred.float().pow(2).sum(-1).cpu()
    weight = torch.where(torch.isfinite(weight), weight, 0.0)
    if not bool(weight.sum() > 0):
        weight = torch.ones_like(weight)
    return weight


@torch.no_grad()
def residual_directions(
    residual: torch.Tensor, n: int, seed: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``n`` unit rows of ``residual`` ``[N, d]``, distinct rows drawn without replacement with
    chances ``weight`` (default: :func:`draw_weights` of ``residual``), by a CPU generator
    seeded with ``seed``. ``n`` must not exceed the rows that can be drawn."""
    if weight is None:
        weight = draw_weights(residual)
    drawable = int((weight > 0).sum())
    if n > drawable:
        raise ValueError(f"residual_directions: {n} directions asked from {drawable} rows")
    generator = torch.Generator().manual_seed(seed)
    rows = torch.multinomial(weight, n, replacement=False, generator=generator)
    picked = residual[rows.to(residual.device)].float()
    return picked / picked.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


@torch.no_grad()
def restart_latents(sae: Any, latents: torch.Tensor, directions: torch.Tensor) -> None:
    """Start ``latents`` of ``sae`` again along ``directions`` ``[len(latents), d_in]``: decoder
    rows at the other latents' mean decoder norm, encoder columns at their mean encoder norm,
    encoder bias 0."""
    kept = torch.ones(sae.cfg.d_sae, dtype=torch.bool, device=sae.W_dec.device)
    kept[latents] = False
    if not bool(kept.any()):
        kept[:] = True  # every latent restarts: keep the current scale
    dec_norm = sae.W_dec[kept].float().norm(dim=-1).mean()
    enc_norm = sae.W_enc[:, kept].float().norm(dim=0).mean()
    directions = directions.to(sae.W_dec.device)
    sae.W_dec.data[latents] = (directions * dec_norm).to(sae.W_dec.dtype)
    sae.W_enc.data[:, latents] = (directions * enc_norm).T.to(sae.W_enc.dtype)
    sae.b_enc.data[latents] = 0


@torch.no_grad()
def encode_residual(sae: Any, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x − x̂, x − b_dec)`` of ``batch``'s rows after ``sae``'s encode (its current rule for
    each row's k), in the SAE's (normalised) input space, each ``[N, d_in]``."""
    encoding = sae.encode_selection(batch)
    centred, coefficients, indices = sae._prefix_operands(encoding.x_in, encoding.selection)
    mask = encoding.selection.mask.reshape(indices.shape)
    return centred - decode_topk(coefficients, indices, sae.W_dec, mask=mask), centred


@torch.no_grad()
def resample_rarely_used(
    sae: Any,
    fires: torch.Tensor,
    below: float,
    batch: torch.Tensor,
    seed: int,
    relative: bool = False,
) -> int:
    """Restart the latents of ``sae`` whose count in ``fires`` (the same on every rank) is
    below ``below`` × the mean count, each along the residual of its own row of the global
    ``batch`` after the encode (:func:`residual_directions` with ``seed``; rows weighted by
    :func:`draw_weights`, relative to their centred input with ``relative``): at most one
    latent per row that can be drawn, the lowest counts first. Returns how many."""
    if below <= 0.0:
        return 0
    residual, centred = encode_residual(sae, batch)
    weight = draw_weights(residual, centred if relative else None)
    latents = latents_to_resample(fires, below, at_most=int((weight > 0).sum()))
    n = int(latents.numel())
    if n > 0:
        restart_latents(sae, latents, residual_directions(residual, n, seed, weight))
    return n
