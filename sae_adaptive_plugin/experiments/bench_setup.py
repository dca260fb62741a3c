"""The settings and the rows of ``sae-adaptive bench``: every architecture at the same shapes,
each with its defaults (only ``k`` set).

Rows: SAELens's ``topk`` at ``k`` (the reference); EleutherAI sparsify's TopK ``SparseCoder`` with
its own training step (``sparsify_topk``, the fastest peer; skipped unless installed);
``hierarchical_topk`` with ``K = k``; ``softsae`` in its soft phase (LapSum mask, after the
``K_t`` anneal) and its hard phase (per-row ``⌊k̂⌋``, ``k_max = 2k``), its output bias set so that
the batch's mean k is ``k``; ``adaptivek`` in its warm-up (top-``4k`` with its prefix loss,
labelling rows) and after it (a random-direction probe shifted so the batch's mean k is ``k``). By
default 10% of the latents are marked dead, so AuxK runs. An unavailable architecture is
``skipped``; a row that fails to build is ``error`` with its message.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Row names in table order; ``topk`` (the reference) must come first.
ROW_NAMES = (
    "topk",
    "sparsify_topk",
    "hierarchical_topk",
    "softsae_soft",
    "softsae_hard",
    "adaptivek_warmup",
    "adaptivek",
)
DTYPES = ("float32", "float64", "bfloat16", "float16")


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
    dead_fraction: float = 0.1
    autocast: bool = False
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


#: The shape fields of :class:`BenchConfig` that :func:`add_shape_arguments` exposes as flags.
SHAPE_FIELDS = ("d_in", "d_sae", "k", "batch")


def add_shape_arguments(parser: Any, defaults: BenchConfig | None = None) -> None:
    """``--d-in``, ``--d-sae``, ``--k`` and ``--batch`` on an ``argparse`` parser, defaulting to
    ``defaults``'s values (``BenchConfig()``'s); :func:`shape_from_args` reads them back."""
    d = defaults if defaults is not None else BenchConfig()
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


def shape_from_args(args: Any) -> dict[str, int]:
    """The :data:`SHAPE_FIELDS` of parsed :func:`add_shape_arguments` flags, as config fields."""
    return {name: getattr(args, name) for name in SHAPE_FIELDS}


def bench_inputs(cfg: BenchConfig) -> tuple[Any, Any]:
    """Validate ``cfg``, set torch's thread count and seed, and return the seeded input batch
    ``[batch, d_in]`` (``cfg.dtype`` on ``cfg.device``) and the dead-latent mask (the first
    ``dead_fraction · d_sae`` latents), as every bench row sees them."""
    import torch

    cfg.validate()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch, cfg.d_in, generator=gen)
    x = x.to(device=cfg.device, dtype=getattr(torch, cfg.dtype))
    dead_mask = torch.zeros(cfg.d_sae, dtype=torch.bool, device=cfg.device)
    dead_mask[: round(cfg.dead_fraction * cfg.d_sae)] = True
    return x, dead_mask


@dataclass
class BenchRow:
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
    peak_allocated_bytes: int | None = None
    state_bytes: int | None = None


def _registered(architecture: str) -> bool:
    from sae_adaptive_plugin.experiments.bench_peers import sparsify_available
    from sae_adaptive_plugin.experiments.registry_saes import registered_training_architectures

    if architecture == "sparsify":
        return sparsify_available()
    return architecture in registered_training_architectures()


def _base_kwargs(cfg: BenchConfig) -> dict[str, Any]:
    return {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": cfg.device}


def _build_topk(cfg: BenchConfig, x: Any) -> list[BenchRow]:
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=cfg.k, **_base_kwargs(cfg)))
    return [BenchRow("topk", "topk", None, settings={"k": cfg.k}, train_sae=sae, mean_k=cfg.k)]


def _build_hierarchical(cfg: BenchConfig, x: Any) -> list[BenchRow]:
    from sae_lens.registry import get_sae_training_class

    sae_cls, cfg_cls = get_sae_training_class("hierarchical_topk")
    sae = sae_cls(cfg_cls(k=cfg.k, **_base_kwargs(cfg)))
    return [
        BenchRow(
            "hierarchical_topk",
            "hierarchical_topk",
            None,
            settings={"K": cfg.k},
            train_sae=sae,
            mean_k=cfg.k,
        )
    ]


def _build_adaptivek(cfg: BenchConfig, x: Any) -> list[BenchRow]:
    """AdaptiveK with its defaults (only ``k``: ``k_min = 1``, ``k_max = 4k``) after the
    warm-up: a random-direction probe whose label range is the batch's mean ± 2 std, shifted so
    the batch's mean k is ``k`` (as the warm-up's fit does)."""
    import torch
    from sae_lens.registry import get_sae_training_class

    from sae_adaptive_plugin.ops.adaptive_k import shift_for_mean_k
    from sae_adaptive_plugin.probe import ComplexityProbe

    sae_cls, cfg_cls = get_sae_training_class("adaptivek")
    sae_cfg = cfg_cls(k=cfg.k, probe_warmup_steps=1, **_base_kwargs(cfg))
    sae = sae_cls(sae_cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    w = torch.randn(cfg.d_in, generator=gen) / math.sqrt(cfg.d_in)
    c = x.detach().float().cpu() @ w
    mean, std = float(c.mean()), float(c.std()) if c.numel() > 1 else 1.0
    std = std if std > 0 else 1.0
    lo, hi = mean - 2 * std, mean + 2 * std
    shift = shift_for_mean_k(c, lo, hi, sae_cfg.k_min, sae_cfg.k_max, sae_cfg.steepness, cfg.k)
    sae.set_probe(ComplexityProbe(w, 0.0, lo + shift, hi + shift))
    settings = {
        "k": cfg.k,
        "k_min": sae_cfg.k_min,
        "k_max": sae_cfg.k_max,
        "probe": "random direction, range mean ± 2 std shifted to mean k = k",
    }
    return [BenchRow("adaptivek", "adaptivek", "adaptive", settings=settings, train_sae=sae)]


#: The warm-up row's ``probe_warmup_steps``: long enough that its timed steps label rows.
_WARMUP_STEPS = 1_000_000


def _build_adaptivek_warmup(cfg: BenchConfig, x: Any) -> list[BenchRow]:
    """AdaptiveK with its defaults during its warm-up: top-``k_max`` (``4k``) with the
    prefix loss, in the second half, where every step also labels rows with ``k*``."""
    from sae_lens.registry import get_sae_training_class

    sae_cls, cfg_cls = get_sae_training_class("adaptivek")
    sae_cfg = cfg_cls(k=cfg.k, probe_warmup_steps=_WARMUP_STEPS, **_base_kwargs(cfg))
    settings = {"k": cfg.k, "k_max": sae_cfg.k_max, "warmup_loss": sae_cfg.warmup_loss}
    return [
        BenchRow(
            "adaptivek_warmup",
            "adaptivek",
            "warm-up",
            settings=settings,
            train_sae=sae_cls(sae_cfg),
            step_index=_WARMUP_STEPS - 2,
            mean_k=float(sae_cfg.k_max),
        )
    ]


def _build_sparsify(cfg: BenchConfig, x: Any) -> list[BenchRow]:
    import torch

    from sae_adaptive_plugin.experiments.bench_peers import SparsifyPeer

    peer = SparsifyPeer(cfg.d_in, cfg.d_sae, cfg.k, getattr(torch, cfg.dtype), cfg.device)
    settings = {"k": cfg.k, "loss": "fvu + auxk + multi_topk_fvu / 8", "decoder": "unit norm"}
    return [
        BenchRow("sparsify_topk", "sparsify", None, settings=settings, train_sae=peer, mean_k=cfg.k)
    ]


def _softsae_phase_steps(sae_cfg: Any) -> tuple[int, int]:
    """(a step of the soft phase after the ``K_t`` and ``α`` anneals, the second hard step:
    the first also checks the estimator's spread, once per run)."""
    hard = int(sae_cfg.hard_topk_start_step)
    soft = max(
        int(getattr(sae_cfg, "k_anneal_steps", 0)), int(getattr(sae_cfg, "alpha_anneal_steps", 0))
    )
    soft = min(soft, hard - 1)
    return max(0, soft), hard + 1


def _build_softsae(cfg: BenchConfig, x: Any) -> list[BenchRow]:
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
            # restarts at steps 100, 1100, …: the timed steps count firings, as in training
            resample_interval_steps=1000,
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
            BenchRow(
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
_BUILDERS: dict[str, tuple[str, Callable[[BenchConfig, Any], list[BenchRow]]]] = {
    "topk": ("topk", _build_topk),
    "hierarchical_topk": ("hierarchical_topk", _build_hierarchical),
    "softsae_soft": ("softsae", _build_softsae),
    "softsae_hard": ("softsae", _build_softsae),
    "adaptivek_warmup": ("adaptivek", _build_adaptivek_warmup),
    "adaptivek": ("adaptivek", _build_adaptivek),
    "sparsify_topk": ("sparsify", _build_sparsify),
}


def build_rows(cfg: BenchConfig, x: Any) -> list[BenchRow]:
    """A fresh, seeded training SAE for each of ``cfg.rows`` (unprepared: see ``prepare_row``)."""
    rows: dict[str, BenchRow] = {}
    for name in ROW_NAMES:
        if name not in cfg.rows or name in rows:
            continue
        architecture, build = _BUILDERS[name]
        if not _registered(architecture):
            rows[name] = BenchRow(
                name,
                architecture,
                None,
                status="skipped",
                reason=(
                    "eai-sparsify is not installed (make bench-peers)"
                    if architecture == "sparsify"
                    else f"architecture {architecture!r} is not registered in SAELens"
                ),
            )
            continue
        try:
            built = build(cfg, x)
        except Exception as e:  # a broken architecture is reported, the others still run
            rows[name] = BenchRow(name, architecture, None, status="error", reason=_describe(e))
            continue
        for row in built:
            rows[row.name] = row
    return [rows[name] for name in ROW_NAMES if name in rows and name in cfg.rows]


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
