"""SoftSAE's restarts of rarely firing latents (``resample_below``): the schedule, which latents
restart, the counts in checkpoints, precision and refusals (the default against none on the
compare's source: tests/test_switch_resample.py)."""

from __future__ import annotations

import math

import pytest
import sae_lens  # noqa: F401  (first: the plugin registers before our modules import)
import torch
from sae_lens.saes.sae import TrainStepInput
from safetensors.torch import load_file
from step_parity import train_step

from sae_adaptive_plugin.saes.softsae import RESAMPLE_FIRES_KEY, SoftSAETrainingSAE
from sae_adaptive_plugin.saes.softsae_config import SoftSAETrainingSAEConfig


def _cfg(**kw):
    return SoftSAETrainingSAEConfig(d_in=16, d_sae=48, k=4, **kw)


def _sae(total_steps=20, **kw):
    """Hard phase at step 8, restarts at 8 and 12 (counting from step 4)."""
    kw.setdefault("hard_topk_start_step", 8)
    kw.setdefault("resample_interval_steps", 4)
    kw.setdefault("resample_rounds", 2)
    kw.setdefault("alpha_anneal_steps", 6)
    kw.setdefault("k_anneal_steps", 1)
    torch.manual_seed(0)
    sae = SoftSAETrainingSAE(_cfg(**kw))
    sae.bind_run_length(total_steps)
    return sae


def _batches(n=16):
    """Rows along a few directions, so latents fire unevenly."""
    torch.manual_seed(1)
    directions = torch.randn(6, 16)
    return [
        torch.randn(64, 6).relu().pow(2) @ directions + 0.05 * torch.randn(64, 16) for _ in range(n)
    ]


def _train(sae, batches, steps, start=0):
    for step in range(start, steps):
        train_step(sae, batches[step], step)


def test_default_restarts_follow_the_run_length():
    cfg = _cfg()
    assert cfg.resample_below == 0.1
    long = cfg.schedule(1000)
    assert long.resample_steps == (250, 375, 500, 625)
    assert long.resample_interval_steps == 125
    assert [long.counts_fires_at(s) for s in (124, 125, 624, 625)] == [False, True, True, False]
    short = cfg.schedule(333)
    assert short.resample_steps == (83, 125, 167, 209)
    assert _cfg(resample_below=0).schedule(1000).resample_steps == ()
    # a late hard phase leaves no room for a default restart: none, and no error
    assert _cfg(hard_topk_start_step=900).schedule(1000).resample_steps == ()
    # the run length unknown and no interval set: no restarts
    assert (
        _cfg(hard_topk_start_step=5, alpha_anneal_steps=2, k_anneal_steps=1)
        .schedule(None)
        .resample_steps
        == ()
    )


def test_restarts_that_do_not_fit_are_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"resample_rounds=2 .* resample_rounds in \[1, 1\]"):
        _cfg(hard_topk_start_step=800, resample_rounds=2).schedule(1000)
    assert _cfg(hard_topk_start_step=800, resample_rounds=1).schedule(1000).resample_steps == (800,)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), True, "0.1"])
def test_resample_below_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match=r"resample_below must be a number in \[0, 1\]"):
        _cfg(resample_below=value)


@pytest.mark.parametrize("field", ["resample_rounds", "resample_interval_steps"])
def test_resample_counts_below_one_are_refused(field):
    with pytest.raises(ValueError, match=field):
        _cfg(**{field: 0})


@pytest.mark.parametrize("below", [0.5, 1.0])
def test_a_restart_moves_exactly_the_latents_counted_below_the_share(below):
    batches = _batches()
    sae = _sae(resample_below=below)
    _train(sae, batches, 8)
    fires = sae._fires.clone()  # steps 4-7 (soft phase, m > 1/2)
    assert fires.sum() > 0
    chosen = fires < below * fires.mean()
    assert chosen.any() and not chosen.all()
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    kept_dec = before["W_dec"][~chosen].norm(dim=-1).mean()
    step_input = TrainStepInput(
        sae_in=batches[8],
        coefficients={},
        dead_neuron_mask=None,
        n_training_steps=8,
        is_logging_step=False,
    )
    sae.prepare_training_step(step_input)
    assert sae.cfg.metadata.softsae_resampled_latents == [int(chosen.sum())]
    assert sae._fires is None  # counting starts again
    assert torch.equal(sae.W_dec[~chosen], before["W_dec"][~chosen])
    assert torch.equal(sae.W_enc[:, ~chosen], before["W_enc"][:, ~chosen])
    assert not torch.equal(sae.W_dec[chosen], before["W_dec"][chosen])
    torch.testing.assert_close(
        sae.W_dec[chosen].norm(dim=-1), kept_dec.expand(int(chosen.sum())), rtol=1e-5, atol=1e-6
    )
    assert (sae.b_enc[chosen] == 0).all()
    for name in ("k_est_W_enc", "k_est_b_enc", "k_est_w_out", "k_est_b_out", "b_dec"):
        assert torch.equal(getattr(sae, name), before[name]), name


def test_both_rounds_restart_and_the_trained_sae_is_finite():
    batches = _batches()
    sae = _sae(resample_below=1.0)
    _train(sae, batches, 16)
    restarted = sae.cfg.metadata.softsae_resampled_latents
    assert len(restarted) == 2 and all(n > 0 for n in restarted)
    assert sae._fires is None  # no counting after the last restart
    for p in sae.parameters():
        assert torch.isfinite(p).all()


def test_resample_below_zero_counts_nothing_and_restarts_nothing():
    """Steps without an optimizer change weights only by restarts: off leaves them, on not."""
    batches = _batches()
    off, on = _sae(resample_below=0.0), _sae(resample_below=1.0)
    start = off.W_dec.detach().clone()
    assert torch.equal(start, on.W_dec)
    _train(off, batches, 14)
    _train(on, batches, 14)
    assert off._fires is None
    assert getattr(off.cfg.metadata, "softsae_resampled_latents", None) is None
    assert torch.equal(off.W_dec, start)
    assert not torch.equal(on.W_dec, start)


def test_counts_survive_a_checkpoint_and_the_resumed_restart_matches(tmp_path):
    batches = _batches()
    sae = _sae(resample_below=0.5)
    _train(sae, batches, 6)  # counting since step 4
    sae.save_model(tmp_path / "mid")
    mid = load_file(str(tmp_path / "mid" / "sae_weights.safetensors"))
    assert torch.equal(mid[RESAMPLE_FIRES_KEY], sae._fires)
    resumed = SoftSAETrainingSAE(sae.cfg)
    resumed.bind_run_length(20)
    resumed.load_weights_from_checkpoint(tmp_path / "mid")
    assert torch.equal(resumed._fires, sae._fires)
    _train(sae, batches, 10, start=6)  # the restart at step 8
    _train(resumed, batches, 10, start=6)
    assert torch.equal(sae.W_dec, resumed.W_dec) and torch.equal(sae.W_enc, resumed.W_enc)
    _train(sae, batches, 11, start=10)  # counting again
    sae.save_inference_model(tmp_path / "inference")
    saved = load_file(str(tmp_path / "inference" / "sae_weights.safetensors"))
    assert RESAMPLE_FIRES_KEY not in saved


@pytest.mark.parametrize(("dtype", "autocast"), [("bfloat16", False), ("float32", True)])
def test_restarts_in_bf16_and_under_autocast_with_dead_latents(dtype, autocast):
    batches = _batches()
    sae = _sae(resample_below=1.0, dtype=dtype)
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    dead[::3] = True  # AuxK on
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for step in range(14):
            out = train_step(sae, batches[step].to(sae.W_dec.dtype), step, dead)
    assert len(sae.cfg.metadata.softsae_resampled_latents) == 2
    assert min(sae.cfg.metadata.softsae_resampled_latents) > 0
    assert sae.W_dec.dtype == getattr(torch, dtype)
    for p in sae.parameters():
        assert torch.isfinite(p).all()
    assert math.isfinite(float(out.loss)) and out.losses["auxiliary_reconstruction_loss"] > 0
