"""preacts_at: the pre-activations at chosen latents, with a gradient through those slots only."""

from __future__ import annotations

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput
from step_parity import loss_and_grads

from sae_adaptive_plugin.ops.preacts_at import preacts_at, preacts_at_reference, preacts_on_columns
from sae_adaptive_plugin.saes.hierarchical_topk import (
    HierarchicalTopKTrainingSAE,
    HierarchicalTopKTrainingSAEConfig,
)


def _inputs(scale: bool, zero_scale: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(5, 16, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64, generator=g, requires_grad=True)
    s = None
    if scale:
        s = torch.rand(16, dtype=torch.float64, generator=g) + 0.5
        if zero_scale:
            s[3] = 0.0
        s.requires_grad_(True)
    idx = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(7)])
    idx[:, 0] = 3  # every row uses latent 3 (the zero-scale one when zero_scale)
    return x, W, b, s, idx


@pytest.mark.parametrize("scale", [False, True])
def test_values_and_gradients_equal_the_dense_reference_float64(scale):
    x, W, b, s, idx = _inputs(scale)
    ref = preacts_at_reference(x, W, b, idx, s)
    out = preacts_at(x, W, b, idx, ref.detach(), s)
    torch.testing.assert_close(out, ref)
    weights = torch.randn_like(ref)
    params = [t for t in (x, W, b, s) if t is not None]
    g_ref = torch.autograd.grad((ref * weights).sum(), params)
    g_out = torch.autograd.grad((out * weights).sum(), params)
    for a, r in zip(g_out, g_ref):
        torch.testing.assert_close(a, r)


def test_gradcheck_with_scale():
    x, W, b, s, idx = _inputs(True)

    def f(x, W, b, s):
        return preacts_at(x, W, b, idx, preacts_at_reference(x, W, b, idx, s).detach(), s)

    assert torch.autograd.gradcheck(f, (x, W, b, s))


def test_a_zero_scale_slot_gets_gradient_in_everything_but_its_scale():
    x, W, b, s, idx = _inputs(True, zero_scale=True)
    ref = preacts_at_reference(x, W, b, idx, s)
    out = preacts_at(x, W, b, idx, ref.detach(), s)
    g_ref = torch.autograd.grad(ref.sum(), (x, W, b, s))
    g_out = torch.autograd.grad(out.sum(), (x, W, b, s))
    for a, r in zip(g_out[:3], g_ref[:3]):
        torch.testing.assert_close(a, r)
    assert g_out[3][3] == 0  # the decoder norm's own gradient at a zero row is zero anyway
    torch.testing.assert_close(g_out[3][torch.arange(16) != 3], g_ref[3][torch.arange(16) != 3])


def test_preacts_on_columns_gradcheck_with_scale():
    x, W, b, s, _ = _inputs(True)
    columns = torch.tensor([3, 0, 9, 15])

    def f(x, W, b, s):
        values = ((x @ W + b) * s)[:, columns]
        return preacts_on_columns(x, W, b, columns, values.detach(), s)

    assert torch.autograd.gradcheck(f, (x, W, b, s))
    with pytest.raises(ValueError, match=r"columns \[m\] and values \[N, m\]"):
        preacts_on_columns(x, W, b, columns, torch.zeros(7, 3, dtype=torch.float64))


def test_shapes_are_checked():
    x, W, b, _, idx = _inputs(False)
    with pytest.raises(ValueError, match=r"indices/values \[N, m\]"):
        preacts_at(x, W, b, idx, torch.zeros(7, 3, dtype=torch.float64))


@pytest.mark.parametrize("rescale", [True, False])
def test_auxk_with_dead_latents_leaves_hidden_pre_without_gradient(rescale):
    """With dead latents the step's loss does not reach the dense ``hidden_pre``: the fused
    encoder's backward stays on its sparse path (SAELens's AuxK reads ``hidden_pre`` densely)."""
    cfg = HierarchicalTopKTrainingSAEConfig(
        d_in=8, d_sae=32, k=4, rescale_acts_by_decoder_norm=rescale
    )
    sae = HierarchicalTopKTrainingSAE(cfg)
    out = sae.training_forward_pass(
        TrainStepInput(
            sae_in=torch.randn(16, 8),
            coefficients={},
            dead_neuron_mask=torch.arange(32) % 2 == 0,
            n_training_steps=0,
            is_logging_step=False,
        )
    )
    assert out.losses["auxiliary_reconstruction_loss"] > 0
    (grad,) = torch.autograd.grad(out.loss, out.hidden_pre, allow_unused=True)
    assert grad is None
    out.loss.backward()
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("dense_ratio", [0, 8])
@pytest.mark.parametrize("n_dead", [0, 3, 20])
def test_auxk_without_host_reads_equals_the_cpu_path(n_dead, dense_ratio, rescale, monkeypatch):
    """The GPU path (the k_aux largest over all latents, dead ones kept, no count read back)
    gives the CPU path's loss and gradients, with fewer dead latents than k_aux too, whether the
    CPU path decodes with bags of the chosen latents (ratio 0) or matmuls over the dead ones."""
    from sae_adaptive_plugin.saes import topk_family

    monkeypatch.setattr(topk_family, "AUXK_DENSE_RATIO", dense_ratio)
    torch.manual_seed(0)
    cfg = HierarchicalTopKTrainingSAEConfig(
        d_in=16, d_sae=32, k=4, dtype="float64", rescale_acts_by_decoder_norm=rescale
    )
    sae = HierarchicalTopKTrainingSAE(cfg)
    x = torch.randn(12, 16, dtype=torch.float64)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[torch.randperm(32)[:n_dead]] = True
    results = []
    for free in (True, False):
        monkeypatch.setattr(topk_family, "host_check_is_free", lambda _t, free=free: free)
        out, grads = loss_and_grads(sae, x, 0, dead)
        results.append((out.losses["auxiliary_reconstruction_loss"].detach(), grads))
    (loss_cpu, g_cpu), (loss_gpu, g_gpu) = results
    assert (loss_cpu > 0) == (n_dead > 0)
    torch.testing.assert_close(loss_gpu, loss_cpu)
    for name in g_cpu:
        torch.testing.assert_close(g_gpu[name], g_cpu[name], msg=name)


def test_auxk_with_hook_z_reshaping_equals_saelens():
    """With hook_z reshaping SAELens's k_aux is half the input's last dimension (d_head)."""
    torch.manual_seed(0)
    cfg = HierarchicalTopKTrainingSAEConfig(d_in=16, d_sae=64, k=4, dtype="float64")
    sae = HierarchicalTopKTrainingSAE(cfg)
    sae.turn_on_forward_pass_hook_z_reshaping()
    x = torch.randn(12, 4, 4, dtype=torch.float64)
    dead = torch.arange(64) % 3 == 0
    losses = []
    for fused in (True, False):
        sae.fused_encode = fused
        out, _ = loss_and_grads(sae, x, 0, dead)
        losses.append(out.losses["auxiliary_reconstruction_loss"].detach())
    torch.testing.assert_close(losses[0], losses[1])
