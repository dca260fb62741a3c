"""Peers of the bench that are not SAELens SAEs: EleutherAI sparsify's TopK ``SparseCoder``.

:class:`SparsifyPeer` gives a ``SparseCoder`` the two methods the bench calls on a training SAE
(``training_forward_pass`` and ``get_coefficients``) and runs sparsify's own training step: its loss
``fvu + auxk_loss + multi_topk_fvu / 8`` (AuxK with weight 1, as SAELens's), the gradient component
parallel to each decoder row removed before the optimizer step, and decoder rows set back to unit
norm after it. sparsify is optional: ``make bench-peers`` installs it beside torch's pin.
"""

from __future__ import annotations

import contextlib
import io
from importlib import util
from typing import Any, NamedTuple

import torch

#: The distribution to install for the peer row (imported as ``sparsify``).
SPARSIFY_PACKAGE = "eai-sparsify"


def sparsify_available() -> bool:
    """Whether ``sparsify`` can be imported here."""
    return util.find_spec("sparsify") is not None


class PeerStepOutput(NamedTuple):
    """What the bench reads of a peer's step."""

    loss: torch.Tensor
    sae_out: torch.Tensor


class SparsifyEncoding(NamedTuple):
    top_acts: torch.Tensor
    top_indices: torch.Tensor


class SparsifyPeer(torch.nn.Module):
    """sparsify's ``SparseCoder`` (``k``, ``num_latents = d_sae``, unit-norm decoder) with its
    training step, shaped like a SAELens training SAE for the bench."""

    def __init__(self, d_in: int, d_sae: int, k: int, dtype: torch.dtype, device: str):
        super().__init__()
        with contextlib.redirect_stdout(io.StringIO()):  # its "Triton not installed" notice
            from sparsify import SparseCoder, SparseCoderConfig

        cfg = SparseCoderConfig(k=k, num_latents=d_sae, normalize_decoder=True)
        self.coder = SparseCoder(d_in, cfg, device=device, dtype=dtype)
        self.W_enc = self.coder.encoder.weight  # [d_sae, d_in] (sparsify's layout)
        self.coder.W_dec.register_hook(self._without_parallel_component)

    def _without_parallel_component(self, grad: torch.Tensor) -> torch.Tensor:
        """sparsify's ``remove_gradient_parallel_to_decoder_directions``, as a gradient hook."""
        w = self.coder.W_dec.detach()
        return grad - (grad * w).sum(-1, keepdim=True) * w

    def get_coefficients(self) -> dict[str, float]:
        return {}

    def training_forward_pass(self, step_input: Any) -> PeerStepOutput:
        out = self.coder(step_input.sae_in, dead_mask=step_input.dead_neuron_mask)
        loss = out.fvu + out.auxk_loss + out.multi_topk_fvu / 8
        return PeerStepOutput(loss=loss, sae_out=out.sae_out)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Set the decoder rows back to unit norm after every step of ``optimizer``."""
        optimizer.register_step_post_hook(lambda *_: self.coder.set_decoder_norm_to_unit_norm())

    # inference: decode(encode(x)) as the bench times it
    def encode(self, x: torch.Tensor) -> SparsifyEncoding:
        top_acts, top_indices, _ = self.coder.encode(x)
        return SparsifyEncoding(top_acts, top_indices)

    def decode(self, encoding: SparsifyEncoding) -> torch.Tensor:
        return self.coder.decode(encoding.top_acts, encoding.top_indices)
