"""Tests of the ``adaptivek`` architecture: SAELens runner round trip, probe inside the weights,
warm-up switch and resume, probe-aware folds, bad input, and synthetic ground truth."""

from __future__ import annotations

import json

import pytest
import sae_lens  # noqa: F401  (first: the plugin registers before our modules import)
import torch
from safetensors.torch import load_file
from step_parity import assert_steps_match, dense, loss_and_grads, train_step
from tiny_lm import (
    D_MODEL,
    reload_outputs_in_subprocess,
    run_evals_on,
    tiny_activations,
    train_tiny_runner,
)

from sae_adaptive_plugin.ops.adaptive_k import complexity_to_k
from sae_adaptive_plugin.probe import ComplexityProbe, spearman_corr
from sae_adaptive_plugin.saes.adaptivek import (
    ACC_PREFIX,
    AdaptiveKSAE,
    AdaptiveKSAEConfig,
    AdaptiveKTrainingSAE,
    AdaptiveKTrainingSAEConfig,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_probe(d_in: int, seed: int = 0) -> ComplexityProbe:
    g = torch.Generator().manual_seed(seed)
    return ComplexityProbe(torch.randn(d_in, generator=g), 0.3, -2.0, 2.0)


def _training_sae(d_in=16, d_sae=48, k_min=2, k_max=12, dtype="float32", **kw):
    kw.setdefault("probe_warmup_steps", 1000)
    kw.setdefault("k", (k_min + k_max) // 2)
    cfg = AdaptiveKTrainingSAEConfig(
        d_in=d_in, d_sae=d_sae, k_min=k_min, k_max=k_max, dtype=dtype, **kw
    )
    sae = AdaptiveKTrainingSAE(cfg)
    with torch.no_grad():  # non-trivial biases and decoder norms
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.2)
        sae.W_dec.mul_(torch.rand(d_sae, 1, dtype=sae.W_dec.dtype) + 0.5)
    return sae


# ---------------------------------------------------------------------------------------------
# SAELens runner: train with warm-up → save → reload in a new process → run_evals
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_runner_trains_with_warmup_saves_reloads_and_evals(tmp_path):
    from sae_lens import SAE
    from sae_lens.saes.sae import TrainingSAEConfig

    # a plain SAELens config naming only the architecture and its fields
    sae_cfg = TrainingSAEConfig.from_dict(
        {
            "architecture": "adaptivek",
            "d_in": D_MODEL,
            "d_sae": 64,
            "k": 8,
            "k_min": 2,
            "k_max": 16,
            "probe_warmup_steps": 20,
            "target_fvu": 0.5,
        }
    )
    assert isinstance(sae_cfg, AdaptiveKTrainingSAEConfig)
    sae, path = train_tiny_runner(sae_cfg, tmp_path, lr=1e-2)
    assert isinstance(sae, AdaptiveKTrainingSAE) and sae.is_adaptive

    weights = load_file(str(path / "sae_weights.safetensors"))
    assert int(weights["probe_fitted"]) == 1
    assert torch.equal(weights["probe_weight"], sae.probe_weight)
    assert not any(k.startswith(ACC_PREFIX) for k in weights)
    saved_cfg = json.loads((path / "cfg.json").read_text())
    assert saved_cfg["architecture"] == "adaptivek"
    assert saved_cfg["metadata"]["adaptivek_probe_report"]["n_samples"] > 0

    x = tiny_activations(64)
    outputs, class_name = reload_outputs_in_subprocess(path, x)
    assert class_name.endswith("adaptivek.AdaptiveKSAE")
    loaded = SAE.load_from_disk(path)
    with torch.no_grad():
        feats, out = loaded.encode(x), loaded(x)
        train_out = sae(x)
    assert torch.equal(outputs["feature_acts"], feats)
    assert torch.equal(outputs["sae_out"], out)
    assert torch.allclose(out, train_out, atol=1e-5)  # inference save folds the decoder norms
    k = loaded.k_per_sample(x)
    assert torch.equal(k, sae.k_per_sample(x))
    assert len(torch.unique(k)) > 1  # the probe really varies k
    l0 = (feats != 0).sum(-1)
    assert torch.all(l0 <= k) and (l0 == k).float().mean() > 0.9

    metrics = run_evals_on(loaded)
    assert 0 < metrics["sparsity"]["l0"] <= 16
    assert torch.isfinite(torch.tensor(metrics["reconstruction_quality"]["explained_variance"]))
    assert "ce_loss_score" in metrics["model_performance_preservation"]


# ---------------------------------------------------------------------------------------------
# Warm-up, switch, resume, metrics
# ---------------------------------------------------------------------------------------------


def _step(sae, x, step):
    return train_step(sae, x, step)


def test_warmup_switch_is_recorded_and_resumes(tmp_path):
    torch.manual_seed(0)
    batches = [torch.randn(64, 16).abs() * torch.rand(64, 1) * 3 for _ in range(12)]
    sae = _training_sae(probe_warmup_steps=8, target_fvu=0.3)
    for step in range(5):  # warm-up, statistics gathered from step 4
        out = _step(sae, batches[step], step)
        assert float(out.metrics["mean_k"]) == 12 and float(out.metrics["std_k"]) == 0
        assert out.losses["prefix_excess_loss"].item() != 0  # the all-prefix warm-up loss
    sae.save_model(tmp_path / "mid")  # checkpoint in the middle of the gathering phase
    mid = load_file(str(tmp_path / "mid" / "sae_weights.safetensors"))
    assert any(k.startswith(ACC_PREFIX) for k in mid) and int(mid["probe_fitted"]) == 0

    resumed = AdaptiveKTrainingSAE(sae.cfg)
    resumed.load_weights_from_checkpoint(tmp_path / "mid")
    for step in range(5, 9):  # step 8 fits the probe and switches
        a, b = _step(sae, batches[step], step), _step(resumed, batches[step], step)
    assert sae.is_adaptive and resumed.is_adaptive
    assert torch.equal(sae.probe_weight, resumed.probe_weight)
    assert "probe_spearman" in a.metrics and float(a.losses["prefix_excess_loss"]) == 0
    assert torch.equal(a.metrics["mean_k"], b.metrics["mean_k"])

    sae.save_model(tmp_path / "after")
    after = AdaptiveKTrainingSAE(sae.cfg)
    after.load_weights_from_checkpoint(tmp_path / "after")
    assert after.is_adaptive  # a resumed run keeps adaptive k: no second warm-up
    x = batches[9]
    assert torch.equal(after.k_per_sample(x), sae.k_per_sample(x))
    out = _step(after, x, 9)
    assert float(out.metrics["mean_k"]) == pytest.approx(float(sae.k_per_sample(x).float().mean()))
    assert "mse_loss" in out.losses and float(out.losses["prefix_excess_loss"]) == 0


@pytest.mark.parametrize("k_max", [12, 20])
def test_block_ends_warmup_loss_is_the_all_prefix_mean_at_block_ends(k_max):
    """``warmup_loss="block_ends"``: the excess term is the mean over the prefixes 8, 16, …,
    k_max of the prefix errors, minus the last (the all-prefix loss read at block ends)."""
    from sae_adaptive_plugin.ops.hierarchical import PREFIX_BLOCK

    torch.manual_seed(1)
    x = torch.randn(32, 16).abs() * 2
    sae = _training_sae(k_max=k_max, probe_warmup_steps=8, warmup_loss="block_ends")
    out = _step(sae, x, 0)
    errors = sae.prefix_errors_from_selection(x, sae.encode_selection(x).selection).detach()
    ends = [min(PREFIX_BLOCK * (b + 1), k_max) - 1 for b in range(-(-k_max // PREFIX_BLOCK))]
    want = errors[:, ends].mean() - errors[:, -1].mean()
    torch.testing.assert_close(
        out.losses["prefix_excess_loss"].detach(), want, rtol=1e-4, atol=1e-5
    )
    assert float(out.losses["prefix_excess_loss"]) > 0
    out.loss.backward()
    assert sae.W_dec.grad is not None and torch.isfinite(sae.W_dec.grad).all()


def test_block_ends_warmup_labels_are_found_by_search_after_the_first_batch(monkeypatch):
    """The first labelled batch chooses ``τ`` from every prefix's error; a later ``block_ends``
    labelling step runs no all-prefix pass and labels by search (block ends, then one block):
    the exact ``k*`` on every row whose first crossing lies in the first block whose end reaches
    ``τ·V``, never earlier elsewhere (float64: no rounding at the threshold)."""
    from sae_adaptive_plugin.saes import topk_family

    torch.manual_seed(2)
    codes = torch.rand(256, 48) * (torch.rand(256, 48) < torch.rand(256, 1) * 0.3)
    x = (codes @ torch.randn(48, 16)).double()  # rows of 0 to ~15 true features
    sae = _training_sae(k_max=20, probe_warmup_steps=8, warmup_loss="block_ends", dtype="float64")
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(150):  # errors that fall with the prefix: labels that vary
        optimizer.zero_grad()
        _step(sae, x, 0).loss.backward()
        optimizer.step()
    seen = []
    monkeypatch.setattr(sae, "collect_warmup_labels", lambda rows, labels: seen.append(labels))
    _step(sae, x, 4)  # the first labelled batch: τ from every prefix
    assert sae._kstar_tau is not None
    full_errors = sae.prefix_errors_from_selection(x, sae.encode_selection(x).selection).detach()
    want = sae.kstar_from_errors(full_errors, x)
    assert torch.equal(seen[0], want)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("a block_ends labelling step ran a separate all-prefix pass")

    monkeypatch.setattr(topk_family, "prefix_errors_and_residual", no_second_pass)
    _step(sae, x, 5)
    # the search is exact where the first crossing's block is the first whose end reaches
    threshold = sae._kstar_tau * sae._row_variance(x)
    end_reached = full_errors[:, [7, 15, 19]] <= threshold.unsqueeze(-1)
    exact_here = end_reached.any(-1) & ((want - 1) // 8 == end_reached.int().argmax(-1))
    tie = ((full_errors - threshold.unsqueeze(-1)).abs() < 1e-9 * threshold.unsqueeze(-1)).any(-1)
    exact_here &= ~tie  # the row whose error set τ: rounding decides either way
    assert len(seen) == 2 and len(torch.unique(want)) > 3 and exact_here.float().mean() > 0.5
    assert torch.equal(seen[1][exact_here], want[exact_here])
    assert (seen[1] >= want).all()


def test_probe_path_sets_k_from_the_start(tmp_path):
    probe = _random_probe(16)
    path = probe.save(tmp_path / "probe.safetensors")
    sae = _training_sae(probe_path=str(path))
    assert sae.is_adaptive
    x = torch.randn(32, 16)
    expected = complexity_to_k(probe.predict(x), -2.0, 2.0, 2, 12, 6.0)
    assert torch.equal(sae.k_per_sample(x), expected)
    out = _step(sae, x, 0)
    assert float(out.metrics["mean_k"]) == pytest.approx(expected.float().mean().item())
    out.loss.backward()
    assert sae.probe_weight.grad is None and not sae.probe_weight.requires_grad
    l0 = (dense(out.feature_acts) != 0).sum(-1)
    assert torch.all(l0 <= expected)


# ---------------------------------------------------------------------------------------------
# Folds keep outputs and k identical
# ---------------------------------------------------------------------------------------------


def test_norm_scaling_fold_folds_the_probe():
    # (with rescale_acts_by_decoder_norm SAELens's fold also rescales the codes by 1/s)
    sae = _training_sae(dtype="float64", rescale_acts_by_decoder_norm=False)
    sae.set_probe(_random_probe(16, seed=1))
    x = torch.randn(64, 16, dtype=torch.float64)
    s = 2.5
    with torch.no_grad():
        k0, f0, o0 = sae.k_per_sample(s * x), sae.encode(s * x), sae(s * x)
        sae.fold_activation_norm_scaling_factor(s)
        k1, f1, o1 = sae.k_per_sample(x), sae.encode(x), sae(x)
    assert len(torch.unique(k0)) > 1 and torch.equal(k0, k1)
    assert torch.allclose(f0, f1, atol=1e-6)
    assert torch.allclose(o0 / s, o1, atol=1e-6)


def test_whitening_fold_folds_the_probe():
    sae = _training_sae(dtype="float64")
    sae.set_probe(_random_probe(16, seed=2))
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(16, generator=g, dtype=torch.float64)
    A = torch.randn(16, 16, generator=g, dtype=torch.float64) / 4 + torch.eye(16)
    M, Minv = A, torch.linalg.inv(A)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64)
    z = (x - mean) @ M
    with torch.no_grad():
        k0, f0, o0 = sae.k_per_sample(z), sae.encode(z), sae(z)
        sae.fold_activation_whitening(mean, M, Minv)
        k1, f1, o1 = sae.k_per_sample(x), sae.encode(x), sae(x)
    assert len(torch.unique(k0)) > 1 and torch.equal(k0, k1)
    assert torch.allclose(f0, f1, atol=1e-6)
    assert torch.allclose(o0 @ Minv + mean, o1, atol=1e-6)


def test_inference_save_folds_decoder_norms_and_keeps_probe(tmp_path):
    from sae_lens import SAE

    sae = _training_sae()
    sae.set_probe(_random_probe(16, seed=4))
    x = torch.randn(64, 16)
    sae.save_inference_model(tmp_path / "inf")
    loaded = SAE.load_from_disk(tmp_path / "inf")
    assert isinstance(loaded, AdaptiveKSAE) and loaded.is_adaptive
    with torch.no_grad():
        assert torch.equal(loaded.k_per_sample(x), sae.k_per_sample(x))
        assert torch.allclose(loaded.encode(x), sae.encode(x), atol=1e-5)
        assert torch.allclose(loaded(x), sae(x), atol=1e-5)
    assert torch.allclose(loaded.W_dec.norm(dim=-1), torch.ones(48), atol=1e-5)
    probe = loaded.get_probe()
    assert probe is not None and torch.equal(probe.weight, sae.probe_weight)


def test_trainer_norm_scaling_is_folded_into_the_probe():
    """End to end: SAELens's trainer scales inputs, the warm-up fits the probe on scaled inputs,
    and the fold at the end of ``fit`` maps it back to raw activations."""
    import copy

    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = _training_sae(
        probe_warmup_steps=10, target_fvu=0.3, normalize_activations="expected_average_only_in"
    )
    captured: dict[str, object] = {}
    original = sae.fold_activation_norm_scaling_factor

    def fold_and_capture(scaling_factor: float) -> None:
        captured["before"] = copy.deepcopy(sae)
        captured["factor"] = scaling_factor
        original(scaling_factor)

    sae.fold_activation_norm_scaling_factor = fold_and_capture  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield torch.randn(64, 16, generator=g).abs() * torch.rand(64, 1, generator=g) * 30

    cfg = SAETrainerConfig(
        total_training_samples=64 * 16,
        train_batch_size_samples=64,
        lr=3e-3,
        lr_end=3e-3,
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        device="cpu",
        dead_feature_window=1000,
        feature_sampling_window=1000,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=2,
    )
    SAETrainer(cfg=cfg, sae=sae, data_provider=batches()).fit()
    assert sae.is_adaptive and "before" in captured
    before, s = captured["before"], float(captured["factor"])
    assert s != 1.0 and sae.cfg.normalize_activations == "none"
    x = next(batches())
    with torch.no_grad():
        assert torch.equal(before.k_per_sample(s * x), sae.k_per_sample(x))
        assert torch.allclose(before(s * x) / s, sae(x), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k_min": 10, "k_max": 5}, "k_min=10 must be <= k_max=5"),
        ({"k_min": 2, "k_max": 100}, r"k_max=100 must lie in \[1, d_sae=48\]"),
        ({"k_min": 0}, r"k_min=0 must lie in \[1, k_max=12\]"),
        ({"steepness": 0.0}, "steepness must be a finite number > 0, got 0.0"),
        ({"steepness": float("nan")}, "steepness must be a finite number > 0, got nan"),
        ({"steepness": True}, "steepness must be a finite number > 0, got True"),
        ({"target_fvu": 1.0}, r"target_fvu must lie in \(0, 1\)"),
        ({"probe_warmup_steps": 0}, r"probe_warmup_steps=0 must lie in \[1,"),
        ({"warmup_loss": "l1"}, "warmup_loss must be one of"),
        ({"kstar_scale": "abs"}, "kstar_scale must be one of"),
        (
            {"probe_path": "p.safetensors", "normalize_activations": "covariance_whitening"},
            "probe_path with normalize_activations='covariance_whitening'",
        ),
    ],
)
def test_config_errors(kwargs, match):
    base = {"d_in": 16, "d_sae": 48, "k": 4, "k_min": 2, "k_max": 12}
    with pytest.raises(ValueError, match=match):
        AdaptiveKTrainingSAEConfig(**{**base, **kwargs})


def test_inference_config_errors():
    with pytest.raises(ValueError, match=r"k_max=64 must lie in \[1, d_sae=32\]"):
        AdaptiveKSAEConfig(d_in=8, d_sae=32, k_min=1, k_max=64)
    with pytest.raises(ValueError, match="k_min=9 must be <= k_max=8"):
        AdaptiveKSAEConfig(d_in=8, d_sae=32, k_min=9, k_max=8)


def test_probe_file_errors(tmp_path):
    path = _random_probe(8).save(tmp_path / "probe8.safetensors")
    with pytest.raises(ValueError, match="probe d_in=8 does not match d_in=16"):
        _training_sae(probe_path=str(path))
    with pytest.raises(FileNotFoundError, match="complexity probe file not found"):
        _training_sae(probe_path=str(tmp_path / "missing.safetensors"))


def test_nan_activations_in_warmup_raise():
    sae = _training_sae(probe_warmup_steps=2)
    x = torch.randn(32, 16)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="must be finite"):
        _step(sae, x, 1)


# ---------------------------------------------------------------------------------------------
# k* threshold scale: one budget for all rows (dataset) vs each row's own variance (row)
# ---------------------------------------------------------------------------------------------


def test_kstar_scale_dataset_uses_one_threshold_row_uses_each_rows_variance():
    g = torch.Generator().manual_seed(0)
    sae_in = torch.randn(6, 16, generator=g) * torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, 8.0])[:, None]
    row_var = (sae_in - sae_in.mean(0)).pow(2).sum(-1)
    k_max = 12
    # the same decreasing prefix-error curve for every row: err_j = 100 / j
    errors = (100.0 / torch.arange(1, k_max + 1, dtype=torch.float32)).expand(6, k_max)
    errors = errors.contiguous()
    by_row = _training_sae(k_max=k_max, kstar_scale="row", target_fvu=0.1).kstar_from_errors(
        errors, sae_in
    )
    by_data = _training_sae(k_max=k_max, kstar_scale="dataset", target_fvu=0.1).kstar_from_errors(
        errors, sae_in
    )
    assert (
        AdaptiveKTrainingSAEConfig(d_in=4, d_sae=8, k=2, k_min=1, k_max=4).kstar_scale == "dataset"
    )
    # dataset: equal errors -> equal k*, the first j with 100/j <= tau * mean variance
    expected = int((errors[0] <= 0.1 * row_var.mean()).nonzero()[0]) + 1
    assert by_data.tolist() == [expected] * 6
    # row: a row far from the mean gets a looser budget, so fewer latents (non-increasing here)
    order = row_var.argsort()
    assert torch.all(by_row[order][1:] <= by_row[order][:-1])
    assert by_row[order][0] > by_row[order][-1]


def test_kstar_labels_scale():
    from sae_adaptive_plugin.probe.labels import kstar_labels

    sae = _training_sae(k_min=1, k_max=12)
    x = torch.randn(64, 16) * torch.linspace(0.2, 3.0, 64)[:, None]
    row = kstar_labels(sae, x, target_fvu=0.3, scale="row")
    data = kstar_labels(sae, x, target_fvu=0.3, scale="dataset")
    assert torch.equal(data, kstar_labels(sae, x, target_fvu=0.3))  # the default
    assert not torch.equal(row, data)
    with pytest.raises(ValueError, match="scale must be one of"):
        kstar_labels(sae, x, scale="abs")


# ---------------------------------------------------------------------------------------------
# Ground truth on synthetic activations with strongly varying true L0
# ---------------------------------------------------------------------------------------------


class _GatedSource:
    """Small variable-complexity source from SAELens's synthetic parts: orthogonal true features,
    Bernoulli firings, and a per-sample density gate (expected L0 log-uniform in [lo, hi])."""

    def __init__(self, n_features: int, dim: int, lo: float, hi: float, seed: int = 0) -> None:
        import math

        from sae_lens.synthetic import (
            ActivationGenerator,
            FeatureDictionary,
            orthogonal_initializer,
        )

        self.dictionary = FeatureDictionary(
            n_features, dim, initializer=orthogonal_initializer(num_steps=100), seed=seed
        )

        def gate(acts: torch.Tensor) -> torch.Tensor:
            u = torch.rand(acts.shape[0], 1)
            lam = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
            keep = (acts != 0) & (torch.rand_like(acts) < lam / hi)
            empty = ~keep.any(-1)
            keep[empty, (torch.rand_like(acts[empty]) * (acts[empty] != 0)).argmax(-1)] = True
            return acts * keep

        self.generator = ActivationGenerator(
            n_features,
            firing_probabilities=torch.full((n_features,), hi / n_features),
            std_firing_magnitudes=0.25,
            mean_firing_magnitudes=1.0,
            modify_activations=gate,
        )

    @torch.no_grad()
    def sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(activations [n, dim], true L0 [n])``, reproducible by ``seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            feats = self.generator.sample(n)
        return self.dictionary(feats), (feats != 0).sum(-1)

    def train(self, sae, steps: int = 1500, batch_size: int = 256, lr: float = 3e-3) -> None:
        """SAELens's ``SAETrainer`` on a fresh stream of this source."""
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.synthetic import SyntheticActivationIterator
        from sae_lens.training.sae_trainer import SAETrainer

        cfg = SAETrainerConfig(
            total_training_samples=steps * batch_size,
            train_batch_size_samples=batch_size,
            lr=lr,
            lr_end=lr,
            lr_scheduler_name="constant",
            lr_warm_up_steps=50,
            device="cpu",
            dead_feature_window=300,
            feature_sampling_window=steps,
            logger=LoggingConfig(log_to_wandb=False),
            n_batches_for_norm_estimate=10,
        )
        stream = SyntheticActivationIterator(self.dictionary, self.generator, batch_size)
        SAETrainer(cfg=cfg, sae=sae, data_provider=stream).fit()


@torch.no_grad()
def _explained_variance_and_l0(sae, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    feats = sae.encode(x)
    x_hat = sae.decode(feats)
    ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    return float(ev), (feats != 0).sum(-1)


@pytest.mark.slow
def test_synthetic_ground_truth_probe_l0_tracking_and_ev_vs_topk(tmp_path):
    """Probe vs k* and SAE L0 vs true L0 Spearman >= 0.85; EV at matched mean L0 >= TopK's."""
    from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    source = _GatedSource(n_features=32, dim=32, lo=2, hi=16)
    x, true_l0 = source.sample(4096, seed=7)
    assert true_l0.min() <= 2 and true_l0.max() >= 14  # strongly varying complexity

    ak = AdaptiveKTrainingSAE(
        AdaptiveKTrainingSAEConfig(
            d_in=32, d_sae=32, k=8, k_min=1, k_max=16, probe_warmup_steps=1000
        )
    )
    source.train(ak)
    report = ak.cfg.metadata.adaptivek_probe_report
    assert report["spearman"] >= 0.85  # held-out (5-fold CV) Spearman of the probe vs k*
    ak.save_inference_model(tmp_path / "adaptivek")
    ak_ev, ak_l0 = _explained_variance_and_l0(SAE.load_from_disk(tmp_path / "adaptivek"), x)
    assert spearman_corr(ak_l0, true_l0) >= 0.85

    mean_l0 = float(ak_l0.float().mean())
    torch.manual_seed(0)
    topk = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=32, d_sae=32, k=max(1, round(mean_l0))))
    source.train(topk)
    topk.save_inference_model(tmp_path / "topk")
    topk_ev, topk_l0 = _explained_variance_and_l0(SAE.load_from_disk(tmp_path / "topk"), x)
    assert abs(float(topk_l0.float().mean()) - mean_l0) <= 0.5  # matched mean L0
    assert ak_ev >= topk_ev


# ---------------------------------------------------------------------------------------------
# Fused encoder (topk_encode) vs the plain matmul + variable_topk path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["warmup", "adaptive", "adaptive_auxk", "no_rescale"])
def test_fused_encode_matches_plain_path_float64(phase):
    torch.manual_seed(1)
    kw = {"rescale_acts_by_decoder_norm": phase != "no_rescale"}
    sae = _training_sae(dtype="float64", probe_warmup_steps=4, **kw)
    if phase != "warmup":
        sae.set_probe(_random_probe(16))
    x = torch.randn(40, 16, dtype=torch.float64)
    dead = torch.rand(48) < 0.5 if phase == "adaptive_auxk" else None
    outs = {}
    for fused in (True, False):
        sae.fused_encode = fused
        outs[fused] = loss_and_grads(sae, x, 0, dead)
    o1, o0 = outs[True][0], outs[False][0]
    # the two paths really differ in how the code is built
    assert type(o1.hidden_pre.grad_fn) is not type(o0.hidden_pre.grad_fn)
    if phase == "adaptive_auxk":
        assert "auxiliary_reconstruction_loss" in o1.losses
    assert_steps_match(outs[True], outs[False], fields=("feature_acts", "hidden_pre"))


@pytest.mark.parametrize("warmup_loss", ["block_ends", "hierarchical"])
@pytest.mark.parametrize("step", [0, 2])  # before and in the labelling half
def test_warmup_output_and_mse_from_the_prefix_pass_match_the_decode_float64(warmup_loss, step):
    """A prefix-loss warm-up step reads ``sae_out`` and ``mse_loss`` from its prefix pass (no
    decode): the same losses, output and gradients as the plain path, which decodes."""
    torch.manual_seed(3)
    sae = _training_sae(
        dtype="float64", k_max=20, probe_warmup_steps=4, warmup_loss=warmup_loss, target_fvu=0.5
    )
    x = torch.randn(40, 16, dtype=torch.float64)
    dead = torch.rand(48) < 0.5
    outs = {}
    for fused in (True, False):
        sae.fused_encode = fused
        outs[fused] = loss_and_grads(sae, x, step, dead)
    o1, o0 = outs[True][0], outs[False][0]
    assert o1.sae_out.grad_fn is None and o0.sae_out.grad_fn is not None
    assert float(o1.losses["prefix_excess_loss"]) > 0
    assert_steps_match(outs[True], outs[False])


def test_hook_on_acts_pre_falls_back_to_selecting_after_the_hook():
    torch.manual_seed(2)
    sae = _training_sae(rescale_acts_by_decoder_norm=False)
    x = torch.randn(24, 16)

    def boost_latent_0(_module, _inputs, out):
        out = out.clone()
        out[..., 0] = 1e3
        return out

    assert sae.fused_encode
    handle = sae.hook_sae_acts_pre.register_forward_hook(boost_latent_0)
    try:
        acts = sae.encode(x)
        out = _step(sae, x, 0)
    finally:
        handle.remove()
    assert torch.all(acts[:, 0] == 1e3) and torch.all(out.feature_acts[:, 0] == 1e3)
    assert torch.all(out.hidden_pre[:, 0] == 1e3)
    assert not torch.all(sae.encode(x)[:, 0] == 1e3)  # hook removed: fused path again


@pytest.mark.parametrize("precision", ["bf16", "autocast"])
def test_grouped_widths_and_sparse_product_hold_in_bf16_and_autocast_with_dead_latents(
    precision, monkeypatch
):
    """CPU bf16 SAE and float32 SAE under bf16 autocast, with AuxK on: rows_topk's grouped widths
    (k_max 64: widths 64, 32, 16) give the step of one width exactly, and the warm-up's
    decoder-row gradient by sparse product equals the index-added one to float32 rounding."""
    from sae_adaptive_plugin.ops import hierarchical, variable_topk

    dtype = "bfloat16" if precision == "bf16" else "float32"
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast" else None
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(5)) * 2
    x = x * torch.rand(64, 1, generator=torch.Generator().manual_seed(6))
    dead = torch.rand(192, generator=torch.Generator().manual_seed(7)) < 0.4

    def step(sae):
        with context if context is not None else torch.enable_grad():
            return loss_and_grads(sae, x.to(sae.W_enc.dtype), 0, dead)

    torch.manual_seed(2)
    sae = _training_sae(d_sae=192, k_min=1, k_max=64, k=16, dtype=dtype, probe_warmup_steps=4)
    sae.set_probe(_random_probe(16))
    ks = sae.k_per_sample(x.to(sae.W_enc.dtype))
    assert int(ks.min()) <= 16 and int(ks.max()) > 32  # rows in every width group
    grouped = step(sae)
    monkeypatch.setattr(variable_topk, "GROUP_MIN_WIDTH", 10**9)
    one_width = step(sae)
    assert "auxiliary_reconstruction_loss" in grouped[0].losses
    assert all(torch.isfinite(g).all() for g in grouped[1].values())
    assert_steps_match(grouped, one_width, rtol=0, atol=0, grad_rtol=0, grad_atol=0)

    torch.manual_seed(2)
    warm = _training_sae(d_sae=192, k_min=1, k_max=64, k=16, dtype=dtype, probe_warmup_steps=4)
    product = step(warm)
    monkeypatch.setattr(hierarchical, "host_check_is_free", lambda t: False)
    index_added = step(warm)
    assert "prefix_excess_loss" in product[0].losses
    assert all(torch.isfinite(g).all() for g in product[1].values())
    tol = 2e-2 if precision == "bf16" else 1e-5
    assert_steps_match(product, index_added, rtol=tol, atol=tol, grad_rtol=tol, grad_atol=tol)
