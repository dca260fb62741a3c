"""Folding an input transform into an extra linear reader of the SAE input (pure tensor op).

SAELens folds activation whitening into ``W_enc``/``b_enc``/``W_dec``/``b_dec``; architectures that
read the input with a second linear map (AdaptiveK's probe, SoftSAE's k-estimator) must fold the
same transform into it, which :func:`fold_whitening_into_reader` does.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def fold_whitening_into_reader(
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    whitening_matrix: torch.Tensor,
    *,
    shift_bias: bool = True,
) -> None:
    """In place: a reader ``z @ weight + bias`` of whitened input ``z = (x − mean) @ M`` becomes a
    reader of the raw ``x``: ``weight ← M @ weight`` and, if ``shift_bias``,
    ``bias ← bias − mean @ (M @ weight)``.

    ``weight`` is ``[d_in]`` or ``[d_in, h]`` (``bias`` a scalar or ``[h]``). Pass
    ``shift_bias=False`` when the mean is already removed upstream (SAELens's folded ``b_dec`` does
    it for readers of ``x − b_dec`` with ``apply_b_dec_to_input``). Computed in at least float32.
    """
    dtype = torch.promote_types(
        torch.promote_types(weight.dtype, whitening_matrix.dtype), torch.float32
    )
    device = weight.device
    new_weight = whitening_matrix.to(device, dtype) @ weight.to(dtype)
    weight.copy_(new_weight.to(weight.dtype))
    if shift_bias:
        new_bias = bias.to(dtype) - mean.to(device, dtype) @ new_weight
        bias.copy_(new_bias.to(bias.dtype))
