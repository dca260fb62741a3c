"""Tests of the TopK family's shared training step, in every architecture and phase: a forward
hook on ``hook_sae_acts_post`` changes what the step decodes and trains on, and the loss keys are
SAELens's (``mse_loss``, ``auxiliary_reconstruction_loss``) plus the same named extras throughout.
"""

from __future__ import annotations

import pytest
import sae_lens  # noqa: F401  (first: the plugin registers before our modules import)
import torch
from sae_lens.saes.sae import TrainStepInput
from step_parity import train_step

from sae_adaptive_plugin.probe import ComplexityProbe
from sae_adaptive_plugin.saes.adaptivek import AdaptiveKTrainingSAE, AdaptiveKTrainingSAEConfig
from sae_adaptive_plugin.saes.hierarchical_topk import (
    HierarchicalTopKTrainingSAE,
    HierarchicalTopKTrainingSAEConfig,
)
from sae_adaptive_plugin.saes.softsae import SoftSAETrainingSAE, SoftSAETrainingSAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")

D_IN, D_SAE = 16, 48
HARD_PHASE_START = 8
#: (architecture, phase) -> the step at which that phase is trained.
PHASES = {
    ("adaptivek", "warmup"): 0,
    ("adaptivek", "adaptive"): 0,
    ("softsae", "soft"): 1,  # step 0 also calibrates the estimator, changing the SAE
    ("softsae", "hard"): HARD_PHASE_START + 1,
    ("hierarchical_topk", "all_prefixes"): 0,
}


def _sae(architecture: str, phase: str, dead_latents: bool = False):
    torch.manual_seed(0)
    if architecture == "adaptivek":
        cfg = AdaptiveKTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=6, k_min=2, k_max=12, probe_warmup_steps=1000
        )
        sae = AdaptiveKTrainingSAE(cfg)
        if phase == "adaptive":  # after the warm-up switch: a fitted probe sets each row's k
            sae.set_probe(ComplexityProbe(torch.randn(D_IN), 0.3, -2.0, 2.0))
    elif architecture == "softsae":
        cfg = SoftSAETrainingSAEConfig(
            d_in=D_IN,
            d_sae=D_SAE,
            k=4,
            k_estimator_hidden=12,
            alpha_anneal_steps=6,
            k_anneal_steps=2,
            hard_topk_start_step=HARD_PHASE_START,
        )
        sae = SoftSAETrainingSAE(cfg)
    else:
        cfg = HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6)
        sae = HierarchicalTopKTrainingSAE(cfg)
    with torch.no_grad():  # non-trivial biases and decoder norms
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.2)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    return sae


def _train_step(sae, architecture: str, phase: str, x: torch.Tensor):
    dead = torch.arange(D_SAE) % 3 == 0  # some dead latents: AuxK is non-zero
    return sae.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients={},
            dead_neuron_mask=dead,
            n_training_steps=PHASES[(architecture, phase)],
            is_logging_step=False,
        )
    )


def _halve(_module, _inputs, acts):
    return acts * 0.5


@pytest.mark.parametrize(("architecture", "phase"), list(PHASES))
def test_hook_on_acts_post_changes_what_the_step_decodes_and_trains_on(architecture, phase):
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(1))
    sae = _sae(architecture, phase)
    plain = _train_step(sae, architecture, phase, x)
    handle = sae.hook_sae_acts_post.register_forward_hook(_halve)
    try:
        hooked = _train_step(sae, architecture, phase, x)
    finally:
        handle.remove()
    # decoding is linear in the code: halving the code halves the reconstruction around b_dec
    b_dec = sae.b_dec.detach()
    torch.testing.assert_close(
        hooked.sae_out.detach() - b_dec, 0.5 * (plain.sae_out.detach() - b_dec)
    )
    assert not torch.isclose(hooked.losses["mse_loss"], plain.losses["mse_loss"])
    for name, value in plain.losses.items():  # the extras that read the code read the hooked one
        if name.startswith("prefix_") and value.item() != 0:
            assert not torch.isclose(hooked.losses[name], value), name
    hooked.loss.backward()  # the hooked step trains


@pytest.mark.parametrize("architecture", ["adaptivek", "softsae", "hierarchical_topk"])
def test_loss_keys_are_the_same_in_every_phase_and_sum_to_the_loss(architecture):
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(2))
    keys = set()
    for arch, phase in PHASES:
        if arch != architecture:
            continue
        out = _train_step(_sae(arch, phase), arch, phase, x)
        assert {"mse_loss", "auxiliary_reconstruction_loss"} <= set(out.losses), phase
        assert out.losses["auxiliary_reconstruction_loss"].item() > 0, phase
        torch.testing.assert_close(out.loss, sum(out.losses.values()))
        keys.add(frozenset(out.losses))
    assert len(keys) == 1, keys


@pytest.mark.parametrize("architecture", ["adaptivek", "softsae", "hierarchical_topk"])
def test_decoder_unit_norm_keeps_rows_unit_and_moves_them_along_the_sphere(architecture):
    from sae_lens import SAE

    phase = {"adaptivek": "adaptive", "softsae": "hard", "hierarchical_topk": "all_prefixes"}
    sae = _sae(architecture, phase[architecture])
    sae.cfg.decoder_unit_norm = True
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))  # _sae rescaled them
    out = _train_step(sae, architecture, phase[architecture], x)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
    out.loss.backward()
    w = sae.W_dec.detach()
    assert sae.W_dec.grad.abs().sum() > 0
    torch.testing.assert_close((sae.W_dec.grad * w).sum(-1), torch.zeros(D_SAE), atol=1e-6, rtol=0)
    # the field is training-only: the inference SAE builds from the saved config
    infer = SAE.from_dict(sae.cfg.get_inference_sae_cfg_dict())
    assert not hasattr(infer.cfg, "decoder_unit_norm")


def test_decoder_unit_norm_is_off_by_default():
    sae = _sae("hierarchical_topk", "all_prefixes")
    norms = sae.W_dec.norm(dim=-1).clone()
    _train_step(sae, "hierarchical_topk", "all_prefixes", torch.randn(8, D_IN))
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), norms)


def test_decoder_unit_norm_hooks_a_deep_copy_too():
    import copy

    sae = copy.deepcopy(_sae("hierarchical_topk", "all_prefixes"))
    sae.cfg.decoder_unit_norm = True
    out = _train_step(sae, "hierarchical_topk", "all_prefixes", torch.randn(16, D_IN))
    out.loss.backward()
    parallel = (sae.W_dec.grad * sae.W_dec.detach()).sum(-1)
    torch.testing.assert_close(parallel, torch.zeros(D_SAE), atol=1e-6, rtol=0)


@pytest.mark.parametrize("architecture", ["adaptivek", "softsae", "hierarchical_topk"])
def test_b_dec_init_mean_starts_the_decoder_bias_at_the_first_batch_mean(architecture):
    from sae_lens import SAE

    sae = _sae(architecture, "warmup" if architecture == "adaptivek" else "soft")
    sae.cfg.b_dec_init_method = "mean"
    with torch.no_grad():
        sae.b_dec.zero_()  # a fresh SAE's start
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(3)) + 5
    train_step(sae, x)
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(0))
    train_step(sae, x + 100, step=1)  # later steps leave it to the optimiser
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(0))
    infer = SAE.from_dict(sae.cfg.get_inference_sae_cfg_dict())
    assert not hasattr(infer.cfg, "b_dec_init_method")  # training-only


def test_b_dec_init_mean_keeps_a_trained_bias_and_zeros_keeps_zeros():
    x = torch.randn(16, D_IN) + 5
    trained = _sae("hierarchical_topk", "all_prefixes")  # b_dec drawn non-zero, as if loaded
    trained.cfg.b_dec_init_method = "mean"
    before = trained.b_dec.detach().clone()
    train_step(trained, x)
    torch.testing.assert_close(trained.b_dec.detach(), before)
    fresh = _sae("hierarchical_topk", "all_prefixes")  # the default: SAELens's zeros
    with torch.no_grad():
        fresh.b_dec.zero_()
    train_step(fresh, x)
    assert not fresh.b_dec.any()


def test_b_dec_init_mean_refuses_a_non_finite_first_batch():
    sae = _sae("hierarchical_topk", "all_prefixes")
    sae.cfg.b_dec_init_method = "mean"
    with torch.no_grad():
        sae.b_dec.zero_()
    x = torch.randn(8, D_IN)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"b_dec_init_method='mean'.*non-finite"):
        train_step(sae, x)
    assert not sae.b_dec.isnan().any()


@pytest.mark.parametrize(
    "config_class",
    [HierarchicalTopKTrainingSAEConfig, AdaptiveKTrainingSAEConfig, SoftSAETrainingSAEConfig],
)
def test_b_dec_init_method_is_checked(config_class):
    if config_class is SoftSAETrainingSAEConfig:  # measured to break SoftSAE's k-estimator
        with pytest.warns(UserWarning, match="softsae: b_dec_init_method='mean'"):
            config_class(d_in=D_IN, d_sae=D_SAE, k=4, b_dec_init_method="mean")
    with pytest.raises(ValueError, match=r"b_dec_init_method must be one of \('zeros', 'mean'\)"):
        config_class(d_in=D_IN, d_sae=D_SAE, k=4, b_dec_init_method="median")


def test_b_dec_starts_at_the_mean_by_default_for_adaptivek_only():
    """The measured defaults (docs/compare.md, 'Starting b_dec at the data mean'): a fresh
    AdaptiveK's first step moves b_dec to the batch mean; HierarchicalTopK's and SoftSAE's stay
    at SAELens's zeros."""
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(4)) + 2
    for moves in (True, False):  # AdaptiveK, then HierarchicalTopK
        torch.manual_seed(0)
        if moves:
            config = AdaptiveKTrainingSAEConfig(
                d_in=D_IN, d_sae=D_SAE, k=6, probe_warmup_steps=1000
            )
            sae = AdaptiveKTrainingSAE(config)
        else:
            sae = HierarchicalTopKTrainingSAE(
                HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6)
            )
        assert not sae.b_dec.any()
        train_step(sae, x)
        if moves:
            torch.testing.assert_close(sae.b_dec.detach(), x.mean(0))
        else:
            assert not sae.b_dec.any()
    assert SoftSAETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4).b_dec_init_method == "zeros"


@pytest.mark.parametrize(("dtype", "autocast"), [("bfloat16", False), ("float32", True)])
def test_b_dec_mean_start_in_bf16_and_under_autocast_with_dead_latents(dtype, autocast):
    """AdaptiveK's default mean start with a bf16 SAE or under CPU bf16 autocast, AuxK on: b_dec
    is the batch mean in the SAE's dtype (the mean taken in float32) and the step is finite."""
    torch.manual_seed(0)
    config = AdaptiveKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=4, probe_warmup_steps=1000, dtype=dtype
    )
    sae = AdaptiveKTrainingSAE(config)
    x = (torch.randn(32, D_IN, generator=torch.Generator().manual_seed(5)) + 3).to(sae.dtype)
    dead = torch.arange(D_SAE) % 3 == 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = train_step(sae, x, 0, dead)
    out.loss.backward()
    assert sae.b_dec.dtype == sae.dtype
    torch.testing.assert_close(sae.b_dec.detach(), x.float().mean(0).to(sae.dtype))
    assert out.losses["auxiliary_reconstruction_loss"].item() > 0
    assert torch.isfinite(out.loss) and all(
        torch.isfinite(p.grad).all() for p in sae.parameters() if p.grad is not None
    )
