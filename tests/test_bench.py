"""Tests of ``sae-adaptive bench``: tiny shapes, the JSON schema and finite positive measurements.

No timing is asserted: only that every measured number exists, is finite and positive, that the
ratios are computed against the TopK row, and that registered architectures are benchmarked.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from sae_adaptive_plugin.cli import main
from sae_adaptive_plugin.experiments import bench, bench_report, bench_setup
from sae_adaptive_plugin.registration.plugin import PACKAGE_ARCHITECTURES

TINY = {"d_in": 16, "d_sae": 64, "k": 4, "batch": 32, "steps": 2, "warmup": 1, "threads": 1}

ROW_KEYS = {
    "name",
    "architecture",
    "phase",
    "status",
    "reason",
    "settings",
    "mean_k",
    "inference_mean_k",
    "step_ms",
    "step_ms_all",
    "step_ratio",
    "step_ratio_paired",
    "step_cpu_ms",
    "step_cpu_ratio",
    "step_ratio_sparsify",
    "step_cpu_ratio_sparsify",
    "peak_step_mib",
    "peak_allocated_mib",
    "memory_ratio",
    "memory_ratio_sparsify",
    "state_mib",
    "infer_tokens_per_s",
    "infer_ratio",
}
MEASURED = ("step_ms", "step_cpu_ms", "peak_step_mib", "state_mib", "infer_tokens_per_s", "mean_k")
RATIOS = (
    "step_ratio",
    "step_ratio_paired",
    "memory_ratio",
    "infer_ratio",
    "step_ratio_sparsify",
    "step_cpu_ratio_sparsify",
    "memory_ratio_sparsify",
)


def _positive(value: object) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def result(one_thread) -> dict:
    return bench.run_bench(bench_setup.BenchConfig(**TINY), progress=False)


def test_schema_and_machine(result: dict) -> None:
    assert result["schema"] == bench_report.SCHEMA
    assert result["config"]["d_sae"] == TINY["d_sae"]
    assert result["config"]["rows"] == list(bench_setup.ROW_NAMES)
    assert result["machine"]["torch"] == torch.__version__
    assert result["machine"]["torch_threads"] == 1
    assert "profile_memory" in result["memory_method"]
    assert _positive(result["encoder_bound_tokens_per_s"])
    assert [r["name"] for r in result["rows"]] == list(bench_setup.ROW_NAMES)
    for row in result["rows"]:
        assert set(row) == ROW_KEYS
    json.dumps(result)  # JSON-ready


def test_registered_architectures_are_measured(result: dict) -> None:
    registered = {"topk", "sparsify", *PACKAGE_ARCHITECTURES}  # make install adds sparsify
    for row in result["rows"]:
        assert row["status"] != "error", row
        if row["architecture"] in registered:
            assert row["status"] == "ok", row
        else:
            assert row["status"] == "skipped"
            assert row["architecture"] in row["reason"]


def test_measurements_finite_positive(result: dict) -> None:
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    assert ok and ok[0]["name"] == "topk"
    for row in ok:
        for key in MEASURED:
            assert _positive(row[key]), (row["name"], key, row[key])
        for key in RATIOS:
            assert _positive(row[key]), (row["name"], key, row[key])
        assert len(row["step_ms_all"]) == TINY["steps"]
        assert all(_positive(t) for t in row["step_ms_all"])
    topk = ok[0]
    assert topk["step_ratio"] == pytest.approx(1.0)
    assert topk["memory_ratio"] == pytest.approx(1.0)
    assert topk["mean_k"] == TINY["k"]
    peer = next(r for r in ok if r["name"] == "sparsify_topk")
    for row in ok[1:]:
        assert row["step_ratio"] == pytest.approx(row["step_ms"] / topk["step_ms"])
        assert row["memory_ratio"] == pytest.approx(row["peak_step_mib"] / topk["peak_step_mib"])
        assert row["step_ratio_sparsify"] == pytest.approx(row["step_ms"] / peer["step_ms"])
        if row["phase"] == "warm-up":  # AdaptiveK's warm-up runs at its default k_max = 4k
            assert row["mean_k"] == 4 * TINY["k"]
            continue
        # every other row is set up so that its mean k is near the TopK k
        assert 0.5 * TINY["k"] <= row["mean_k"] <= 2 * TINY["k"], row


def test_table_lists_every_row(result: dict) -> None:
    table = bench_report.format_table(result)
    lines = table.splitlines()
    assert lines[0].startswith("| architecture |")
    body = [line for line in lines[2:] if line.startswith("| ")]
    assert len(body) == len(result["rows"])
    assert "Encoder-matmul bound" in table


def test_cpu_peak_counts_a_known_allocation() -> None:
    n = 1 << 18  # 1 MiB of float32

    def work() -> torch.Tensor:
        a = torch.ones(n)
        b = a * 2  # two live 1 MiB tensors at the peak
        del a
        return b.sum()

    peak = bench.cpu_peak_bytes(work)
    assert 2 * 4 * n <= peak < 4 * 4 * n


def test_cli_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    flags = ["--dead-fraction", "0.1", "--rows", "topk", "adaptivek", "--no-progress"]
    code = main(["bench", *args, *flags, "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == ["topk", "adaptivek"]
    assert "| topk |" in capsys.readouterr().out


def test_cli_refuses_an_existing_json_unless_overwrite(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    out.write_text("a user's earlier results")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    flags = ["--rows", "topk", "--dead-fraction", "0", "--no-progress", "--no-memory"]
    flags += ["--no-inference", "--json", str(out)]
    assert main(["bench", *args, *flags]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "a user's earlier results"
    assert main(["bench", *args, *flags, "--overwrite"]) == 0
    assert [r["name"] for r in json.loads(out.read_text())["rows"]] == ["topk"]


def test_cli_runs_each_thread_count(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "threads"]
    rows = ["topk", "softsae_soft"]
    try:
        flags = ["--no-progress", "--no-memory", "--no-inference", "--json", str(out)]
        flags += ["--dead-fraction", "0.1"]
        code = main(["bench", *args, "--threads", "1,2", "--rows", *rows, *flags])
    finally:
        torch.set_num_threads(2)
    assert code == 0
    data = json.loads(out.read_text())
    assert data["schema"] == bench_report.RUNS_SCHEMA
    assert [run["machine"]["torch_threads"] for run in data["runs"]] == [1, 2]
    assert all([r["name"] for r in run["rows"]] == rows for run in data["runs"])
    printed = capsys.readouterr().out
    assert "step / TopK (1 thr, 0.1 dead)" in printed and "step / TopK (2 thr, 0.1 dead)" in printed
    assert printed.count("| softsae | soft |") == 3  # one table per count, then the summary


def test_cli_rejects_bad_thread_list(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--threads", "1,x"])
    assert "threads must be a comma-separated list" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("k", 40, "k must"),
        ("batch", 0, "batch"),
        ("dtype", "int8", "dtype"),
        ("rows", ("x",), "rows"),
    ],
)
def test_bad_config_names_the_field(field: str, value: object, needle: str) -> None:
    cfg = bench_setup.BenchConfig(**{**TINY, field: value})
    with pytest.raises(ValueError, match=needle):
        cfg.validate()


def test_rows_use_the_defaults_and_mark_dead_latents_by_default(result: dict) -> None:
    assert result["config"]["dead_fraction"] == 0.1 and result["config"]["autocast"] is False
    by_name = {r["name"]: r for r in result["rows"]}
    k = TINY["k"]
    assert by_name["adaptivek"]["settings"]["k_min"] == 1
    assert by_name["adaptivek"]["settings"]["k_max"] == 4 * k
    assert by_name["adaptivek_warmup"]["settings"]["warmup_loss"] == "block_ends"
    assert by_name["softsae_hard"]["settings"]["k_max"] == 2 * k


@pytest.mark.usefixtures("one_thread")
def test_autocast_runs_every_row() -> None:
    cfg = bench_setup.BenchConfig(**{**TINY, "steps": 1, "warmup": 0}, autocast=True, memory=False)
    out = bench.run_bench(cfg, progress=False)
    assert out["config"]["autocast"] is True
    assert all(r["status"] == "ok" for r in out["rows"]), [r["reason"] for r in out["rows"]]


def test_cli_runs_each_dead_fraction(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    flags = ["--dead-fraction", "0.25,0", "--rows", "topk", "hierarchical_topk", "--no-memory"]
    flags += ["--no-inference", "--no-progress", "--json", str(out)]
    code = main(["bench", *args, *flags])
    assert code == 0
    runs = json.loads(out.read_text())["runs"]
    assert [run["config"]["dead_fraction"] for run in runs] == [0.25, 0.0]
    assert "0.25 dead" in capsys.readouterr().out


def test_cli_rejects_a_bad_dead_fraction(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--dead-fraction", "0.1,2"])
    assert "numbers in [0, 1]" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_trains_every_architecture_and_the_peer(tmp_path, capsys) -> None:
    out = tmp_path / "e2e.json"
    shape = ["--d-in", "16", "--d-sae", "128", "--k", "4", "--batch", "64"]
    assert main(["bench", "--end-to-end", "12", *shape, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["topk", "sparsify_topk", "hierarchical_topk", "softsae", "adaptivek"]
    for row in rows.values():
        assert row["status"] == "ok" and row["steps"] == 12, row
        assert _positive(row["cpu_s"]) and math.isfinite(row["loss_last"])
        assert row["cpu_s_per_topk"] == pytest.approx(row["cpu_s"] / rows["topk"]["cpu_s"])
        assert row["cpu_s_per_sparsify"] == pytest.approx(
            row["cpu_s"] / rows["sparsify_topk"]["cpu_s"]
        )
    assert "| adaptivek | 12 |" in capsys.readouterr().out


def test_end_to_end_refuses_too_few_steps(capsys) -> None:
    assert main(["bench", "--end-to-end", "3", "--d-in", "16", "--d-sae", "128", "--k", "4"]) == 2
    assert "--end-to-end must be >= 8 steps" in capsys.readouterr().err
