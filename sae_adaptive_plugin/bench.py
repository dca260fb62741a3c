"""``sae-adaptive bench``: step time, step memory and inference throughput against SAELens's TopK.

Every architecture is built at the same shapes (``d_in``, ``d_sae``, batch, dtype, device) and
measured in ONE process, on one random Gaussian batch, with the thread count fixed
(``torch.set_num_threads``). Rows:

- ``topk``: SAELens's own ``TopKTrainingSAE`` at ``k`` (SAELens defaults otherwise), the reference.
- ``hierarchical_topk``: largest budget ``K = k``.
- ``softsae`` twice: in its soft phase (LapSum mask, a step after the ``K_t`` anneal and before
  ``hard_topk_start_step``) and in its hard phase (step ``hard_topk_start_step``: hard top-k with
  per-row ``⌊k̂⌋``, ``k_max = 2k``), with the estimator at its default hidden width (``d_sae``, the
  reference); its output bias ``c₀`` is set so that the mean k on the batch is ``k`` (``k̂`` in
  the soft phase, ``⌊k̂⌋`` in the hard phase).
- ``adaptivek``: ``k_min = max(1, k/4)``, ``k_max = 2k − k_min``, with a probe (a random direction)
  whose label range is the batch's mean ± 2 std of its output, so the per-row k spreads over the
  range with mean ≈ ``k``.

Each row reports the mean k it actually used on the batch (``mean_k``). Architectures that are not
registered are reported as ``skipped``; a row that fails to build or run is ``error`` (message kept).

What is measured:

- ``step_ms``: median wall time of a full training step — ``training_forward_pass`` with a SAELens
  ``TrainStepInput`` (forward and the architecture's real loss; ``dead_neuron_mask`` marks the
  first ``dead_fraction·d_sae`` latents dead, none by default, so AuxK only runs when asked),
  ``loss.backward()``, SAELens's grad-norm clip at 1.0, ``Adam.step()``, ``zero_grad`` — what
  SAELens's trainer does per step minus its logging and firing statistics. Rows alternate: every
  round times one step of each row, in an order rotated each round, so drifts in machine load hit
  every row alike; ``warmup`` steps per row come first and are not timed. CUDA is synchronised
  around every timed region. ``step_ratio`` is the ratio of medians; ``step_ratio_paired`` the
  median over rounds of the row's time over TopK's time in the same round; ``step_cpu_ms`` /
  ``step_cpu_ratio`` use the CPU time of the process (``time.process_time``) instead of wall time,
  which on a CPU shared with other jobs is far less sensitive to their load than wall time.
- ``peak_step_mib``: the most memory allocated at any moment of one step above what was allocated
  when it began (parameters and Adam state are excluded and reported as ``state_mib``; gradients,
  activations and temporaries count). CUDA: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``. CPU: a step run under ``torch.profiler`` with ``profile_memory=True``,
  which records every allocation and free of torch's CPU allocator with the running total of bytes
  it allocated since profiling began; the peak of that total over the step is taken. This counts
  exactly what tensors hold — unlike process RSS it is not blurred by malloc caching, arena reuse
  or memory of other rows built in the same process, so it can be measured per row in one process.
- ``infer_tokens_per_s``: tokens/s of ``decode(encode(x))`` of the inference SAE (built from the
  training SAE as ``save_inference_model`` + ``SAE.load_from_disk`` would) under
  ``torch.inference_mode``, median over alternating rounds. ``encoder_bound_tokens_per_s`` is the
  throughput of the encoder matmul ``x @ W_enc`` alone, a bound no SAE with a dense encoder beats.
- ``*_ratio``: the row's value over the ``topk`` row's (step time, peak step memory, inference
  tokens/s).

Use: ``sae-adaptive bench --d-in 768 --d-sae 16384 --k 64 --batch 4096 --threads 1,2 --json
out.json`` (one run per thread count, then :func:`format_threads_summary` of the ratios) or
:func:`run_bench` / :func:`format_table` from Python. Nothing here is asserted on timings.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sae_adaptive_plugin.cli import command

SCHEMA = "sae-adaptive-bench/1"
#: JSON of a run at several thread counts: ``{"schema": RUNS_SCHEMA, "runs": [result, ...]}``.
RUNS_SCHEMA = "sae-adaptive-bench-runs/1"
#: Row names in table order; ``topk`` (the reference) must come first.
ROW_NAMES = ("topk", "hierarchical_topk", "softsae_soft", "softsae_hard", "adaptivek")
DTYPES = ("float32", "float64", "bfloat16", "float16")
MIB = float(1 << 20)


@dataclass
class BenchConfig:
    """Shapes and protocol of one benchmark run (see the module docstring)."""

    d_in: int = 768
    d_sae: int = 16384
    k: int = 64
    batch: int = 4096
    dtype: str = "float32"
    device: str = "cpu"
    steps: int = 5
    warmup: int = 2
    threads: int = 2
    seed: int = 0
    lr: float = 1e-4
    dead_fraction: float = 0.0
    rows: tuple[str, ...] = ROW_NAMES
    memory: bool = True
    inference: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and its allowed range."""
        for name, lo in (("d_in", 1), ("d_sae", 1), ("batch", 1), ("steps", 1), ("threads", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int in [1, d_sae/2={self.d_sae // 2}], got {self.k!r}")
        if 2 * self.k > self.d_sae:
            raise ValueError(
                f"k must be an int in [1, d_sae/2={self.d_sae // 2}] (the adaptive SAEs use "
                f"k_max = 2k <= d_sae), got {self.k}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not 0.0 <= self.dead_fraction <= 1.0:
            raise ValueError(f"dead_fraction must lie in [0, 1], got {self.dead_fraction}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        unknown = [r for r in self.rows if r not in ROW_NAMES]
        if unknown or not self.rows:
            raise ValueError(f"rows must be a non-empty subset of {ROW_NAMES}, got {self.rows}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"device={self.device!r} but CUDA is not available here")


@dataclass
class _Row:
    """One benchmarked configuration: a training SAE, its optimizer and its inference twin."""

    name: str
    architecture: str
    phase: str | None
    status: str = "ok"
    reason: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    train_sae: Any = None
    infer_sae: Any = None
    optimizer: Any = None
    step_index: int = 0
    coefficients: dict[str, float] = field(default_factory=dict)
    mean_k: float | None = None
    infer_mean_k: float | None = None
    step_s: list[float] = field(default_factory=list)
    step_cpu_s: list[float] = field(default_factory=list)
    infer_s: list[float] = field(default_factory=list)
    peak_step_bytes: int | None = None
    state_bytes: int | None = None


# ---------------------------------------------------------------------------------------------
# Building the rows
# ---------------------------------------------------------------------------------------------


def _registered(architecture: str) -> bool:
    from sae_lens import registry

    from sae_adaptive_plugin.loader import load_plugins

    load_plugins()
    return architecture in registry.SAE_TRAINING_CLASS_REGISTRY


def _base_kwargs(cfg: BenchConfig) -> dict[str, Any]:
    return {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": cfg.device}


def _build_topk(cfg: BenchConfig, x: Any) -> list[_Row]:
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=cfg.k, **_base_kwargs(cfg)))
    return [_Row("topk", "topk", None, settings={"k": cfg.k}, train_sae=sae, mean_k=cfg.k)]


def _build_hierarchical(cfg: BenchConfig, x: Any) -> list[_Row]:
    from sae_lens.registry import get_sae_training_class

    sae_cls, cfg_cls = get_sae_training_class("hierarchical_topk")
    sae = sae_cls(cfg_cls(k=cfg.k, **_base_kwargs(cfg)))
    return [
        _Row(
            "hierarchical_topk",
            "hierarchical_topk",
            None,
            settings={"K": cfg.k},
            train_sae=sae,
            mean_k=cfg.k,
        )
    ]


def _build_adaptivek(cfg: BenchConfig, x: Any) -> list[_Row]:
    import torch
    from sae_lens.registry import get_sae_training_class

    from sae_adaptive_plugin.probe import ComplexityProbe

    k_min = max(1, cfg.k // 4)
    k_max = 2 * cfg.k - k_min
    sae_cls, cfg_cls = get_sae_training_class("adaptivek")
    sae = sae_cls(cfg_cls(k_min=k_min, k_max=k_max, probe_warmup_steps=1, **_base_kwargs(cfg)))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    w = torch.randn(cfg.d_in, generator=gen) / math.sqrt(cfg.d_in)
    c = x.detach().float().cpu() @ w
    mean, std = float(c.mean()), float(c.std()) if c.numel() > 1 else 1.0
    std = std if std > 0 else 1.0
    sae.set_probe(ComplexityProbe(w, 0.0, mean - 2 * std, mean + 2 * std))
    settings = {"k_min": k_min, "k_max": k_max, "probe": "random direction, range mean ± 2 std"}
    return [_Row("adaptivek", "adaptivek", None, settings=settings, train_sae=sae)]


def _softsae_phase_steps(sae_cfg: Any) -> tuple[int, int]:
    """(a step of the soft phase after the ``K_t`` and ``α`` anneals, the first hard step)."""
    hard = int(sae_cfg.hard_topk_start_step)
    soft = max(
        int(getattr(sae_cfg, "k_anneal_steps", 0)), int(getattr(sae_cfg, "alpha_anneal_steps", 0))
    )
    soft = min(soft, hard - 1)
    return max(0, soft), hard


def _build_softsae(cfg: BenchConfig, x: Any) -> list[_Row]:
    import torch
    from sae_lens.registry import get_sae_training_class

    sae_cls, cfg_cls = get_sae_training_class("softsae")
    rows = []
    for phase in ("soft", "hard"):
        sae_cfg = cfg_cls(
            k=cfg.k,
            k_max=2 * cfg.k,
            k_anneal_steps=10,
            alpha_anneal_steps=20,
            hard_topk_start_step=100,
            **_base_kwargs(cfg),
        )
        sae = sae_cls(sae_cfg)
        soft_step, hard_step = _softsae_phase_steps(sae_cfg)
        # k̂ is continuous; the hard phase keeps ⌊k̂⌋, so centre k̂ on k + ½
        _center_softsae_estimator(sae, x, cfg.k + (0.5 if phase == "hard" else 0.0))
        settings = {
            "k": cfg.k,
            "k_max": sae_cfg.k_max,
            "k_estimator_hidden": getattr(sae_cfg, "k_estimator_hidden", None),
            "n_training_steps": soft_step if phase == "soft" else hard_step,
        }
        mean_k = None
        if phase == "soft":  # the soft mask sums to k̂ per row: report the mean of k̂ itself
            with torch.no_grad():
                mean_k = float(sae.estimate_k_from_sae_in(sae.process_sae_in(x)).float().mean())
        rows.append(
            _Row(
                f"softsae_{phase}",
                "softsae",
                phase,
                settings=settings,
                train_sae=sae,
                step_index=settings["n_training_steps"],
                mean_k=mean_k,
            )
        )
    return rows


def _center_softsae_estimator(sae: Any, x: Any, k: float) -> None:
    """Set the k-estimator's output bias ``c₀`` so that its mean ``k̂`` on ``x`` is about ``k``.

    ``k̂ = clamp(k_max · σ(ℓ + c₀), 1, k_max)`` with ``ℓ = v · ReLU(U·sae_in + c)`` computed once;
    ``c₀`` by bisection (``k̂`` is increasing in it).
    """
    import torch

    with torch.no_grad():
        sae_in = sae.process_sae_in(x)
        hidden = torch.relu(sae_in @ sae.k_est_W_enc + sae.k_est_b_enc)
        logit = (hidden @ sae.k_est_w_out).float()
        k_max = float(sae.cfg.k_max)
        lo, hi = -50.0, 50.0
        for _ in range(60):
            mid = (lo + hi) / 2
            k_hat = (k_max * torch.sigmoid(logit + mid)).clamp(1.0, k_max)
            if float(k_hat.mean()) < k:
                lo = mid
            else:
                hi = mid
        sae.k_est_b_out.fill_((lo + hi) / 2)


#: row name -> (architecture that must be registered, builder of the rows it belongs to)
_BUILDERS: dict[str, tuple[str, Callable[[BenchConfig, Any], list[_Row]]]] = {
    "topk": ("topk", _build_topk),
    "hierarchical_topk": ("hierarchical_topk", _build_hierarchical),
    "softsae_soft": ("softsae", _build_softsae),
    "softsae_hard": ("softsae", _build_softsae),
    "adaptivek": ("adaptivek", _build_adaptivek),
}


def _build_rows(cfg: BenchConfig, x: Any) -> list[_Row]:
    rows: dict[str, _Row] = {}
    for name in ROW_NAMES:
        if name not in cfg.rows or name in rows:
            continue
        architecture, build = _BUILDERS[name]
        if not _registered(architecture):
            rows[name] = _Row(
                name,
                architecture,
                None,
                status="skipped",
                reason=f"architecture {architecture!r} is not registered in SAELens",
            )
            continue
        try:
            built = build(cfg, x)
        except Exception as e:  # a broken architecture is reported, the others still run
            rows[name] = _Row(name, architecture, None, status="error", reason=_describe(e))
            continue
        for row in built:
            rows[row.name] = row
    return [rows[name] for name in ROW_NAMES if name in rows and name in cfg.rows]


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _prepare(row: _Row, cfg: BenchConfig, x: Any) -> None:
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


def _train_step(row: _Row, x: Any, dead_mask: Any) -> Any:
    import torch
    from sae_lens.saes.sae import TrainStepInput

    sae = row.train_sae
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


def _timed_wall_cpu(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``."""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    result = fn()
    _sync(device)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    del result
    return elapsed, cpu


def _infer(row: _Row, x: Any) -> Any:
    import torch

    with torch.inference_mode():
        sae = row.infer_sae
        return sae.decode(sae.encode(x))


def _state_bytes(row: _Row) -> int:
    import torch

    total = sum(p.numel() * p.element_size() for p in row.train_sae.parameters())
    for state in row.optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def _peak_step_bytes(row: _Row, x: Any, dead_mask: Any, device: str) -> int:
    import torch

    if device.startswith("cuda"):
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = _train_step(row, x, dead_mask)
        del out
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    return _cpu_peak_bytes(lambda: _train_step(row, x, dead_mask))


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the bytes allocated (net of frees) by torch's CPU allocator while ``fn`` runs.

    Read from the ``[memory]`` events of a ``torch.profiler`` trace: each carries the allocator's
    running total of bytes allocated since profiling began (frees of tensors allocated before
    are not subtracted; the caller makes sure ``fn`` frees none it did not allocate).
    """
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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
    """Run the benchmark described by ``cfg``; returns the JSON-ready result (module docstring)."""
    import torch
    from tqdm import tqdm

    cfg.validate()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch, cfg.d_in, generator=gen).to(device=cfg.device, dtype=dtype)
    n_dead = round(cfg.dead_fraction * cfg.d_sae)
    dead_mask = torch.zeros(cfg.d_sae, dtype=torch.bool, device=cfg.device)
    dead_mask[:n_dead] = True

    rows = _build_rows(cfg, x)
    active = [r for r in rows if r.status == "ok"]
    for row in active:
        try:
            _prepare(row, cfg, x)
        except Exception as e:
            row.status, row.reason = "error", _describe(e)
    active = [r for r in rows if r.status == "ok"]

    n_infer = (cfg.warmup + cfg.steps) if cfg.inference else 0
    total = len(active) * (cfg.warmup + cfg.steps + n_infer + int(cfg.memory))
    bar = tqdm(total=total, desc="bench", file=sys.stderr, disable=not progress, leave=False)

    def guarded(row: _Row, fn: Callable[[], None]) -> None:
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
            guarded(row, lambda row=row: _timed(lambda: _train_step(row, x, dead_mask), cfg.device))
    for r in range(cfg.steps):
        order = active[r % len(active) :] + active[: r % len(active)] if active else []
        for row in order:
            bar.set_postfix_str(f"step {r + 1}/{cfg.steps} {row.name}")

            def measure_step(row: _Row = row) -> None:
                wall, cpu = _timed_wall_cpu(lambda: _train_step(row, x, dead_mask), cfg.device)
                row.step_s.append(wall)
                row.step_cpu_s.append(cpu)

            guarded(row, measure_step)

    if cfg.inference:
        for i in range(cfg.warmup + cfg.steps):
            order = active[i % len(active) :] + active[: i % len(active)] if active else []
            for row in order:
                bar.set_postfix_str(f"inference {row.name}")

                def measure(row: _Row = row, timed: bool = i >= cfg.warmup) -> None:
                    t = _timed(lambda: _infer(row, x), cfg.device)
                    if timed:
                        row.infer_s.append(t)

                guarded(row, measure)

    if cfg.memory:
        for row in active:
            bar.set_postfix_str(f"memory {row.name}")

            def measure_memory(row: _Row = row) -> None:
                row.peak_step_bytes = _peak_step_bytes(row, x, dead_mask, cfg.device)

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


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


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


def _result(cfg: BenchConfig, rows: list[_Row], encoder_s: float | None) -> dict[str, Any]:
    ref = next((r for r in rows if r.name == "topk" and r.status == "ok"), None)

    def median_ms(values: list[float]) -> float | None:
        return 1000.0 * statistics.median(values) if values else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    ref_step = median_ms(ref.step_s) if ref else None
    ref_cpu = median_ms(ref.step_cpu_s) if ref else None
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
                "peak_step_mib": mem,
                "memory_ratio": ratio(mem, ref_mem),
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
            "torch.cuda.max_memory_allocated above the step's start"
            if cfg.device.startswith("cuda")
            else "torch.profiler(profile_memory=True): peak net CPU-allocator bytes during the step"
        ),
        "encoder_bound_tokens_per_s": cfg.batch / encoder_s if encoder_s else None,
        "rows": out_rows,
    }


def format_threads_summary(results: list[dict[str, Any]]) -> str:
    """A Markdown table of each row's step ratio to TopK (wall and CPU time) and memory ratio,
    one column group per thread count (results of :func:`run_bench` at several ``threads``)."""
    threads = [r["config"]["threads"] for r in results]
    head = "| architecture | phase | " + " | ".join(
        f"step / TopK ({t} thr) | CPU time ({t} thr) | mem / TopK ({t} thr)" for t in threads
    )
    lines = [head + " |", "|---|---|" + "---|---|---|" * len(threads)]
    for i, row in enumerate(results[0]["rows"]):
        cells = []
        for result in results:
            other = result["rows"][i]
            cells += [
                _fmt(other["step_ratio"], ".2f"),
                _fmt(other["step_cpu_ratio"], ".2f"),
                _fmt(other["memory_ratio"], ".2f"),
            ]
        lines.append(
            f"| {row['architecture']} | {row['phase'] or ''} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def _thread_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(
            f"threads must be a comma-separated list of ints >= 1 (e.g. 1,2), got {text!r}"
        )
    return counts


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of a :func:`run_bench` result."""
    lines = [
        "| architecture | phase | mean k | step (ms) | step / TopK | step / TopK (CPU time) "
        "| peak step mem (MiB) | mem / TopK | inference (tokens/s) | inference / TopK |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        phase = row["phase"] or ""
        if row["status"] != "ok":
            lines.append(
                f"| {row['architecture']} | {phase} | {row['status']}: {row['reason']} "
                "| | | | | | | |"
            )
            continue
        lines.append(
            f"| {row['architecture']} | {phase} | {_fmt(row['mean_k'], '.1f')} "
            f"| {_fmt(row['step_ms'], '.0f')} | {_fmt(row['step_ratio'], '.2f')} "
            f"| {_fmt(row['step_cpu_ratio'], '.2f')} "
            f"| {_fmt(row['peak_step_mib'], '.0f')} | {_fmt(row['memory_ratio'], '.2f')} "
            f"| {_fmt(row['infer_tokens_per_s'], '.0f')} | {_fmt(row['infer_ratio'], '.2f')} |"
        )
    bound = result.get("encoder_bound_tokens_per_s")
    if bound:
        lines.append("")
        lines.append(f"Encoder-matmul bound (x @ W_enc alone): {bound:.0f} tokens/s.")
    return "\n".join(lines)


def _arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    parser.add_argument(
        "--d-in", type=int, default=d.d_in, help="input width (default %(default)s)"
    )
    parser.add_argument("--d-sae", type=int, default=d.d_sae, help="latents (default %(default)s)")
    parser.add_argument(
        "--k",
        type=int,
        default=d.k,
        help="TopK k = the adaptive SAEs' mean k (default %(default)s)",
    )
    parser.add_argument(
        "--batch", type=int, default=d.batch, help="tokens per step (default %(default)s)"
    )
    parser.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="(default %(default)s)")
    parser.add_argument("--device", default=d.device, help="cpu or cuda[:N] (default %(default)s)")
    parser.add_argument(
        "--steps", type=int, default=d.steps, help="timed steps per row (default %(default)s)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=d.warmup,
        help="untimed steps per row first (default %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=_thread_counts,
        default=[1, 2],
        help="torch.set_num_threads; a comma-separated list runs the bench once per count "
        "(default 1,2)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="(default %(default)s)")
    parser.add_argument(
        "--dead-fraction",
        type=float,
        default=d.dead_fraction,
        help="fraction of latents marked dead, so AuxK runs (default %(default)s: none)",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=ROW_NAMES,
        default=list(ROW_NAMES),
        help="rows to run (default: all)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--no-inference", action="store_true", help="skip inference throughput")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write results here")


@command(
    "bench",
    "step time, step memory and inference tokens/s of each architecture vs SAELens TopK",
    arguments=_arguments,
)
def _cmd_bench(args: argparse.Namespace) -> int:
    configs = [_config_from_args(args, threads) for threads in args.threads]
    try:
        for cfg in configs:
            cfg.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = []
    for cfg in configs:
        result = run_bench(cfg, progress=not args.no_progress)
        m = result["machine"]
        print(
            f"d_in={cfg.d_in} d_sae={cfg.d_sae} k={cfg.k} batch={cfg.batch} dtype={cfg.dtype} "
            f"device={cfg.device} ({m['device_name']}) threads={cfg.threads} steps={cfg.steps} "
            f"warmup={cfg.warmup}; torch {m['torch']}, sae_lens {m['sae_lens']}"
        )
        print(format_table(result))
        print()
        results.append(result)
    if len(results) > 1:
        print(format_threads_summary(results))
    if args.json is not None:
        data = results[0] if len(results) == 1 else {"schema": RUNS_SCHEMA, "runs": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2))
        print(f"wrote {args.json}")
    failed = any(r["status"] == "error" for result in results for r in result["rows"])
    return 1 if failed else 0


def _config_from_args(args: argparse.Namespace, threads: int) -> BenchConfig:
    return BenchConfig(
        d_in=args.d_in,
        d_sae=args.d_sae,
        k=args.k,
        batch=args.batch,
        dtype=args.dtype,
        device=args.device,
        steps=args.steps,
        warmup=args.warmup,
        threads=threads,
        seed=args.seed,
        dead_fraction=args.dead_fraction,
        rows=tuple(args.rows),
        memory=not args.no_memory,
        inference=not args.no_inference,
    )
