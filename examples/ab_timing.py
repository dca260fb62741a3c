"""Shared by the in-process A/B timing examples (``step_variants_ab.py``,
``soft_candidates_ab.py``, ``linear_layout_ab.py``): the bench's rows built and prepared on its
inputs, a step's CPU time, and the report. Not used by the package."""

import time
from collections.abc import Callable
from typing import Any

from sae_adaptive_plugin.experiments.bench import prepare_row, train_step
from sae_adaptive_plugin.experiments.bench_setup import BenchConfig, bench_inputs, build_rows


def prepared_rows(
    rows: tuple[str, ...], dead: float, threads: int, autocast: bool, **shape: int
) -> tuple[list[Any], Callable[[Any], float]]:
    """The bench's ``rows`` at ``shape`` (the bench's defaults for the sizes not given), each
    prepared, and ``step_time(row)``: the faster of two training steps' CPU time after one
    untimed step (the first after a switch)."""
    cfg = BenchConfig(
        threads=threads,
        dead_fraction=dead,
        autocast=autocast,
        rows=rows,
        inference=False,
        memory=False,
        **shape,
    )
    x, dead_mask = bench_inputs(cfg)
    built = build_rows(cfg, x)
    for row in built:
        prepare_row(row, cfg, x)

    def one_step(row: Any) -> float:
        start = time.process_time()
        train_step(row, x, dead_mask, autocast)
        return time.process_time() - start

    def step_time(row: Any) -> float:
        one_step(row)
        return min(one_step(row), one_step(row))

    return built, step_time


def report(times: dict[tuple[str, str], list[float]]) -> None:
    """Each (row, variant)'s minimum over rounds, and its ratio to sparsify's."""
    base = min(times[("sparsify_topk", "-")])
    for (row_name, variant), ts in times.items():
        print(f"{row_name:18s} {variant:17s} {min(ts):.3f} s  / sparsify {min(ts) / base:.2f}")
