"""Tests of the AdaptiveK complexity probe: ridge fit with CV λ, streaming, save/load, errors."""

from __future__ import annotations

import math

import pytest
import torch

from sae_adaptive_plugin.probe import (
    ComplexityProbe,
    ProbeReport,
    RidgeAccumulator,
)
from sae_adaptive_plugin.stats import spearman

pytestmark = pytest.mark.usefixtures("one_thread")


def _planted(n: int = 1000, d: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) * 2.0 + 3.0  # non-zero mean: the bias matters
    w = torch.randn(d, generator=g)
    y = X @ w - 1.5
    return X, y, w, g


def test_recovers_planted_linear_signal_noiseless():
    X, y, w, _ = _planted()
    probe = ComplexityProbe.fit(X, y)
    assert probe.report is not None
    assert probe.report.r2 > 0.99
    assert probe.report.pearson > 0.99
    assert probe.report.spearman > 0.99
    assert torch.allclose(probe.weight, w, atol=1e-3)
    assert abs(probe.bias - (-1.5)) < 1e-2
    assert probe.lam == min(probe.report.lambdas)  # no noise: the least shrinkage wins


def test_picks_larger_lambda_under_noise():
    X, y, _, g = _planted(n=120, d=40, seed=1)
    clean = ComplexityProbe.fit(X, y)
    noisy = ComplexityProbe.fit(X, y + 25.0 * torch.randn(y.shape, generator=g))
    assert noisy.lam > clean.lam
    assert noisy.report is not None and noisy.report.r2 < clean.report.r2


def test_stream_equals_in_memory_and_bias_unregularised():
    X, y, _, _ = _planted(n=600, d=8, seed=2)
    lambdas = [1e3]  # heavy ridge: the intercept must still absorb the label mean
    batches = [(X[i : i + 100], y[i : i + 100]) for i in range(0, 600, 100)]
    a = ComplexityProbe.fit_stream(batches, lambdas=lambdas, seed=3)
    acc = RidgeAccumulator(8, seed=3)
    for xb, yb in batches:
        acc.update(xb, yb)
    b = ComplexityProbe.from_accumulator(acc, lambdas=lambdas)
    assert torch.allclose(a.weight, b.weight) and a.bias == b.bias
    # closed form with an unpenalised bias: centre, solve, b = ȳ − wᵀx̄
    Xd, yd = X.double(), y.double()
    xm, ym = Xd.mean(0), yd.mean()
    Xc = Xd - xm
    w = torch.linalg.solve(Xc.T @ Xc + 1e3 * torch.eye(8, dtype=torch.float64), Xc.T @ (yd - ym))
    assert torch.allclose(a.weight.double(), w, atol=1e-5)
    assert math.isclose(a.bias, float(ym - w @ xm), abs_tol=1e-4)
    assert a.report is not None and a.report.n_samples == 600


def test_predict_clamps_to_label_range():
    X, y, _, _ = _planted(n=300, d=6, seed=4)
    probe = ComplexityProbe.fit(X, y)
    far = torch.stack([X[0] * 100, -X[0] * 100])
    pred = probe.predict(far)
    assert float(pred.max()) <= probe.label_max and float(pred.min()) >= probe.label_min
    assert probe.label_min == float(y.min()) and probe.label_max == float(y.max())


def test_save_load_round_trip(tmp_path):
    X, y, _, _ = _planted(n=300, d=6, seed=5)
    probe = ComplexityProbe.fit(X, y)
    path = probe.save(tmp_path / "probe.safetensors")
    again = ComplexityProbe.load(path)
    assert torch.equal(again.weight, probe.weight)
    assert again.bias == pytest.approx(probe.bias, rel=1e-6)
    assert (again.label_min, again.label_max, again.lam) == (
        probe.label_min,
        probe.label_max,
        probe.lam,
    )
    assert isinstance(again.report, ProbeReport) and again.report.r2 == probe.report.r2
    assert torch.allclose(again.predict(X), probe.predict(X))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ComplexityProbe.load(tmp_path / "missing.safetensors")
    X, y, _, _ = _planted(n=100, d=4, seed=6)
    path = ComplexityProbe.fit(X, y).save(tmp_path / "p.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        ComplexityProbe.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        ComplexityProbe.load(garbage)


def test_input_errors():
    X, y, _, _ = _planted(n=50, d=4, seed=7)
    bad = y.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="labels y must be finite"):
        ComplexityProbe.fit(X, bad)
    acc = RidgeAccumulator(4)
    with pytest.raises(ValueError, match="d_in=4"):
        acc.update(torch.randn(5, 3), torch.randn(5))
    with pytest.raises(ValueError, match="n_folds must be >= 2"):
        RidgeAccumulator(4, n_folds=1)
    with pytest.raises(ValueError, match="lambdas"):
        ComplexityProbe.fit(X, y, lambdas=[-1.0])
    probe = ComplexityProbe.fit(X, y)
    with pytest.raises(ValueError, match="probe d_in=4 does not match d_in=8"):
        probe.check_d_in(8)
    with pytest.raises(ValueError, match="d_in=4"):
        probe.predict(torch.randn(2, 5))


def test_accumulator_state_round_trip_continues_identically():
    X, y, _, _ = _planted(n=400, d=5, seed=8)
    full = RidgeAccumulator(5, seed=1, reservoir_size=50)
    full.update(X[:200], y[:200]).update(X[200:], y[200:])
    part = RidgeAccumulator(5, seed=1, reservoir_size=50)
    part.update(X[:200], y[:200])
    resumed = RidgeAccumulator(5, seed=1, reservoir_size=50)
    resumed.load_state_tensors(part.state_tensors("acc."), "acc.")
    resumed.update(X[200:], y[200:])
    a = ComplexityProbe.from_accumulator(full)
    b = ComplexityProbe.from_accumulator(resumed)
    assert torch.equal(a.weight, b.weight) and a.report.spearman == b.report.spearman


def test_spearman_with_ties():
    a = torch.tensor([1.0, 2.0, 2.0, 3.0])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.ones(4), a) == 0.0  # constant side: defined as 0 (stats.spearman)


def test_default_grid_extends_past_an_optimum_on_its_upper_edge():
    # labels independent of X: the more shrinkage the better, so the optimum is the grid's top
    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 8, generator=g)
    y = torch.randn(400, generator=g)
    with pytest.warns(UserWarning, match="lies above the default grid"):
        probe = ComplexityProbe.fit(X, y)
    assert probe.report is not None
    assert probe.lam > 1e3 and len(probe.report.lambdas) > 11
    assert probe.report.lambdas[:11] == pytest.approx([10.0 ** (e / 2) for e in range(-4, 7)])
    assert len(probe.report.cv_mse) == len(probe.report.lambdas)
    # a user-given grid is kept as given, with a warning that its edge was hit
    with pytest.warns(UserWarning, match="largest lambda searched"):
        fixed = ComplexityProbe.fit(X, y, lambdas=[0.1, 1.0])
    assert fixed.lam == 1.0 and fixed.report is not None and fixed.report.lambdas == [0.1, 1.0]
