"""SAELens's ``TopK`` activation with a k per row: the ``activation_fn`` of AdaptiveK and SoftSAE.

Tools branch on ``isinstance(sae.activation_fn, TopK)``: sae-dashboard then encodes all latents
with ``sae.encode`` (a subset of latents has no well-defined top-k) and otherwise raises
``Invalid architecture`` for an architecture it does not know. Being a ``TopK`` puts these SAEs
on that path. ``k`` (the ``TopK`` attribute) is ``k_max``, the most latents any row keeps.

Each row's k is a function of the SAE's input (the probe or the k-estimator read it), not of the
pre-activations, so ``forward`` takes it: ``sae.activation_fn(hidden_pre, sae.k_per_sample(x))``
equals ``sae.encode(x)``, with ``hidden_pre`` the pre-activations ``encode`` selects from (after
the decoder-norm rescale when ``rescale_acts_by_decoder_norm``).
"""

from __future__ import annotations

import torch
from sae_lens.saes.topk_sae import TopK

from sae_adaptive_plugin.ops.variable_topk import check_k, scatter_topk, variable_topk


class PerRowTopK(TopK):
    """Keeps the top ``k[row]`` pre-activations of each row (ReLU'd), ``k[row] <= k_max``."""

    def __init__(self, k_max: int):
        super().__init__(k_max, use_sparse_activations=False)

    def forward(self, x: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        if k is None:
            raise TypeError(
                "PerRowTopK needs each row's k (it follows the SAE's input, not the "
                "pre-activations): call sae.encode(x), or "
                "sae.activation_fn(hidden_pre, sae.k_per_sample(x))"
            )
        if k.numel() and int(k.max()) > self.k:
            raise ValueError(f"k must be <= k_max={self.k} for every row, got {int(k.max())}")
        check_k(k, x.shape[-1])
        return scatter_topk(variable_topk(x, k.long(), self.k), x.shape[-1])

    def extra_repr(self) -> str:
        return f"k_max={self.k}"
