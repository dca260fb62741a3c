"""AdaptiveK's resampling at the switch (``resample_below``): the counting, the choice, the
restart, and the switch step of a training SAE."""

from __future__ import annotations

import warnings

import pytest
import sae_lens  # noqa: F401  (first: the plugin registers before our modules import)
import torch
from safetensors.torch import load_file
from step_parity import train_step

from sae_adaptive_plugin.experiments.synthetic import CompareConfig
from sae_adaptive_plugin.experiments.synthetic_compare import run_compare
from sae_adaptive_plugin.ops.variable_topk import TopKResult
from sae_adaptive_plugin.saes.adaptivek import (
    AdaptiveKTrainingSAE,
    AdaptiveKTrainingSAEConfig,
)
from sae_adaptive_plugin.saes.adaptivek_warmup import KSTAR_FIRES_KEY
from sae_adaptive_plugin.saes.switch_resample import (
    draw_weights,
    encode_residual,
    fires_in_selection,
    fires_within_labels,
    latents_to_resample,
    residual_directions,
    restart_latents,
)


def test_fires_within_labels_counts_positive_slots_inside_each_rows_label():
    values = torch.tensor([[3.0, 2.0, 1.0, 0.5], [4.0, 0.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    indices = torch.tensor([[5, 1, 2, 3], [1, 4, 2, 0], [0, 1, 2, 3]])
    labels = torch.tensor([2, 3, 0])
    selection = TopKResult(values, indices, torch.ones_like(values, dtype=torch.bool))
    counts = fires_within_labels(selection, labels, d_sae=6)
    expected = torch.zeros(6)
    for row in range(3):
        for slot in range(int(labels[row])):
            if values[row, slot] > 0:  # row 1's slot 1 is inside its label but did not fire
                expected[indices[row, slot]] += 1
    assert torch.equal(counts, expected)
    assert counts.tolist() == [0, 2, 1, 0, 0, 1]


def test_latents_to_resample_takes_those_below_the_share_of_the_mean():
    fires = torch.tensor([0.0, 9.0, 10.0, 21.0, 60.0])  # mean 20
    assert latents_to_resample(fires, 0.5).tolist() == [0, 1]
    assert latents_to_resample(fires, 0.1).tolist() == [0]
    assert latents_to_resample(fires, 0.0).numel() == 0
    assert latents_to_resample(torch.zeros(4), 0.5).numel() == 0  # no counts: nothing to judge
    capped = torch.tensor([5.0, 0.0, 3.0, 100.0, 0.0, 2.0])  # mean 18.3: five below 0.5 × mean
    assert latents_to_resample(capped, 0.5, at_most=3).tolist() == [1, 4, 5]  # lowest counts
    assert latents_to_resample(capped, 0.5, at_most=10).tolist() == [0, 1, 2, 4, 5]


def test_residual_directions_are_unit_seeded_and_skip_zero_residuals():
    g = torch.Generator().manual_seed(0)
    residual = torch.randn(32, 6, generator=g)
    residual[::2] = 0.0  # rows explained exactly are never drawn
    first = residual_directions(residual, 10, seed=7)
    assert torch.equal(first, residual_directions(residual, 10, seed=7))
    assert torch.allclose(first.norm(dim=-1), torch.ones(10))
    odd = residual[1::2] / residual[1::2].norm(dim=-1, keepdim=True)
    for row in first:  # each direction is one of the non-zero rows
        assert (odd - row).abs().amax(-1).min() < 1e-6
    every = residual_directions(residual, 16, seed=1)  # all 16 non-zero rows, each once
    assert torch.allclose(every.sum(0), odd.sum(0), atol=1e-5)
    assert torch.cdist(every, every).add(torch.eye(16)).min() > 1e-4  # no row drawn twice
    with pytest.raises(ValueError, match="17 directions asked from 16 rows"):
        residual_directions(residual, 17, seed=1)


def test_restart_latents_sets_only_the_chosen_latents():
    torch.manual_seed(0)
    sae = _sae()
    with torch.no_grad():
        sae.b_enc.normal_()
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    latents = torch.tensor([3, 7, 40])
    directions = torch.nn.functional.normalize(torch.randn(3, sae.cfg.d_in), dim=-1)
    kept = torch.ones(sae.cfg.d_sae, dtype=torch.bool)
    kept[latents] = False
    dec_norm = before["W_dec"][kept].norm(dim=-1).mean()
    enc_norm = before["W_enc"][:, kept].norm(dim=0).mean()
    restart_latents(sae, latents, directions)
    assert torch.allclose(sae.W_dec[latents], directions * dec_norm)
    assert torch.allclose(sae.W_enc[:, latents], (directions * enc_norm).T)
    assert torch.equal(sae.b_enc[latents], torch.zeros(3))
    assert torch.equal(sae.W_dec[kept], before["W_dec"][kept])
    assert torch.equal(sae.W_enc[:, kept], before["W_enc"][:, kept])
    assert torch.equal(sae.b_enc[kept], before["b_enc"][kept])
    assert torch.equal(sae.b_dec, before["b_dec"])


def test_encode_residual_is_the_input_minus_the_saes_output():
    torch.manual_seed(0)
    sae = _sae()
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3)
    x = torch.randn(40, 16)
    with torch.no_grad():
        expected = x - sae.decode(sae.encode(x))
    residual, centred = encode_residual(sae, x)
    torch.testing.assert_close(residual, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(centred, x - sae.b_dec.detach(), atol=1e-6, rtol=1e-6)


def test_relative_draw_weights_divide_by_the_centred_input():
    residual = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 0.0], [float("nan"), 0.0]])
    centred = torch.tensor([[30.0, 0.0], [1.0, 1.0], [2.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(draw_weights(residual), torch.tensor([9.0, 1.0, 0.0, 0.0]))
    # the large row's residual is a tenth of it; the small row's is most of it
    torch.testing.assert_close(draw_weights(residual, centred), torch.tensor([0.01, 0.5, 0.0, 0.0]))


def test_fires_in_selection_counts_masked_positive_slots():
    selection = TopKResult(
        values=torch.tensor([[2.0, 1.0, 0.5], [3.0, 0.0, 1.0]]),
        indices=torch.tensor([[4, 1, 2], [1, 3, 0]]),
        mask=torch.tensor([[True, True, False], [True, True, True]]),
    )
    expected = torch.tensor([1.0, 2.0, 0.0, 0.0, 1.0, 0.0])  # latent 3: value 0, not a firing
    assert torch.equal(fires_in_selection(selection, 6), expected)


def _sae(**kw):
    kw.setdefault("probe_warmup_steps", 8)
    kw.setdefault("probe_min_r2", float("-inf"))  # the probe's quality is not under test
    cfg = AdaptiveKTrainingSAEConfig(d_in=16, d_sae=48, k=6, k_min=2, k_max=12, **kw)
    return AdaptiveKTrainingSAE(cfg)


def _batches(n=12):
    torch.manual_seed(0)
    return [torch.randn(64, 16).abs() * torch.rand(64, 1) * 3 for _ in range(n)]


def _warm_up(sae, batches, steps):
    for step in range(steps):
        train_step(sae, batches[step], step)


@pytest.mark.parametrize("below", [0.5, 1.0])
def test_switch_restarts_exactly_the_latents_counted_below_the_share(below):
    batches = _batches()
    sae = _sae(resample_below=below, target_fvu=0.3)
    _warm_up(sae, batches, 8)  # labelled steps 4..7
    fires = sae._kstar_fires.clone()
    assert fires.sum() > 0
    chosen = (fires < below * fires.mean()).nonzero().squeeze(-1)
    assert 0 < chosen.numel() < sae.cfg.d_sae
    before = sae.W_dec.detach().clone()
    sae.prepare_training_step(_input(batches[8], 8))  # the switch, before the step's update
    assert sae.is_adaptive and sae._kstar_fires is None
    report = sae.cfg.metadata.adaptivek_probe_report
    assert report["resampled_latents"] == chosen.numel()
    changed = (sae.W_dec.detach() != before).any(-1).nonzero().squeeze(-1)
    assert torch.equal(changed, chosen)
    assert torch.equal(sae.b_enc[chosen], torch.zeros(chosen.numel()))


def test_switch_restarts_at_most_one_latent_per_row_of_the_batch():
    batches = _batches()
    sae = _sae(resample_below=1.0, target_fvu=0.3)
    _warm_up(sae, batches, 8)
    fires = sae._kstar_fires.clone()
    assert int((fires < fires.mean()).sum()) > 5
    small = batches[8][:5]  # a switch batch of 5 rows
    before = sae.W_dec.detach().clone()
    sae.prepare_training_step(_input(small, 8))
    changed = (sae.W_dec.detach() != before).any(-1).nonzero().squeeze(-1)
    assert sae.cfg.metadata.adaptivek_probe_report["resampled_latents"] == 5
    assert torch.equal(changed, latents_to_resample(fires, 1.0, at_most=5))
    directions = torch.nn.functional.normalize(sae.W_dec[changed].detach(), dim=-1)
    assert torch.cdist(directions, directions).add(torch.eye(5)).min() > 1e-4  # 5 distinct rows


def test_resample_below_zero_leaves_the_weights_at_the_switch():
    batches = _batches()
    sae = _sae(resample_below=0.0, target_fvu=0.3)
    _warm_up(sae, batches, 8)
    assert sae._kstar_fires is None  # nothing counted
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    sae.prepare_training_step(_input(batches[8], 8))
    assert sae.is_adaptive
    assert sae.cfg.metadata.adaptivek_probe_report["resampled_latents"] == 0
    for name, p in sae.named_parameters():
        assert torch.equal(p, before[name]), name


def test_resampled_latents_serve_the_rows_left_worst_reconstructed():
    """After the switch the restarted latents fire on the switch batch at adaptive k (they point
    along its residuals)."""
    batches = _batches()
    sae = _sae(resample_below=1.0, target_fvu=0.3)
    _warm_up(sae, batches, 8)
    fires = sae._kstar_fires.clone()
    chosen = (fires < fires.mean()).nonzero().squeeze(-1)
    x = batches[8]
    sae.prepare_training_step(_input(x, 8))
    with torch.no_grad():
        code = sae.encode(x)
    assert (code[:, chosen] > 0).any(0).sum() > 0


def test_counts_survive_a_checkpoint_and_the_resumed_switch_matches(tmp_path):
    batches = _batches()
    sae = _sae(target_fvu=0.3)  # default resample_below
    assert sae.cfg.resample_below == 0.1
    _warm_up(sae, batches, 6)  # mid-labelling
    sae.save_model(tmp_path / "mid")
    mid = load_file(str(tmp_path / "mid" / "sae_weights.safetensors"))
    assert torch.equal(mid[KSTAR_FIRES_KEY], sae._kstar_fires)
    resumed = AdaptiveKTrainingSAE(sae.cfg)
    resumed.load_weights_from_checkpoint(tmp_path / "mid")
    assert torch.equal(resumed._kstar_fires, sae._kstar_fires)
    for step in range(6, 10):  # step 8 switches and resamples
        train_step(sae, batches[step], step)
        train_step(resumed, batches[step], step)
    assert torch.equal(sae.W_dec, resumed.W_dec) and torch.equal(sae.W_enc, resumed.W_enc)
    sae.save_inference_model(tmp_path / "inference")
    saved = load_file(str(tmp_path / "inference" / "sae_weights.safetensors"))
    assert KSTAR_FIRES_KEY not in saved


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), True, "0.1"])
def test_resample_below_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match=r"resample_below must be a number in \[0, 1\]"):
        _sae(resample_below=value)


def _input(x, step):
    from sae_lens.saes.sae import TrainStepInput

    return TrainStepInput(
        sae_in=x,
        coefficients={},
        dead_neuron_mask=None,
        n_training_steps=step,
        is_logging_step=False,
    )


@pytest.mark.parametrize(("dtype", "autocast"), [("bfloat16", False), ("float32", True)])
def test_switch_restarts_in_bf16_and_under_autocast_with_dead_latents(dtype, autocast):
    batches = _batches()
    sae = _sae(resample_below=1.0, target_fvu=0.3, dtype=dtype)
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    dead[::3] = True  # AuxK on
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for step in range(11):  # the switch at step 8
            x = batches[step].to(sae.W_dec.dtype)
            out = train_step(sae, x, step, dead)
    assert sae.cfg.metadata.adaptivek_probe_report["resampled_latents"] > 0
    assert sae.W_dec.dtype == getattr(torch, dtype)
    for p in (sae.W_dec, sae.W_enc, sae.b_enc):
        assert torch.isfinite(p).all()
    assert torch.isfinite(out.loss) and out.losses["auxiliary_reconstruction_loss"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("architecture", "dead_share"),
    [
        # measured 13 vs 91 dead, MCC 0.607 vs 0.477
        ("adaptivek", 0.5),
        # measured 26 vs 64 dead, MCC 0.566 vs 0.443 (25abb19); 28 dead, MCC 0.572 since the
        # estimator's bias follows b_dec
        ("softsae", 0.6),
    ],
)
def test_default_restarts_keep_latents_alive_on_the_compare_source(
    tmp_path, architecture, dead_share
):
    """Only ``k`` set, the compare's log-uniform source and 1000 steps (make demo's protocol,
    seed 0): the default ``resample_below`` leaves far fewer latents dead and recovers the true
    features better than the same SAE without it, and L0 still follows the true L0."""
    rows = {}
    for below in (0.0, None):
        overrides = {} if below is None else {"resample_below": below}
        cfg = CompareConfig(
            architectures=(architecture,),
            topk_sweep=False,
            overrides={architecture: overrides},
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run_compare(cfg, tmp_path / str(below), log=lambda _: None)
        rows[below] = result.rows[0]
    default, off = rows[None], rows[0.0]
    assert default["dead_latents"] <= dead_share * off["dead_latents"], (default, off)
    assert default["mcc"] >= off["mcc"] + 0.05, (default, off)
    assert default["explained_variance"] >= off["explained_variance"] - 0.005, (default, off)
    assert default["l0_spearman_vs_true"] >= 0.9, default
