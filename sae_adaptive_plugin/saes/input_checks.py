"""Input checks shared by the three architectures: the width of a row, and rows that are not finite.

- :func:`check_width`: the last dimension (after hook_z reshaping, where on) must be ``d_in``;
  otherwise a ``ValueError`` naming both (torch would broadcast a width-1 input silently).
- Non-finite rows: a row holding NaN/Inf encodes to NaN latents and decodes to a NaN output (as
  SAELens's ``topk`` does), never to a clean-looking ``b_dec``. ``k_per_sample`` reports such a row
  as :data:`K_NOT_FINITE` (−1), outside every architecture's range ``[1, k_max]``.
"""

from __future__ import annotations

import torch

#: ``k_per_sample`` of a row whose input holds NaN or Inf.
K_NOT_FINITE = -1


def check_width(sae: torch.nn.Module, x_in: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``x_in`` (already reshaped by ``reshape_fn_in``) has
    ``d_in`` columns."""
    cfg = sae.cfg  # type: ignore[attr-defined]
    if x_in.ndim >= 1 and x_in.shape[-1] == cfg.d_in:
        return
    hook_z = " after hook_z reshaping (n_heads × d_head)" if sae.hook_z_reshaping_mode else ""  # type: ignore[attr-defined]
    raise ValueError(
        f"{cfg.architecture()} SAE: input width {x_in.shape[-1] if x_in.ndim else '()'}"
        f"{hook_z} (input shape {tuple(x_in.shape)}) does not match the SAE's d_in={cfg.d_in}"
    )


def finite_rows(x_in: torch.Tensor) -> torch.Tensor:
    """Bool ``x_in.shape[:-1]``: whether every value of the row is finite."""
    return torch.isfinite(x_in).all(dim=-1)


def mark_not_finite(k: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
    """``k`` with the rows of non-finite ``x_in`` set to :data:`K_NOT_FINITE`."""
    return torch.where(finite_rows(x_in), k, torch.full_like(k, K_NOT_FINITE))


def nan_where_not_finite(values: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
    """``values [..., m]`` with every entry of a non-finite ``x_in`` row set to NaN."""
    bad = ~finite_rows(x_in)
    return values.masked_fill(bad.unsqueeze(-1), float("nan"))
