"""Tests of the ``hierarchical_topk`` architecture: registration, configs, the all-prefix training
loss against SAELens's own ``decode``, budgets at inference, export to a plain SAELens ``topk`` SAE,
the defining property on SAELens synthetic data, and a real ``LanguageModelSAETrainingRunner`` run.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, TopKSAE, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.synthetic import ActivationGenerator, FeatureDictionary, train_toy_sae
from safetensors.torch import load_file, save_file
from step_parity import assert_steps_match, dense, loss_and_grads

from sae_adaptive_plugin.ops.hierarchical import prefix_reconstruction_errors_naive
from sae_adaptive_plugin.saes.hierarchical_topk import (
    HierarchicalTopKSAE,
    HierarchicalTopKSAEConfig,
    HierarchicalTopKTrainingSAE,
    HierarchicalTopKTrainingSAEConfig,
    export_topk,
    load_at_budget,
    metric_budgets,
)


def _training_sae(rescale: bool = True, k: int = 6, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = HierarchicalTopKTrainingSAEConfig(
        d_in=8, d_sae=24, k=k, rescale_acts_by_decoder_norm=rescale, **kw
    )
    sae = HierarchicalTopKTrainingSAE(cfg)
    with torch.no_grad():  # non-trivial decoder norms and biases
        sae.W_dec.mul_(torch.rand(24, 1) * 3 + 0.2)
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    return sae


def _step(sae, x, dead=None):
    return TrainStepInput(
        sae_in=x,
        coefficients={},
        dead_neuron_mask=dead,
        n_training_steps=0,
        is_logging_step=True,
    )


def _decode_prefix_errors(sae, x):
    """Prefix errors through SAELens's own ``decode`` of the top-j activations (reference)."""
    _, hidden_pre = sae.encode_with_hidden_pre(x)
    values, indices = hidden_pre.topk(sae.cfg.k, dim=-1, sorted=True)
    errors = []
    for j in range(1, sae.cfg.k + 1):
        acts = torch.zeros_like(hidden_pre).scatter(-1, indices[:, :j], values[:, :j].relu())
        errors.append((sae.decode(acts) - x).pow(2).sum(-1))
    return torch.stack(errors, dim=-1)


# ----------------------------------------------------------------------------------- registry


# ------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(k=0), r"k=0 must lie in \[1, d_sae=16\]"),
        (dict(k=17), r"k=17 must lie in \[1, d_sae=16\]"),
        (dict(k=2.5), r"k must be an int"),
        (dict(k=4, normalize_activations="layer_norm"), "normalize_activations"),
        (dict(k=4, loss_chunk_size=0), "loss_chunk_size"),
        (dict(k=4, prefix_weights="linear"), r"prefix_weights must be one of \('uniform'"),
    ],
)
def test_training_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HierarchicalTopKTrainingSAEConfig(d_in=4, d_sae=16, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(k=9, trained_k=8), r"k must lie in \[1, trained_k=8\]"),
        (dict(k=0, trained_k=8), r"k must lie in \[1, trained_k=8\]"),
        (dict(k=4, trained_k=17), r"trained_k=17 must lie in \[1, d_sae=16\]"),
    ],
)
def test_inference_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HierarchicalTopKSAEConfig(d_in=4, d_sae=16, **kwargs)
    assert HierarchicalTopKSAEConfig(d_in=4, d_sae=16, k=5).trained_k == 5


# ------------------------------------------------------------------------------- training loss


@pytest.mark.parametrize(
    ("rescale", "weights"),
    [(True, "uniform"), (False, "uniform"), (True, "harmonic"), (True, "inverse_sqrt")],
)
def test_training_loss_is_weighted_mean_of_decode_prefix_errors_with_same_gradients(
    rescale, weights
):
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    sae = _training_sae(rescale=rescale, prefix_weights=weights)
    out = sae.training_forward_pass(_step(sae, x))
    loss = out.losses["mse_loss"] + out.losses["prefix_excess_loss"]  # the all-prefix mean
    grads = torch.autograd.grad(loss, [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec])

    ref_sae = _training_sae(rescale=rescale)
    ref_errors = _decode_prefix_errors(ref_sae, x)
    j = torch.arange(1, sae.cfg.k + 1, dtype=torch.float32)
    w = {"uniform": torch.ones_like(j), "harmonic": 1 / j, "inverse_sqrt": j**-0.5}[weights]
    ref_loss = (ref_errors.mean(0) * w / w.sum()).sum()
    ref_grads = torch.autograd.grad(
        ref_loss, [ref_sae.W_enc, ref_sae.b_enc, ref_sae.W_dec, ref_sae.b_dec]
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the full-K prefix is SAELens's own forward pass
    torch.testing.assert_close(ref_errors[:, -1], (out.sae_out - x).pow(2).sum(-1))
    assert (dense(out.feature_acts) != 0).sum(-1).max() <= sae.cfg.k


def test_training_metrics_at_budgets_and_aux_loss():
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    sae = _training_sae(k=8)
    dead = torch.zeros(24, dtype=torch.bool)
    dead[:12] = True
    out = sae.training_forward_pass(_step(sae, x, dead))
    assert metric_budgets(8) == [2, 4, 8]
    assert metric_budgets(1) == [1]
    with torch.no_grad():
        errors = _decode_prefix_errors(sae, x)
    variance = (x - x.mean(0)).pow(2).sum(-1).mean()
    for j in (2, 4, 8):
        torch.testing.assert_close(out.metrics[f"mse_at_k{j}"], errors[:, j - 1].mean())
        torch.testing.assert_close(
            out.metrics[f"explained_variance_at_k{j}"], 1 - errors[:, j - 1].mean() / variance
        )
    assert out.metrics["mean_k"] == 8 and out.metrics["std_k"] == 0
    assert out.losses["auxiliary_reconstruction_loss"] > 0
    torch.testing.assert_close(
        out.loss,
        out.losses["mse_loss"]
        + out.losses["prefix_excess_loss"]
        + out.losses["auxiliary_reconstruction_loss"],
    )
    assert torch.equal(sae.k_per_sample(x), torch.full((16,), 8))


# --------------------------------------------------------------------- inference budgets, export


@pytest.fixture
def saved(tmp_path):
    sae = _training_sae(k=6)
    sae.save_inference_model(tmp_path / "htopk")
    return sae, tmp_path / "htopk"


def test_saved_inference_sae_folds_norms_and_serves_every_budget(saved):
    train_sae, path = saved
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["architecture"] == "hierarchical_topk" and cfg["trained_k"] == 6 and cfg["k"] == 6
    sae = SAE.load_from_disk(path)
    assert isinstance(sae, HierarchicalTopKSAE)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(24))
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_errors = _decode_prefix_errors(train_sae, x)
        torch.testing.assert_close(sae.prefix_errors(x), ref_errors, rtol=1e-4, atol=1e-4)
        previous = None
        for k in range(1, 7):
            sae.cfg.k = k
            acts = sae.encode(x)
            assert (acts != 0).sum(-1).max() <= k
            err = (sae(x) - x).pow(2).sum(-1)
            torch.testing.assert_close(err, ref_errors[:, k - 1], rtol=1e-4, atol=1e-4)
            if previous is not None:
                assert not torch.equal(acts, previous)
            previous = acts
        assert torch.equal(sae.k_per_sample(x), torch.full((12,), 6))


def test_budget_out_of_range_is_a_clear_error(saved):
    _, path = saved
    sae = load_at_budget(path, k=3)
    assert sae.cfg.k == 3 and sae.trained_k == 6
    for bad in (0, 7, -1):
        with pytest.raises(ValueError, match=r"k must lie in \[1, trained_k=6\]"):
            sae.set_k(bad)
    sae.cfg.k = 7
    with pytest.raises(ValueError, match=r"trained_k=6"):
        sae.encode(torch.zeros(1, 8))
    with pytest.raises(ValueError, match=r"trained_k=6"):
        load_at_budget(path, k=9)
    with pytest.raises(ValueError, match=r"trained_k=6"):
        sae.set_k(3).to_topk_sae(8)


@pytest.mark.slow
def test_export_to_plain_topk_gives_identical_outputs(saved, tmp_path):
    _, path = saved
    sae = load_at_budget(path, k=4)
    x = torch.randn(9, 8, generator=torch.Generator().manual_seed(4))
    topk = sae.to_topk_sae()
    assert type(topk) is TopKSAE and topk.cfg.architecture() == "topk" and topk.cfg.k == 4
    with torch.no_grad():
        torch.testing.assert_close(topk(x), sae(x), rtol=0, atol=0)

    out_dir = export_topk(path, tmp_path / "as_topk", k=2)
    cfg = json.loads((out_dir / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 2 and "trained_k" not in cfg
    # Load in a fresh interpreter with the plugin's autoload switched off: plain SAELens only.
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    code = textwrap.dedent(
        """
        import sys, torch
        from safetensors.torch import load_file, save_file
        from sae_lens import SAE, TopKSAE
        from sae_lens.registry import SAE_CLASS_REGISTRY
        assert "hierarchical_topk" not in SAE_CLASS_REGISTRY
        assert "sae_adaptive_plugin" not in sys.modules
        sae = SAE.load_from_disk(sys.argv[1])
        assert type(sae) is TopKSAE, type(sae)
        with torch.no_grad():
            out = sae(load_file(sys.argv[2])["x"])
        save_file({"out": out}, sys.argv[3])
        """
    )
    env = dict(os.environ, SAE_ADAPTIVE_PLUGIN_NO_AUTOLOAD="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(out_dir),
            str(tmp_path / "x.safetensors"),
            str(tmp_path / "out.safetensors"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        expected = sae.set_k(2)(x)
    torch.testing.assert_close(load_file(str(tmp_path / "out.safetensors"))["out"], expected)


# ---------------------------------------------------------------- defining property, synthetic


def _synthetic_source(num_features: int, hidden_dim: int, mean_l0: float):
    feature_dict = FeatureDictionary(num_features, hidden_dim, seed=0)
    probs = torch.arange(1, num_features + 1, dtype=torch.float32) ** -0.5
    probs = (probs / probs.sum() * mean_l0).clamp(max=0.9)
    generator = ActivationGenerator(
        num_features, probs, std_firing_magnitudes=0.3, mean_firing_magnitudes=1.0
    )
    return feature_dict, generator


def _explained_variance(errors: torch.Tensor, x: torch.Tensor) -> float:
    return float(1 - errors.mean() / (x - x.mean(0)).pow(2).sum(-1).mean())


@pytest.mark.slow
def test_synthetic_ev_rises_with_budget_and_matches_topk_at_half_budget(tmp_path):
    """After training on SAELens synthetic data (128 true features in 32 dims, mean true L0 12),
    a HierarchicalTopK SAE with K = 16 has explained variance rising strictly with k', and at
    k' = K/2 it is within 0.02 of a SAELens TopK SAE trained at k = K/2 with the same data
    stream, initialisation seed and step budget (600 steps of 512).
    """
    num_features, hidden_dim, K = 128, 32, 16
    steps, batch_size, lr = 600, 512, 3e-3
    feature_dict, generator = _synthetic_source(num_features, hidden_dim, mean_l0=0.75 * K)
    torch.manual_seed(123)
    x_eval = feature_dict(generator(4096)).detach()

    def train(sae):
        torch.manual_seed(2)  # same data stream for both
        train_toy_sae(
            sae,
            feature_dict,
            generator,
            training_samples=steps * batch_size,
            batch_size=batch_size,
            lr=lr,
        )
        return sae

    torch.manual_seed(1)
    htopk = train(
        HierarchicalTopKTrainingSAE(
            HierarchicalTopKTrainingSAEConfig(d_in=hidden_dim, d_sae=num_features, k=K)
        )
    )
    torch.manual_seed(1)
    topk = train(
        TopKTrainingSAE(TopKTrainingSAEConfig(d_in=hidden_dim, d_sae=num_features, k=K // 2))
    )

    # Evaluate the saved inference SAE, reloaded, at every budget through its forward pass.
    htopk.save_inference_model(tmp_path / "htopk")
    inference = SAE.load_from_disk(tmp_path / "htopk")
    evs = []
    with torch.no_grad():
        for k in range(1, K + 1):
            inference.set_k(k)
            evs.append(_explained_variance((inference(x_eval) - x_eval).pow(2).sum(-1), x_eval))
        topk_ev = _explained_variance((topk(x_eval) - x_eval).pow(2).sum(-1), x_eval)
        fast = [_explained_variance(e, x_eval) for e in inference.prefix_errors(x_eval).T]
    print(f"HierarchicalTopK EV by k'=1..{K}: {[round(e, 4) for e in evs]}")
    print(
        f"TopK(k={K // 2}) EV: {topk_ev:.4f}; HierarchicalTopK at k'={K // 2}: {evs[K // 2 - 1]:.4f}"
    )
    assert all(b > a for a, b in itertools.pairwise(evs)), evs
    assert abs(evs[K // 2 - 1] - topk_ev) <= 0.02, (evs[K // 2 - 1], topk_ev)
    assert evs[-1] > topk_ev  # more budget still helps beyond K/2
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(evs), rtol=0, atol=1e-4)


# ------------------------------------------------------------------ real SAELens runner, reload


@pytest.mark.slow
def test_runner_training_save_reload_in_new_process_and_run_evals(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_lm import (
        D_MODEL,
        reload_outputs_in_subprocess,
        run_evals_on,
        tiny_activations,
        train_tiny_runner,
    )

    cfg = HierarchicalTopKTrainingSAEConfig(d_in=D_MODEL, d_sae=64, k=8)
    trained, path = train_tiny_runner(cfg, tmp_path)
    assert isinstance(trained, HierarchicalTopKTrainingSAE)
    saved_cfg = json.loads((path / "cfg.json").read_text())
    assert saved_cfg["architecture"] == "hierarchical_topk" and saved_cfg["trained_k"] == 8

    x = tiny_activations(32)
    outputs, class_name = reload_outputs_in_subprocess(path, x)
    assert class_name.endswith("HierarchicalTopKSAE")
    here = SAE.load_from_disk(path)
    with torch.no_grad():
        torch.testing.assert_close(outputs["sae_out"], here(x))
        torch.testing.assert_close(outputs["feature_acts"], here.encode(x))
        # the trained SAE and the saved (norm-folded) inference SAE agree
        torch.testing.assert_close(here(x), trained(x), rtol=1e-4, atol=1e-4)

    metrics = run_evals_on(here)
    assert 0 < metrics["sparsity"]["l0"] <= 8
    assert "ce_loss_score" in metrics["model_performance_preservation"]
    here.set_k(2)
    metrics_k2 = run_evals_on(here)
    assert 0 < metrics_k2["sparsity"]["l0"] <= 2
    ev = metrics["reconstruction_quality"]["explained_variance"]
    assert metrics_k2["reconstruction_quality"]["explained_variance"] < ev


def test_naive_reference_is_what_decode_computes():
    """The ops reference (used by the ops tests) equals SAELens decode prefixes on a real SAE."""
    sae = _training_sae(rescale=False)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, hidden_pre = sae.encode_with_hidden_pre(x)
        values, indices = hidden_pre.topk(sae.cfg.k, sorted=True)
        naive = prefix_reconstruction_errors_naive(x - sae.b_dec, values.relu(), sae.W_dec, indices)
        torch.testing.assert_close(naive, _decode_prefix_errors(sae, x))


# ------------------------------------------- fused encoder + compact decode vs the dense path


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("auxk", [False, True])
def test_fused_step_matches_dense_path_float64(rescale, auxk):
    sae = _training_sae(rescale=rescale, dtype="float64")
    x = torch.randn(30, 8, dtype=torch.float64)
    dead = (torch.arange(24) % 2 == 0) if auxk else None
    outs = {}
    for fused in (True, False):
        sae.fused_encode = fused
        outs[fused] = loss_and_grads(sae, x, 0, dead, is_logging_step=True)
    o1, o0 = outs[True][0], outs[False][0]
    assert type(o1.hidden_pre.grad_fn) is not type(o0.hidden_pre.grad_fn)
    # the fused step's output and MSE come from the prefix pass, the dense step decodes
    assert o1.sae_out.grad_fn is None and o0.sae_out.grad_fn is not None
    assert bool(o1.losses["auxiliary_reconstruction_loss"] > 0) == auxk
    assert_steps_match(outs[True], outs[False])


def test_hooks_on_acts_fall_back_to_the_dense_path():
    sae = _training_sae(rescale=False)
    x = torch.randn(12, 8)

    def boost_latent_0(_module, _inputs, out):
        out = out.clone()
        out[..., 0] = 50.0
        return out

    handle = sae.hook_sae_acts_pre.register_forward_hook(boost_latent_0)
    try:
        out = sae.training_forward_pass(_step(sae, x))
    finally:
        handle.remove()
    assert torch.all(out.feature_acts[:, 0] == 50.0)  # selected after the hook

    def zero_acts(_module, _inputs, out):
        return torch.zeros_like(out)

    handle = sae.hook_sae_acts_post.register_forward_hook(zero_acts)
    try:
        out = sae.training_forward_pass(_step(sae, x))
    finally:
        handle.remove()
    # sae_out decoded from the hooked (zero) code: only the decoder bias is left
    torch.testing.assert_close(out.sae_out, sae.b_dec.detach().expand_as(out.sae_out))


def test_training_sae_prefix_errors_match_sae_lens_decode():
    sae = _training_sae(k=6)
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(
            sae.prefix_errors(x), _decode_prefix_errors(sae, x), rtol=1e-4, atol=1e-4
        )
