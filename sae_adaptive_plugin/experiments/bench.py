"""``sae-adaptive bench``: step time, step memory and inference throughput against SAELens's TopK.

The rows (:mod:`~sae_adaptive_plugin.experiments.bench_setup`) are measured in one process on one
random Gaussian batch with a fixed thread count, taking turns in an order rotated every round:
``step_ms`` is the median wall time of a full training step (``training_forward_pass`` with the
architecture's real loss, backward, SAELens's grad-norm clip, ``Adam.step``; on CUDA between two
CUDA events after a synchronisation), ``step_cpu_ms`` the same in process CPU time (CPU only);
``peak_step_mib`` the most memory allocated during one step above what it began with
(``torch.profiler`` on CPU, ``max_memory_allocated`` on CUDA, which also gives
``peak_allocated_mib``, the step's whole peak); ``infer_tokens_per_s``
the throughput of ``decode(encode(x))`` of the inference SAE. ``*_ratio`` divides by the TopK row.
Details and measured results: ``docs/bench.md``. Nothing here is asserted on timings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sae_adaptive_plugin.experiments.bench_peers import SparsifyPeer
from sae_adaptive_plugin.experiments.bench_report import (
    RUNS_SCHEMA,
    _result,
    format_runs_summary,
    format_table,
)
from sae_adaptive_plugin.experiments.bench_setup import (
    BenchConfig,
    BenchRow,
    _describe,
    bench_inputs,
    build_rows,
    shape_from_args,
)
from sae_adaptive_plugin.outputs import OutputExistsError, refuse_existing, replacing_file


def prepare_row(row: BenchRow, cfg: BenchConfig, x: Any) -> None:
    """Optimizer, coefficients, inference twin and mean k of a freshly built row."""
    import torch
    from sae_lens.saes.sae import SAE

    sae = row.train_sae
    sae.train()
    row.optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    coefficients = sae.get_coefficients()
    row.coefficients = {
        name: float(getattr(value, "value", value)) for name, value in coefficients.items()
    }
    if isinstance(sae, SparsifyPeer):  # a peer: its own step hooks, inference on itself
        sae.attach_optimizer(row.optimizer)
        row.infer_sae = sae if cfg.inference else None
        return
    if cfg.inference:
        state = {name: t.detach().clone() for name, t in sae.state_dict().items()}
        sae.process_state_dict_for_saving_inference(state)
        infer = SAE.from_dict(sae.cfg.get_inference_sae_cfg_dict())
        infer.load_state_dict(state)
        infer.eval()
        row.infer_sae = infer
        row.infer_mean_k = _mean_k(infer, x)
    if row.mean_k is None:
        row.mean_k = _mean_k(sae, x)


def _mean_k(sae: Any, x: Any) -> float | None:
    import torch

    if hasattr(sae, "k_per_sample"):
        with torch.no_grad():
            return float(sae.k_per_sample(x).float().mean())
    k = getattr(sae.cfg, "k", None)
    return float(k) if k is not None else None


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def train_step(row: BenchRow, x: Any, dead_mask: Any, autocast: bool = False) -> Any:
    """One optimizer step of ``row``'s training SAE on the batch ``x`` (what the bench times);
    ``autocast``: the forward pass under bfloat16 ``torch.autocast``, as SAELens's
    ``autocast=True`` runs it."""
    import contextlib

    import torch
    from sae_lens.saes.sae import TrainStepInput

    sae = row.train_sae
    context = (
        torch.autocast(x.device.type, dtype=torch.bfloat16)
        if autocast
        else contextlib.nullcontext()
    )
    with context:
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients=row.coefficients,
                dead_neuron_mask=dead_mask,
                n_training_steps=row.step_index,
                is_logging_step=False,
            )
        )
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    row.optimizer.step()
    row.optimizer.zero_grad(set_to_none=True)
    return out


def _timed(fn: Callable[[], Any], device: str) -> float:
    return _timed_wall_cpu(fn, device)[0]


def _timed_wall_cpu(fn: Callable[[], Any], device: str) -> tuple[float, float | None]:
    """(wall seconds, CPU seconds of this process) of ``fn()``; on CUDA (seconds between two CUDA
    events around it, after a synchronisation; None: the host's CPU time says nothing there)."""
    if device.startswith("cuda"):
        return _cuda_timed(fn, device), None
    c0, t0 = time.process_time(), time.perf_counter()
    result = fn()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    del result
    return elapsed, cpu


def _cuda_timed(fn: Callable[[], Any], device: str) -> float:
    import torch

    with torch.cuda.device(device):
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        del result
        return start.elapsed_time(end) / 1000.0


def _infer(row: BenchRow, x: Any) -> Any:
    import torch

    with torch.inference_mode():
        sae = row.infer_sae
        return sae.decode(sae.encode(x))


def _state_bytes(row: BenchRow) -> int:
    import torch

    total = sum(p.numel() * p.element_size() for p in row.train_sae.parameters())
    for state in row.optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def _peak_step_bytes(
    row: BenchRow, x: Any, dead_mask: Any, device: str, autocast: bool = False
) -> int:
    """Peak bytes of one step above its start; on CUDA also records ``row.peak_allocated_bytes``
    (``max_memory_allocated`` during the step, parameters and optimizer state included)."""
    import torch

    if device.startswith("cuda"):
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = train_step(row, x, dead_mask, autocast)
        del out
        _sync(device)
        row.peak_allocated_bytes = int(torch.cuda.max_memory_allocated(device))
        return row.peak_allocated_bytes - base
    return cpu_peak_bytes(lambda: train_step(row, x, dead_mask, autocast))


@contextlib.contextmanager
def _without_profiler_usdt_lines() -> Iterator[None]:
    """Drop the ``USDT:`` lines torch's profiler (Kineto) writes to file descriptor 2 at each
    start and stop; everything else written to stderr meanwhile is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            kept = [ln for ln in text.splitlines(keepends=True) if not ln.startswith("USDT:")]
            if kept:
                sys.stderr.write("".join(kept))


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the bytes allocated (net of frees) by torch's CPU allocator while ``fn`` runs.

    Read from the ``[memory]`` events of a ``torch.profiler`` trace: each carries the allocator's
    running total of bytes allocated since profiling began (frees of tensors allocated before
    are not subtracted; the caller makes sure ``fn`` frees none it did not allocate).
    """
    from torch.profiler import ProfilerActivity, profile

    with (
        _without_profiler_usdt_lines(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        result = fn()
        del result
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    totals = []
    for event in events:
        if event.get("name") != "[memory]":
            continue
        args = event.get("args", {})
        if int(args.get("Device Type", 0)) != 0:  # CPU only
            continue
        totals.append((event.get("ts", 0.0), int(args["Total Allocated"]), int(args["Bytes"])))
    if not totals:
        return 0
    totals.sort(key=lambda t: t[0])
    base = totals[0][1] - totals[0][2]  # the running total before the first event
    return max(0, max(t[1] for t in totals) - base)


def _encoder_bound_s(cfg: BenchConfig, x: Any, W_enc: Any, rounds: int) -> float:
    import torch

    with torch.inference_mode():
        _timed(lambda: x @ W_enc, cfg.device)
        return statistics.median(_timed(lambda: x @ W_enc, cfg.device) for _ in range(rounds))


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark described by ``cfg``; returns the JSON-ready result (module docstring).
    The architectures' training warnings (e.g. SoftSAE's on k̂'s spread, meaningless for a few
    timed steps of random data) are silenced: the output is the bench's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return _run_bench(cfg, progress)


def _run_bench(cfg: BenchConfig, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    x, dead_mask = bench_inputs(cfg)

    rows = build_rows(cfg, x)
    active = [r for r in rows if r.status == "ok"]
    for row in active:
        try:
            prepare_row(row, cfg, x)
        except Exception as e:
            row.status, row.reason = "error", _describe(e)
    active = [r for r in rows if r.status == "ok"]

    n_infer = (cfg.warmup + cfg.steps) if cfg.inference else 0
    total = len(active) * (cfg.warmup + cfg.steps + n_infer + int(cfg.memory))
    bar = tqdm(total=total, desc="bench", file=sys.stderr, disable=not progress, leave=False)

    def guarded(row: BenchRow, fn: Callable[[], None]) -> None:
        if row.status != "ok":
            bar.update(1)
            return
        try:
            fn()
        except Exception as e:
            row.status, row.reason = "error", _describe(e)
        bar.update(1)

    # training steps: warm-up, then alternating timed rounds in a rotating order
    for _ in range(cfg.warmup):
        for row in active:
            bar.set_postfix_str(f"warm-up {row.name}")
            guarded(
                row,
                lambda row=row: _timed(
                    lambda: train_step(row, x, dead_mask, cfg.autocast), cfg.device
                ),
            )
    for r in range(cfg.steps):
        order = active[r % len(active) :] + active[: r % len(active)] if active else []
        for row in order:
            bar.set_postfix_str(f"step {r + 1}/{cfg.steps} {row.name}")

            def measure_step(row: BenchRow = row) -> None:
                wall, cpu = _timed_wall_cpu(
                    lambda: train_step(row, x, dead_mask, cfg.autocast), cfg.device
                )
                row.step_s.append(wall)
                if cpu is not None:
                    row.step_cpu_s.append(cpu)

            guarded(row, measure_step)

    if cfg.inference:
        for i in range(cfg.warmup + cfg.steps):
            order = active[i % len(active) :] + active[: i % len(active)] if active else []
            for row in order:
                bar.set_postfix_str(f"inference {row.name}")

                def measure(row: BenchRow = row, timed: bool = i >= cfg.warmup) -> None:
                    t = _timed(lambda: _infer(row, x), cfg.device)
                    if timed:
                        row.infer_s.append(t)

                guarded(row, measure)

    if cfg.memory:
        for row in active:
            bar.set_postfix_str(f"memory {row.name}")

            def measure_memory(row: BenchRow = row) -> None:
                row.peak_step_bytes = _peak_step_bytes(row, x, dead_mask, cfg.device, cfg.autocast)

            guarded(row, measure_memory)
    for row in active:
        if row.status == "ok":
            row.state_bytes = _state_bytes(row)
    bar.close()

    encoder_s = None
    if cfg.inference and active:
        W_enc = active[0].train_sae.W_enc.detach()
        encoder_s = _encoder_bound_s(cfg, x, W_enc, cfg.steps)
    return _result(cfg, rows, encoder_s)


def bench_command(args: argparse.Namespace) -> int:
    """``sae-adaptive bench``: one run per thread count of ``--threads``, a table each, then a
    summary of the ratios per count when there are several."""
    if args.end_to_end is not None:
        return _end_to_end_command(args)
    cuda = str(args.device).startswith("cuda")
    threads = args.threads if args.threads is not None else ([1] if cuda else [1, 2])
    configs = [_config_from_args(args, t, dead) for dead in args.dead_fraction for t in threads]

    def check() -> None:
        if cuda and len(threads) > 1:
            raise ValueError(
                f"--threads {','.join(map(str, threads))}: with --device {args.device} the bench "
                "runs once (the host's thread count does not change GPU timings); give one value"
            )
        for cfg in configs:
            cfg.validate()

    if not _accepted(args, check):
        return 2
    results = []
    for cfg in configs:
        result = run_bench(cfg, progress=not args.no_progress)
        m = result["machine"]
        print(
            f"d_in={cfg.d_in} d_sae={cfg.d_sae} k={cfg.k} batch={cfg.batch} dtype={cfg.dtype} "
            f"device={cfg.device} ({m['device_name']}) threads={cfg.threads} steps={cfg.steps} "
            f"warmup={cfg.warmup} dead_fraction={cfg.dead_fraction:g} autocast={cfg.autocast}; "
            f"torch {m['torch']}, sae_lens {m['sae_lens']}"
        )
        print(format_table(result))
        print()
        results.append(result)
    if len(results) > 1:
        print(format_runs_summary(results))
    if args.json is not None:
        data = results[0] if len(results) == 1 else {"schema": RUNS_SCHEMA, "runs": results}
        with replacing_file(args.json) as tmp:
            tmp.write_text(json.dumps(data, indent=2))
        print(f"wrote {args.json}")
    failed = any(r["status"] == "error" for result in results for r in result["rows"])
    return 1 if failed else 0


def _accepted(args: argparse.Namespace, check: Callable[[], None]) -> bool:
    """Run ``check`` (raises ``ValueError``) and refuse an existing ``--json`` file; print the
    error and return False when either fails."""
    try:
        check()
        if args.json is not None:
            refuse_existing(args.json, args.overwrite, "--json")
    except (ValueError, OutputExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    return True


def _end_to_end_command(args: argparse.Namespace) -> int:
    """``bench --end-to-end N``: whole runs on the CPU (:mod:`.bench_end_to_end`)."""
    from sae_adaptive_plugin.experiments.bench_end_to_end import (
        EndToEndConfig,
        format_end_to_end,
        run_end_to_end,
    )

    cfg = EndToEndConfig(
        **shape_from_args(args),
        steps=args.end_to_end,
        threads=(args.threads or [1])[0],
        seed=args.seed,
        autocast=args.autocast,
    )

    def check() -> None:
        if str(args.device) != "cpu":
            raise ValueError("--end-to-end runs on the CPU only (--device cpu)")
        if args.threads is not None and len(args.threads) > 1:
            raise ValueError("--end-to-end takes one --threads value")
        cfg.validate()

    if not _accepted(args, check):
        return 2
    with warnings.catch_warnings():  # the output is the bench's (as run_bench)
        warnings.simplefilter("ignore", UserWarning)
        result = run_end_to_end(cfg)
    print(
        f"end to end: {cfg.steps} steps, d_in={cfg.d_in} d_sae={cfg.d_sae} k={cfg.k} "
        f"batch={cfg.batch} threads={cfg.threads} autocast={cfg.autocast}; AuxK dead window "
        f"{cfg.dead_window} steps"
    )
    print(format_end_to_end(result))
    if args.json is not None:
        with replacing_file(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 1 if any(r["status"] == "error" for r in result["rows"]) else 0


def _config_from_args(args: argparse.Namespace, threads: int, dead_fraction: float) -> BenchConfig:
    return BenchConfig(
        **shape_from_args(args),
        dtype=args.dtype,
        device=args.device,
        steps=args.steps,
        warmup=args.warmup,
        threads=threads,
        seed=args.seed,
        dead_fraction=dead_fraction,
        autocast=args.autocast,
        rows=tuple(args.rows),
        memory=not args.no_memory,
        inference=not args.no_inference,
    )
