"""Tests of the variable-complexity synthetic source and of ``sae-adaptive compare --quick``."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from sae_adaptive_plugin import cli
from sae_adaptive_plugin.experiments.registry_saes import registered_training_architectures
from sae_adaptive_plugin.experiments.synthetic import (
    ALL_ARCHITECTURES,
    CompareConfig,
    VariableComplexityConfig,
    VariableComplexitySource,
)
from sae_adaptive_plugin.experiments.synthetic_compare import RESULT_KEYS, iter_finite_problems
from sae_adaptive_plugin.stats import spearman

SMALL = {"num_features": 64, "hidden_dim": 16, "orthogonalize_steps": 0}


def test_true_l0_varies_strongly_per_sample():
    source = VariableComplexitySource(VariableComplexityConfig(min_l0=2, max_l0=40, **SMALL))
    _, hidden, true_l0 = source.sample(4000, seed=3)
    l0 = true_l0.float()
    assert hidden.shape == (4000, 16)
    assert int(true_l0.min()) >= 1  # every sample has at least one true feature
    # the sparsest tenth is around min_l0, the densest tenth around max_l0
    assert torch.quantile(l0, 0.1) <= 4
    assert torch.quantile(l0, 0.9) >= 25
    assert l0.std() > 0.5 * l0.mean()
    # log-uniform λ in [2, 40]: E[L0] = (40 - 2) / ln(20) ≈ 12.7
    assert 10.5 < l0.mean() < 15.0


def test_true_l0_counts_the_features_that_make_the_activation():
    source = VariableComplexitySource(VariableComplexityConfig(**SMALL))
    feature_acts, hidden, true_l0 = source.sample(256, seed=0)
    assert torch.equal(true_l0, (feature_acts != 0).sum(-1))
    assert torch.allclose(hidden, feature_acts @ source.true_features, atol=1e-5)


def test_sampling_is_reproducible_by_seed_and_isolated_from_global_rng():
    source = VariableComplexitySource(VariableComplexityConfig(**SMALL))
    a = source.sample(128, seed=7)
    torch.rand(1000)  # consuming global randomness must not change a seeded sample
    b = source.sample(128, seed=7)
    c = source.sample(128, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])

    stream_1, stream_2 = source.stream(32, seed=5), source.stream(32, seed=5)
    first = [next(stream_1) for _ in range(3)]
    torch.randn(50)
    second = [next(stream_2) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert not torch.equal(first[0], first[1])


def test_dictionary_is_reproducible_by_seed():
    make = lambda seed: VariableComplexitySource(VariableComplexityConfig(seed=seed, **SMALL))  # noqa: E731
    assert torch.equal(make(1).true_features, make(1).true_features)
    assert not torch.equal(make(1).true_features, make(2).true_features)


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_features", 1), ("hidden_dim", 0), ("min_l0", 0.0), ("max_l0", 1000.0), ("max_l0", 0.5)],
)
def test_bad_source_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        VariableComplexityConfig(**{**SMALL, field: value}).validate()


def test_bad_compare_config_names_the_field():
    with pytest.raises(ValueError, match="architectures"):
        CompareConfig(architectures=("topk", "nope")).validate()
    with pytest.raises(ValueError, match="steps"):
        CompareConfig(steps=0).validate()
    with pytest.raises(ValueError, match="device"):
        CompareConfig(device="not-a-device").validate()
    with pytest.raises(ValueError, match="b_dec_init_method must be one of"):
        CompareConfig(b_dec_init_method="median").validate()


def test_spearman_is_zero_for_a_constant_l0_and_one_for_a_monotone_one():
    true_l0 = torch.arange(100.0)
    assert spearman(torch.full((100,), 5.0), true_l0) == 0.0
    assert spearman(true_l0.sqrt(), true_l0) == pytest.approx(1.0)


def test_compare_quick_writes_finite_results_table_and_plots(tmp_path, capsys):
    out = tmp_path / "compare"
    code = cli.main(["compare", "--quick", "--out", str(out), "--threads", "1"])
    printed = capsys.readouterr().out
    assert code == 0

    payload = json.loads((out / "results.json").read_text())
    rows = payload["results"]
    registered = registered_training_architectures()
    expected = {a for a in ALL_ARCHITECTURES if a in registered}
    sweep = {"topk_sweep"} if {"topk", "hierarchical_topk"} <= expected else set()
    assert {r["architecture"] for r in rows} == expected | sweep
    assert set(payload["skipped"]) == set(ALL_ARCHITECTURES) - expected
    for row in rows:
        assert set(RESULT_KEYS) <= set(row)
        for key in RESULT_KEYS:
            if key not in ("name", "architecture", "k_eval"):
                assert math.isfinite(row[key]), (row["name"], key, row[key])
        assert -1.0 <= row["l0_spearman_vs_true"] <= 1.0
        assert 0.0 <= row["mcc"] <= 1.0
        assert row["l0_mean"] > 0
        assert row["train_seconds"] > 0
    assert list(iter_finite_problems(rows)) == []
    if "hierarchical_topk" in expected:  # evaluated at several budgets k'
        hier = [r for r in rows if r["architecture"] == "hierarchical_topk"]
        assert len(hier) >= 3
        assert all(r["l0_mean"] <= r["k_eval"] + 1e-6 for r in hier)
        assert [r["k_eval"] for r in hier] == sorted(r["k_eval"] for r in hier)
        assert hier[-1]["l0_mean"] > hier[0]["l0_mean"]
        # a TopK trained at every evaluated budget, and the gap to it on each row
        topk_ks = {r["k_eval"] for r in rows if r["architecture"] in ("topk", "topk_sweep")}
        assert {r["k_eval"] for r in hier} <= topk_ks
        assert all(math.isfinite(r["ev_gap_vs_topk"]) for r in hier)
    for fixed in ("topk", "batchtopk", "matryoshka_batchtopk"):
        assert [r["k_eval"] for r in rows if r["architecture"] == fixed] == [payload["fixed_k"]]

    for name in ("l0_vs_true_l0.png", "ev_vs_l0.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 10_000
    # the Markdown table has a header, an alignment row and one row per result
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert "Spearman" in table[0]
    assert (out / "saes" / "topk" / "cfg.json").exists()


def test_compare_rejects_bad_flags_with_the_field_name(tmp_path, capsys):
    code = cli.main(["compare", "--quick", "--out", str(tmp_path), "--steps", "0"])
    assert code == 2
    assert "steps" in capsys.readouterr().err


def test_unregistered_architecture_is_skipped_with_a_reason(tmp_path, monkeypatch):
    from sae_adaptive_plugin.experiments import synthetic_compare

    monkeypatch.setattr(synthetic_compare, "registered_training_architectures", lambda: {"topk"})
    cfg = CompareConfig(
        source=VariableComplexityConfig(
            num_features=32, hidden_dim=16, max_l0=8, **{"orthogonalize_steps": 0}
        ),
        steps=5,
        batch_size=32,
        eval_samples=64,
        architectures=("softsae", "topk"),
    )
    result = synthetic_compare.run_compare(cfg, tmp_path, log=lambda _: None)
    assert [r["architecture"] for r in result.rows] == ["topk"]
    assert "not registered" in result.skipped["softsae"]


def test_seeds_are_aggregated_as_mean_and_std_per_row():
    from sae_adaptive_plugin.experiments.compare import markdown_table
    from sae_adaptive_plugin.experiments.synthetic_compare import CompareResult, aggregate_seeds

    def result(seed, ev, name_extra):
        rows = [
            {"name": "topk", "architecture": "topk", "k_eval": 5, "explained_variance": ev},
            {"name": name_extra, "architecture": "x", "k_eval": None, "explained_variance": 0.5},
        ]
        info = {"true_l0_mean": 3.0, "true_l0_std": 1.0, "true_l0_p90": 5.0, "target_l0": 3.0}
        return CompareResult(rows, {}, torch.zeros(2), {}, 5, 3.0, {**info, "seed": seed})

    merged = aggregate_seeds([result(0, 0.6, "a"), result(1, 0.8, "b")])
    by_name = {r["name"]: r for r in merged.rows}
    assert by_name["topk"]["explained_variance"] == pytest.approx(0.7)
    assert by_name["topk"]["explained_variance_std"] == pytest.approx(0.1)
    assert by_name["topk"]["n_seeds"] == 2 and by_name["a"]["n_seeds"] == 1
    assert by_name["topk"]["k_eval"] == 5
    assert merged.info["seeds"] == [0, 1]
    rows = [
        {**r, **{k: 1.0 for k in ("mse", "cosine_similarity", "l0_mean", "l0_std")}}
        for r in merged.rows
    ]
    for r in rows:
        r.update(l0_p90=1.0, dead_latents=0, mcc=0.5, l0_spearman_vs_true=0.0, train_seconds=1.0)
    assert "0.700 ± 0.100" in markdown_table(rows)


def test_single_run_sets_up_one_sae_as_compare_does(tmp_path):
    import argparse

    from sae_adaptive_plugin.experiments.synthetic_compare import SingleRun

    parser = argparse.ArgumentParser()
    SingleRun.add_arguments(parser)
    args = parser.parse_args(["--steps", "30", "--set", '{"k_max": 60}', "--complexity", "uniform"])
    run = SingleRun.from_args("softsae", args)
    assert run.cfg.source.complexity == "uniform" and run.cfg.steps == 30
    # only k (the held-out mean true L0, rounded) and the overrides are set
    assert run.sae.cfg.k == round(float(run.true_l0.float().mean()))
    assert run.sae.cfg.k_max == 60
    metrics, l0 = run.train_and_evaluate(tmp_path / "sae")
    assert (tmp_path / "sae" / "cfg.json").exists()
    assert l0.shape == run.true_l0.shape and math.isfinite(metrics["explained_variance"])
    from sae_adaptive_plugin.outputs import OutputExistsError

    with pytest.raises(OutputExistsError, match="out_dir"):  # a saved SAE is never replaced
        SingleRun.from_args("softsae", args).train_and_evaluate(tmp_path / "sae")
    bad = parser.parse_args(["--set", "[1]"])
    with pytest.raises(ValueError, match="--set must be a JSON object"):
        SingleRun.from_args("softsae", bad)


def test_set_overrides_a_field_of_one_architecture(tmp_path):
    from sae_adaptive_plugin.cli import main

    out = tmp_path / "out"
    args = ["compare", "--quick", "--architectures", "softsae,topk", "--threads", "1"]
    overrides = '{"softsae": {"k_estimator_hidden": 16}}'
    start = ["--b-dec-init-method", "mean"]
    assert main([*args, "--set", overrides, *start, "--out", str(out)]) == 0
    saved = json.loads((out / "saes" / "softsae" / "cfg.json").read_text())
    assert saved["k_estimator_hidden"] == 16
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["b_dec_init_method"] == "mean"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ('{"softsae": {"k_estimator_hiddn": 16}}', "softsae.k_estimator_hiddn is not a field"),
        ('{"softsa": {}}', "'softsa' is not a registered architecture"),
        ('{"softsae": 3}', "architecture -> {field: value}"),
    ],
)
def test_set_refuses_what_is_not_a_field_before_training(tmp_path, capsys, overrides, needle):
    from sae_adaptive_plugin.cli import main

    with contextlib.suppress(SystemExit):
        code = main(["compare", "--quick", "--set", overrides, "--out", str(tmp_path / "o")])
        assert code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("architecture", ["topk", "hierarchical_topk"])
def test_b_dec_mean_start_reaches_sae_lens_saes_and_ours_alike(architecture):
    """A comparison's ``b_dec_init_method = "mean"`` starts SAELens's own TopK (no such field:
    patched in) and ours (the field) at the first batch's mean; ``"zeros"`` leaves b_dec at 0."""
    from step_parity import train_step

    from sae_adaptive_plugin.experiments.registry_saes import build_training_sae

    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) + 3

    def first_step(method: str):
        sae = build_training_sae(
            architecture, {"k": 4, "b_dec_init_method": method}, {}, d_in=16, d_sae=32
        )
        train_step(sae, x, 0)
        return sae

    torch.testing.assert_close(first_step("mean").b_dec.detach(), x.mean(0))
    assert not first_step("zeros").b_dec.any()
    # an explicit override of one of ours wins over the comparison's setting
    ours = build_training_sae(
        "hierarchical_topk",
        {"k": 4, "b_dec_init_method": "mean"},
        {"hierarchical_topk": {"b_dec_init_method": "zeros"}},
        d_in=16,
        d_sae=32,
    )
    assert ours.cfg.b_dec_init_method == "zeros"
