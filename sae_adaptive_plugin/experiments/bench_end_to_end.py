"""``sae-adaptive bench --end-to-end N``: whole training runs, as users run them, timed side by side.

Each architecture with its defaults (only ``k`` set) trains ``N`` steps through SAELens's own
``SAETrainer`` (AuxK on: its dead-feature window is a quarter of the run, so latents that stop
firing count as dead), on the same batches of the package's variable-complexity synthetic source;
EleutherAI sparsify's ``SparseCoder``, when installed, runs its own step (:mod:`.bench_peers`) on
those batches for ``N`` steps, with a dead mask from the same window. Reported per run: wall and
process CPU seconds of the whole run, the ratios to SAELens's TopK and to sparsify, the last loss
and the latents dead at the end. Runs go one after another: on a shared machine compare the CPU
time. Nothing here is asserted on timings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from sae_adaptive_plugin.reporting import markdown_table

#: The runs, in table order; ``topk`` (the reference) first.
END_TO_END_RUNS = ("topk", "sparsify_topk", "hierarchical_topk", "softsae", "adaptivek")


@dataclass
class EndToEndConfig:
    d_in: int = 576
    d_sae: int = 4608
    k: int = 32
    batch: int = 1024
    steps: int = 200
    threads: int = 1
    seed: int = 0
    lr: float = 3e-4
    autocast: bool = False
    n_batches: int = 16

    def validate(self) -> None:
        for name in ("d_in", "d_sae", "k", "batch", "steps", "threads", "n_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.steps < 8:
            raise ValueError(
                f"--end-to-end must be >= 8 steps (the defaults' schedules), got {self.steps}"
            )
        if 4 * self.k > self.d_sae:
            raise ValueError(
                f"k must be at most d_sae/4 = {self.d_sae // 4} (AdaptiveK's default k_max = 4k), "
                f"got {self.k}"
            )

    @property
    def dead_window(self) -> int:
        return max(2, self.steps // 4)


def _stream(pool: list[Any]) -> Iterator[Any]:
    i = 0
    while True:
        yield pool[i % len(pool)]
        i += 1


def _run_sae_lens(architecture: str, cfg: EndToEndConfig, pool: list[Any]) -> dict[str, Any]:
    import torch
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(cfg.seed)
    sae_class, cfg_class = get_sae_training_class(architecture)
    sae = sae_class(cfg_class(d_in=cfg.d_in, d_sae=cfg.d_sae, k=cfg.k))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch,
        train_batch_size_samples=cfg.batch,
        lr=cfg.lr,
        lr_end=cfg.lr,
        device="cpu",
        autocast=cfg.autocast,
        dead_feature_window=cfg.dead_window,
        feature_sampling_window=10 * cfg.steps,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=2,
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=_stream(pool))
    losses: list[float] = []
    inner = trainer._train_step

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        out = inner(*args, **kwargs)
        losses.append(out.loss.detach())
        return out

    trainer._train_step = recording_step  # type: ignore[method-assign]
    c0, t0 = time.process_time(), time.perf_counter()
    trainer.fit()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "loss_last": float(losses[-1]) if losses else None,
        "dead": int(trainer.dead_neurons.sum()),
        "steps": len(losses),
    }


def _run_sparsify(cfg: EndToEndConfig, pool: list[Any]) -> dict[str, Any]:
    import contextlib

    import torch

    from sae_adaptive_plugin.experiments.bench_peers import SparsifyPeer

    torch.manual_seed(cfg.seed)
    peer = SparsifyPeer(cfg.d_in, cfg.d_sae, cfg.k, torch.float32, "cpu")
    optimizer = torch.optim.Adam(peer.parameters(), lr=cfg.lr)
    peer.attach_optimizer(optimizer)
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
    batches = _stream(pool)
    loss = None
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(cfg.steps):
        x = next(batches)
        dead = since_fired > cfg.dead_window
        context = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if cfg.autocast
            else contextlib.nullcontext()
        )
        with context:
            out = peer.coder(x, dead_mask=dead)
            loss = out.fvu + out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        fired = torch.zeros(cfg.d_sae, dtype=torch.bool)
        fired[out.latent_indices.reshape(-1)] = True
        since_fired += 1
        since_fired[fired] = 0
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "loss_last": float(loss) if loss is not None else None,
        "dead": int((since_fired > cfg.dead_window).sum()),
        "steps": cfg.steps,
    }


def run_end_to_end(cfg: EndToEndConfig) -> dict[str, Any]:
    """Every run of :data:`END_TO_END_RUNS` (a missing peer or a failing run is reported, the
    others still run); ratios of wall and CPU seconds to TopK's and to sparsify's."""
    import torch

    from sae_adaptive_plugin.experiments.bench_peers import sparsify_available
    from sae_adaptive_plugin.experiments.synthetic import synthetic_batches

    cfg.validate()
    torch.set_num_threads(cfg.threads)
    pool = synthetic_batches(cfg.batch, cfg.d_in, cfg.n_batches)
    rows = []
    for name in END_TO_END_RUNS:
        row: dict[str, Any] = {"name": name, "status": "ok"}
        try:
            if name == "sparsify_topk":
                if not sparsify_available():
                    row.update(status="skipped", reason="eai-sparsify is not installed")
                else:
                    row.update(_run_sparsify(cfg, pool))
            else:
                row.update(_run_sae_lens(name, cfg, pool))
        except Exception as e:  # reported; the other runs still go
            row.update(status="error", reason=f"{type(e).__name__}: {e}")
        rows.append(row)
    by_name = {r["name"]: r for r in rows if r["status"] == "ok"}
    for row in rows:
        for ref, suffix in (("topk", "topk"), ("sparsify_topk", "sparsify")):
            for key in ("wall_s", "cpu_s"):
                a, b = row.get(key), by_name.get(ref, {}).get(key)
                row[f"{key}_per_{suffix}"] = a / b if a is not None and b else None
    return {"config": asdict(cfg), "rows": rows}


TABLE_COLUMNS = (
    ("run", "name", "{}"),
    ("steps", "steps", "{}"),
    ("wall s", "wall_s", "{:.1f}"),
    ("CPU s", "cpu_s", "{:.1f}"),
    ("wall / TopK", "wall_s_per_topk", "{:.2f}"),
    ("CPU / TopK", "cpu_s_per_topk", "{:.2f}"),
    ("wall / sparsify", "wall_s_per_sparsify", "{:.2f}"),
    ("CPU / sparsify", "cpu_s_per_sparsify", "{:.2f}"),
    ("last loss (own units)", "loss_last", "{:.4g}"),
    ("dead at the end", "dead", "{}"),
)


def format_end_to_end(result: dict[str, Any]) -> str:
    """The runs as a Markdown table (a run that did not finish shows its status)."""

    def cell(row: Any, key: str, fmt: str) -> str:
        if row["status"] != "ok" and key not in ("name",):
            return f"{row['status']}: {row.get('reason')}" if key == "steps" else ""
        value = row.get(key)
        return "–" if value is None else fmt.format(value)

    return markdown_table(result["rows"], TABLE_COLUMNS, cell=cell)
