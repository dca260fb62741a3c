"""GPU readiness checked on the CPU: no host sync in a training step after warm-up (counted by
:class:`~sae_adaptive_plugin.experiments.host_syncs.HostSyncCounter`), sparse codes built without a
dense tensor, deterministic mode refused up front on CUDA, and the GPU check's CPU dry run."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import sae_lens  # noqa: F401  (first: the plugin registers before our modules import)
import torch

from sae_adaptive_plugin.experiments.host_syncs import (
    STEP_CASES,
    HostSyncCounter,
    reads_as_on_a_gpu,
    warmed_up_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")

D_IN, D_SAE, K, BATCH = 16, 64, 4, 32


def _our_syncs(counter: HostSyncCounter) -> list:
    """The host syncs made by the package's own code (ops included) during the counted step."""
    return list(counter.where("sae_adaptive_plugin"))


# ---------------------------------------------------------------------------------------------
# host syncs in a step
# ---------------------------------------------------------------------------------------------


def test_counter_sees_the_syncs_a_gpu_would_wait_for():
    x = torch.randn(8, 4)
    with HostSyncCounter() as counter:
        host = torch.arange(3, device="cpu")
        x.sum().item()
        bool((x > 0).any())
        x[x > 0]
        x.tolist()
        torch.zeros((), dtype=x.dtype)  # lands on the CPU whatever x's device
        host.tolist()  # made on the host on purpose: not counted
        torch.where(x > 0, x, 0.0)  # a Python scalar: not counted
    kinds = [e.kind for e in counter.events]
    assert kinds == [
        "scalar read",
        "scalar read",
        "data-dependent shape",
        "host copy",
        "tensor without a device",
    ]
    assert all("test_gpu_ready.py:" in e.where for e in counter.events)


@pytest.mark.parametrize("dead", [False, True], ids=["all-alive", "dead-latents"])
@pytest.mark.parametrize("case", [c for c in STEP_CASES if c != "adaptivek_labelling"])
def test_no_host_sync_in_a_step_after_warm_up(case, dead):
    step = warmed_up_step(case, D_IN, D_SAE, K)
    x = torch.randn(BATCH, D_IN)
    dead_mask = torch.arange(D_SAE) < D_SAE // 2 if dead else None
    with reads_as_on_a_gpu(), HostSyncCounter() as counter:  # the paths a GPU takes
        step(x, dead_mask)
    assert _our_syncs(counter) == []


def test_adaptivek_labelling_step_reads_the_host_once():
    step = warmed_up_step("adaptivek_labelling", D_IN, D_SAE, K)
    with reads_as_on_a_gpu(), HostSyncCounter() as counter:
        step(torch.randn(BATCH, D_IN), None)
    syncs = _our_syncs(counter)
    assert len(syncs) == 1 and "probe/ridge.py" in syncs[0].where


def test_ridge_update_reads_the_host_once_and_keeps_its_statistics():
    from sae_adaptive_plugin.probe import RidgeAccumulator

    acc = RidgeAccumulator(3, n_folds=2, seed=5, reservoir_size=6)
    batches = [(torch.randn(n, 3), torch.randn(n)) for n in (4, 5, 3)]
    acc.update(*batches[0])  # the first batch also sets the shift
    for X, y in batches[1:]:
        reservoir = [acc.res_key, acc.res_x, acc.res_y, acc.res_fold]  # on the CPU by design
        with HostSyncCounter(host=reservoir) as counter:
            acc.update(X, y)
        assert [(e.kind, e.op) for e in counter.events] == [("host copy", "cpu")]
    gen = torch.Generator().manual_seed(5)  # the same draws: folds, then keys, per batch
    folds, keys = [], []
    for X, _ in batches:
        folds.append(torch.randint(0, 2, (X.shape[0],), generator=gen))
        keys.append(torch.rand(X.shape[0], generator=gen))
    X_all = torch.cat([X for X, _ in batches])
    y_all = torch.cat([y for _, y in batches]).double()
    fold_all, key_all = torch.cat(folds), torch.cat(keys)
    kept = key_all.argsort()[:6]  # the smallest keys, in key order
    torch.testing.assert_close(acc.res_x, X_all[kept], rtol=0, atol=0)
    torch.testing.assert_close(acc.res_y, y_all[kept], rtol=0, atol=0)
    assert torch.equal(acc.res_fold, fold_all[kept]) and torch.equal(acc.res_key, key_all[kept])
    Xs = X_all.double() - acc.shift_x
    for f in range(2):
        rows = Xs[fold_all == f]
        torch.testing.assert_close(acc.sum_xx[f], rows.T @ rows)
        assert float(acc.count[f]) == rows.shape[0]
    assert acc.label_min == float(y_all.min()) and acc.label_max == float(y_all.max())


def test_adaptivek_flag_follows_the_buffer_through_load_state_dict():
    from sae_adaptive_plugin.probe import ComplexityProbe
    from sae_adaptive_plugin.saes.adaptivek import (
        AdaptiveKTrainingSAE,
        AdaptiveKTrainingSAEConfig,
    )

    def fresh() -> AdaptiveKTrainingSAE:
        cfg = AdaptiveKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, probe_warmup_steps=4)
        return AdaptiveKTrainingSAE(cfg)

    fitted, unfitted = fresh(), fresh()
    fitted.set_probe(ComplexityProbe(torch.randn(D_IN), 0.0, -1.0, 1.0))
    resumed = fresh()
    resumed.load_state_dict(fitted.state_dict())
    assert resumed.is_adaptive and resumed.get_probe() is not None
    resumed.load_state_dict(unfitted.state_dict())
    assert not resumed.is_adaptive
    x = torch.randn(BATCH, D_IN)
    assert (resumed.k_per_sample(x) == resumed.cfg.k_max).all()


def test_data_parallel_nan_checks_read_the_host_once_each():
    from sae_adaptive_plugin.training.distributed_runner import DistributedTrainingRunner

    runner = object.__new__(DistributedTrainingRunner)
    runner.world_size, runner.rank = 1, 0
    loss = torch.tensor(0.5)
    trainer = SimpleNamespace(step=lambda batch: SimpleNamespace(loss=loss))
    runner._check_non_finite(trainer)
    with HostSyncCounter() as counter:
        out = trainer.step(torch.randn(BATCH, D_IN))
    assert out.loss is loss
    syncs = [e for e in counter.events if "distributed_runner.py" in e.where]
    assert [e.kind for e in syncs] == ["host copy", "host copy"]  # one per check


# ---------------------------------------------------------------------------------------------
# sparse activations
# ---------------------------------------------------------------------------------------------


def test_sparse_activations_are_built_from_the_selection(monkeypatch):
    from sae_lens.registry import get_sae_training_class

    sae_class, cfg_class = get_sae_training_class("hierarchical_topk")
    sae = sae_class(cfg_class(d_in=D_IN, d_sae=D_SAE, k=K))
    x = torch.randn(2, 5, D_IN)  # leading dims kept
    dense = sae.encode(x)
    sae.cfg.use_sparse_activations = True

    def no_dense_round_trip(self, *args, **kwargs):
        raise AssertionError("the code went through a dense tensor and .to_sparse()")

    monkeypatch.setattr(torch.Tensor, "to_sparse", no_dense_round_trip)
    sparse = sae.encode(x)
    assert sparse.is_sparse and sparse.shape == dense.shape
    torch.testing.assert_close(sparse.to_dense(), dense, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# deterministic mode
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def deterministic_on_cuda(monkeypatch):
    """``torch.use_deterministic_algorithms(True)`` with the device check answering "CUDA"."""
    from sae_adaptive_plugin.saes import topk_family

    monkeypatch.setattr(topk_family, "_is_cuda", lambda device: True)
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.mark.parametrize(
    "case,fields",
    [
        ("hierarchical_topk", {}),
        ("adaptivek", {"probe_warmup_steps": 10, "warmup_loss": "mse"}),
    ],
)
def test_deterministic_cuda_is_refused_at_the_first_step(deterministic_on_cuda, case, fields):
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import TrainStepInput

    sae_class, cfg_class = get_sae_training_class(case)
    sae = sae_class(cfg_class(d_in=D_IN, d_sae=D_SAE, k=K, **fields))
    step = TrainStepInput(torch.randn(BATCH, D_IN), {}, None, 0, False)
    with pytest.raises(RuntimeError, match=r"use_deterministic_algorithms\(True\)"):
        sae.training_forward_pass(step)


def test_deterministic_cuda_is_fine_without_prefix_errors_or_with_warn_only(
    deterministic_on_cuda,
):
    from sae_lens.saes.sae import TrainStepInput

    step = warmed_up_step("softsae_hard", D_IN, D_SAE, K)
    step(torch.randn(BATCH, D_IN), None)  # no prefix errors: no refusal
    torch.use_deterministic_algorithms(True, warn_only=True)
    from sae_lens.registry import get_sae_training_class

    sae_class, cfg_class = get_sae_training_class("hierarchical_topk")
    sae = sae_class(cfg_class(d_in=D_IN, d_sae=D_SAE, k=K))
    out = sae.training_forward_pass(TrainStepInput(torch.randn(BATCH, D_IN), {}, None, 0, False))
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------
# sae-adaptive bench --device cuda
# ---------------------------------------------------------------------------------------------


def test_bench_refuses_cuda_without_cuda_and_several_thread_counts(monkeypatch, capsys):
    from sae_adaptive_plugin.cli.main import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--device", "cuda", "--no-progress"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert main(["bench", "--device", "cuda", "--threads", "1,2", "--no-progress"]) == 2
    assert "give one value" in capsys.readouterr().err


def test_bench_table_on_cuda_has_no_cpu_time_and_the_whole_peak():
    from sae_adaptive_plugin.experiments import bench, bench_report, bench_setup

    cfg = bench_setup.BenchConfig(
        d_in=D_IN, d_sae=D_SAE, k=K, batch=BATCH, steps=1, warmup=0, threads=1, rows=("topk",)
    )
    result = bench.run_bench(cfg, progress=False)
    assert "CPU time" in bench_report.format_table(result)
    result["config"]["device"] = "cuda"
    result["rows"][0]["peak_allocated_mib"] = 12.5
    table = bench_report.format_table(result)
    assert "CPU time" not in table and "peak allocated (MiB)" in table and "| 12 " in table


# ---------------------------------------------------------------------------------------------
# the GPU check's CPU dry run
# ---------------------------------------------------------------------------------------------


def test_gpu_check_dry_run_runs_every_section(tmp_path):
    from sae_adaptive_plugin.experiments import gpu_check

    code = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--no-isolate"])
    report = json.loads((tmp_path / "results.json").read_text())
    sections = {s["section"]: s for s in report["sections"]}
    assert list(sections) == list("ABCDE")
    assert code == 0 and all(s["status"] == "ok" for s in sections.values())
    parity = sections["A"]["results"]
    ops = {c.name for c in gpu_check._op_cases()}
    assert {(r["op"], r["mode"]) for r in parity} == {(o, m) for o in ops for m in gpu_check.MODES}
    assert all(r.get("ok") for r in parity if r["mode"] in ("fp64", "fp32"))
    syncs = sections["B"]["results"]
    assert len(syncs) == len(STEP_CASES) * 4 and not any("error" in r for r in syncs)
    for r in syncs:  # the package's own code: no sync, one in AdaptiveK's labelling step
        assert r["events_package"] == (1 if r["case"] == "adaptivek_labelling" else 0), r
    assert {r["k"] for r in sections["C"]["results"]} == {4, 8}
    runs = sections["D"]["results"]
    assert len(runs) == 10 and not any("error" in r for r in runs)
    coo = [r for r in runs if r["variant"] == "sparse_training_code=True"]
    assert [r["architecture"] for r in coo] == ["hierarchical_topk"] * 2
    assert all(r["steps"] == 8 and r["nan_losses"] == 0 and r["steps_per_s"] > 0 for r in runs)
    assert "| topk |" in sections["E"]["results"][0]["table"]
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"## {key}: " in summary for key in "ABCDE")
    targets = gpu_check.target_rows(report)  # bench rows against TopK (no CUDA syncs on a CPU)
    assert {t["what"].split()[0] for t in targets} == {
        "hierarchical_topk",
        "softsae_soft",
        "softsae_hard",
        "adaptivek_warmup",
        "adaptivek",
    }
    assert "## Targets (issue 24)" in summary


def test_gpu_check_records_a_failing_or_slow_section_and_runs_the_others(tmp_path, monkeypatch):
    import time

    from sae_adaptive_plugin.experiments import gpu_check

    def broken(device, shapes):
        raise RuntimeError("planted failure")

    def slow(device, shapes):
        time.sleep(5)
        return []

    monkeypatch.setitem(gpu_check.SECTIONS, "A", ("parity", broken))
    monkeypatch.setitem(gpu_check.SECTIONS, "C", ("op_speed", slow))
    tiny = gpu_check.Shapes.tiny()
    monkeypatch.setattr(
        gpu_check.Shapes,
        "tiny",
        classmethod(lambda cls: replace(tiny, timeouts={**tiny.timeouts, "C": 1})),
    )
    args = [
        "--device",
        "cpu",
        "--tiny",
        "--out",
        str(tmp_path),
        "--no-isolate",
        "--sections",
        "ACE",
    ]
    assert gpu_check.main(args) == 1
    report = json.loads((tmp_path / "results.json").read_text())
    status = {s["section"]: s["status"] for s in report["sections"]}
    assert status == {"A": "error", "C": "timeout", "E": "ok"}
    assert "planted failure" in report["sections"][0]["error"]


def test_gpu_check_refuses_cuda_without_cuda(tmp_path, monkeypatch, capsys):
    from sae_adaptive_plugin.experiments import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_isolated_section_runs_in_a_child_process(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "sae_adaptive_plugin.experiments.gpu_check", "--device", "cpu"]
    cmd += ["--tiny", "--isolate", "--sections", "B", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    assert (tmp_path / "section_B.json").is_file()
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["sections"][0]["status"] == "ok"


def test_host_sync_counter_counts_cuda_sync_warnings(monkeypatch):
    """The CUDA half of the counter, with torch's sync-debug switch faked (no GPU here)."""
    import warnings

    modes = ["default"]
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0, raising=False)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append, raising=False)
    with (
        pytest.warns(UserWarning, match="something else"),
        HostSyncCounter(cuda=True) as counter,
    ):
        for _ in range(3):  # what torch raises at each sync while the mode is "warn"
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)  # passed on
    assert counter.cuda_syncs == 3 and modes[1:] == ["warn", 0]


def test_bench_times_a_cuda_step_between_events(monkeypatch):
    """``_timed_wall_cpu`` on CUDA, with torch.cuda's events faked (no GPU here): seconds from
    the events' milliseconds, after a synchronisation, and no CPU time."""
    import contextlib

    from sae_adaptive_plugin.experiments import bench

    calls: list[str] = []

    class FakeEvent:
        def __init__(self, enable_timing: bool = False):
            assert enable_timing

        def record(self) -> None:
            calls.append("record")

        def synchronize(self) -> None:
            calls.append("event sync")

        def elapsed_time(self, end: FakeEvent) -> float:
            return 12.5

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    wall, cpu = bench._timed_wall_cpu(lambda: calls.append("step"), "cuda")
    assert (wall, cpu) == (0.0125, None)
    assert calls == ["sync", "record", "step", "record", "event sync"]
