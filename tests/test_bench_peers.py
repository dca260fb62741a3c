"""The bench's sparsify peer runs sparsify's own training step."""

from __future__ import annotations

import torch
from sae_lens.saes.sae import TrainStepInput

from sae_adaptive_plugin.experiments.bench_peers import SparsifyPeer, sparsify_available


def _step_input(x, dead):
    return TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
    )


def test_sparsify_is_installed_by_the_makefile():
    assert sparsify_available()


def test_peer_step_keeps_unit_decoder_rows_and_removes_the_parallel_gradient():
    torch.manual_seed(0)
    peer = SparsifyPeer(d_in=8, d_sae=32, k=4, dtype=torch.float32, device="cpu")
    optimizer = torch.optim.Adam(peer.parameters(), lr=1e-2)
    peer.attach_optimizer(optimizer)
    x = torch.randn(16, 8)
    dead = torch.arange(32) % 4 == 0
    out = peer.training_forward_pass(_step_input(x, dead))
    raw = peer.coder(x, dead_mask=dead)
    assert out.loss.item() > raw.fvu.item()  # the AuxK term is in the loss
    torch.testing.assert_close(out.loss, raw.fvu + raw.auxk_loss + raw.multi_topk_fvu / 8)
    out.loss.backward()
    w = peer.coder.W_dec.detach()
    parallel = (peer.coder.W_dec.grad * w).sum(-1)
    torch.testing.assert_close(parallel, torch.zeros(32), atol=1e-6, rtol=0)
    optimizer.step()
    torch.testing.assert_close(peer.coder.W_dec.norm(dim=-1), torch.ones(32))
    recon = peer.decode(peer.encode(x))
    assert recon.shape == x.shape and torch.isfinite(recon).all()
