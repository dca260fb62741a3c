"""The result of ``sae-adaptive bench``: the JSON document (schema ``sae-adaptive-bench/1``) and its
Markdown table. Medians over the timed steps; every ``*_ratio`` divides by the ``topk`` row."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sae_adaptive_plugin.experiments.bench_setup import BenchConfig, BenchRow
from sae_adaptive_plugin.reporting import format_cell, markdown_table

SCHEMA = "sae-adaptive-bench/1"
#: JSON of a run at several thread counts: ``{"schema": RUNS_SCHEMA, "runs": [result, ...]}``.
RUNS_SCHEMA = "sae-adaptive-bench-runs/1"
MIB = float(1 << 20)


def _machine(cfg: BenchConfig) -> dict[str, Any]:
    import os
    import platform

    import sae_lens
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sae_lens": getattr(sae_lens, "__version__", None),
        "torch_threads": torch.get_num_threads(),
    }
    if cfg.device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(cfg.device)
    else:
        info["device_name"] = _cpu_model() or info["processor"]
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _result(cfg: BenchConfig, rows: list[BenchRow], encoder_s: float | None) -> dict[str, Any]:
    ref = next((r for r in rows if r.name == "topk" and r.status == "ok"), None)

    def median_ms(values: list[float]) -> float | None:
        return 1000.0 * statistics.median(values) if values else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    peer = next((r for r in rows if r.name == "sparsify_topk" and r.status == "ok"), None)
    ref_step = median_ms(ref.step_s) if ref else None
    ref_cpu = median_ms(ref.step_cpu_s) if ref else None
    peer_step = median_ms(peer.step_s) if peer else None
    peer_cpu = median_ms(peer.step_cpu_s) if peer else None
    peer_mem = peer.peak_step_bytes / MIB if peer and peer.peak_step_bytes is not None else None
    ref_mem = ref.peak_step_bytes / MIB if ref and ref.peak_step_bytes is not None else None
    ref_tps = cfg.batch / statistics.median(ref.infer_s) if ref and ref.infer_s else None
    out_rows = []
    for row in rows:
        step_ms = median_ms(row.step_s)
        cpu_ms = median_ms(row.step_cpu_s)
        paired = None
        if ref and row.step_s and len(row.step_s) == len(ref.step_s):
            paired = statistics.median(a / b for a, b in zip(row.step_s, ref.step_s))
        mem = row.peak_step_bytes / MIB if row.peak_step_bytes is not None else None
        tps = cfg.batch / statistics.median(row.infer_s) if row.infer_s else None
        out_rows.append(
            {
                "name": row.name,
                "architecture": row.architecture,
                "phase": row.phase,
                "status": row.status,
                "reason": row.reason,
                "settings": row.settings,
                "mean_k": row.mean_k,
                "inference_mean_k": row.infer_mean_k,
                "step_ms": step_ms,
                "step_ms_all": [1000.0 * s for s in row.step_s],
                "step_ratio": ratio(step_ms, ref_step),
                "step_ratio_paired": paired,
                "step_cpu_ms": cpu_ms,
                "step_cpu_ratio": ratio(cpu_ms, ref_cpu),
                "step_ratio_sparsify": ratio(step_ms, peer_step),
                "step_cpu_ratio_sparsify": ratio(cpu_ms, peer_cpu),
                "peak_step_mib": mem,
                "peak_allocated_mib": (
                    row.peak_allocated_bytes / MIB if row.peak_allocated_bytes is not None else None
                ),
                "memory_ratio": ratio(mem, ref_mem),
                "memory_ratio_sparsify": ratio(mem, peer_mem),
                "state_mib": row.state_bytes / MIB if row.state_bytes is not None else None,
                "infer_tokens_per_s": tps,
                "infer_ratio": ratio(tps, ref_tps),
            }
        )
    config = asdict(cfg)
    config["rows"] = list(cfg.rows)
    return {
        "schema": SCHEMA,
        "config": config,
        "machine": _machine(cfg),
        "memory_method": (
            "torch.cuda.max_memory_allocated above the step's start (peak_allocated_mib: "
            "the whole peak)"
            if cfg.device.startswith("cuda")
            else "torch.profiler(profile_memory=True): peak net CPU-allocator bytes during the step"
        ),
        "encoder_bound_tokens_per_s": cfg.batch / encoder_s if encoder_s else None,
        "rows": out_rows,
    }


#: (header, key, format) of the table; a row that did not run shows its status instead.
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("architecture", "architecture", "{}"),
    ("phase", "phase", "{}"),
    ("mean k", "mean_k", "{:.1f}"),
    ("step (ms)", "step_ms", "{:.0f}"),
    ("step / TopK", "step_ratio", "{:.2f}"),
    ("step / TopK (CPU time)", "step_cpu_ratio", "{:.2f}"),
    ("step / sparsify", "step_ratio_sparsify", "{:.2f}"),
    ("step / sparsify (CPU time)", "step_cpu_ratio_sparsify", "{:.2f}"),
    ("peak step mem (MiB)", "peak_step_mib", "{:.0f}"),
    ("mem / TopK", "memory_ratio", "{:.2f}"),
    ("mem / sparsify", "memory_ratio_sparsify", "{:.2f}"),
    ("inference (tokens/s)", "infer_tokens_per_s", "{:.0f}"),
    ("inference / TopK", "infer_ratio", "{:.2f}"),
)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    if key == "phase":
        return row["phase"] or ""
    if row["status"] != "ok" and key not in ("architecture", "phase"):
        return f"{row['status']}: {row['reason']}" if key == "mean_k" else ""
    return format_cell(row, key, fmt)


#: On CUDA: no CPU-time ratio; the step's whole peak ``max_memory_allocated`` besides.
CUDA_TABLE_COLUMNS = tuple(
    c for c in TABLE_COLUMNS if c[1] not in ("step_cpu_ratio", "step_cpu_ratio_sparsify")
)
CUDA_TABLE_COLUMNS += (("peak allocated (MiB)", "peak_allocated_mib", "{:.0f}"),)


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of a :func:`~sae_adaptive_plugin.experiments.bench.run_bench` result."""
    cuda = str(result["config"]["device"]).startswith("cuda")
    columns = CUDA_TABLE_COLUMNS if cuda else TABLE_COLUMNS
    table = markdown_table(result["rows"], columns, cell=_cell)
    bound = result.get("encoder_bound_tokens_per_s")
    if bound:
        table += f"\n\nEncoder-matmul bound (x @ W_enc alone): {bound:.0f} tokens/s."
    return table


def format_runs_summary(results: list[dict[str, Any]]) -> str:
    """A Markdown table of each row's step ratios (wall and CPU time) to TopK and to sparsify and
    memory ratio to TopK, one column group per run (thread count, dead fraction, autocast)."""
    columns = [("architecture", "architecture", "{}"), ("phase", "phase", "{}")]
    merged = [
        {"architecture": r["architecture"], "phase": r["phase"] or ""} for r in results[0]["rows"]
    ]
    for i, result in enumerate(results):
        c = result["config"]
        label = f"{c['threads']} thr, {c['dead_fraction']:g} dead" + (
            ", autocast" if c.get("autocast") else ""
        )
        for header, key in (
            ("step / TopK", "step_ratio"),
            ("CPU time / TopK", "step_cpu_ratio"),
            ("CPU time / sparsify", "step_cpu_ratio_sparsify"),
            ("mem / TopK", "memory_ratio"),
        ):
            columns.append((f"{header} ({label})", f"{key}_{i}", "{:.2f}"))
            for row, other in zip(merged, result["rows"]):
                row[f"{key}_{i}"] = other[key]
    return markdown_table(merged, columns)
