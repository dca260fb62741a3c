"""Variable-complexity synthetic ground truth and the ``sae-adaptive compare`` runner.

The data source is built from SAELens's :mod:`sae_lens.synthetic` parts: a
:class:`~sae_lens.synthetic.FeatureDictionary` (the true dictionary), an
:class:`~sae_lens.synthetic.ActivationGenerator` (Bernoulli firings with per-feature Zipfian
probabilities) and a per-sample *density gate* plugged in as the generator's
``modify_activations`` hook. The gate draws, for every sample, an expected number of active
features ``λ`` log-uniformly in ``[min_l0, max_l0]`` and keeps each firing with probability
``λ / max_l0``; the base probabilities are scaled so that an ungated sample has ``max_l0`` active
features on average. The true L0 of a sample (its number of non-zero true features) therefore
ranges from ~``min_l0`` to ~``max_l0`` and is kept for evaluation.

The compare runner trains each architecture with SAELens's own :class:`SAETrainer` on the same
stream (an RNG-isolated :class:`~sae_lens.synthetic.SyntheticActivationIterator`), the same
step budget and the same hyper-parameters, then evaluates the *inference* SAE (saved with
``save_inference_model`` and reloaded with ``SAE.load_from_disk``, so BatchTopK is judged as
the JumpReLU SAE it is saved as) on one held-out set with known true features.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens.synthetic import (
    ActivationGenerator,
    FeatureDictionary,
    SyntheticActivationIterator,
    orthogonal_initializer,
)

from sae_adaptive_plugin.registration.plugin import (
    ADAPTIVE_ARCHITECTURES,
    HIERARCHICAL_ARCHITECTURE,
)
from sae_adaptive_plugin.stats import spearman

# --------------------------------------------------------------------------------------------
# Ground-truth source
# --------------------------------------------------------------------------------------------


#: Distributions of a sample's expected true L0 (``VariableComplexityConfig.complexity``).
COMPLEXITY_DISTRIBUTIONS = ("loguniform", "uniform")


@dataclass
class VariableComplexityConfig:
    """Parameters of the variable-complexity synthetic source.

    Attributes:
        num_features: number of true features (rows of the true dictionary).
        hidden_dim: dimension of the dense activations (the SAE's ``d_in``).
        min_l0: expected number of active features of the sparsest samples.
        max_l0: expected number of active features of the densest samples.
        zipf_exponent: per-feature firing probabilities fall as ``rank ** -zipf_exponent``
            (0 = all features equally frequent).
        magnitude_mean: mean firing magnitude of a true feature.
        magnitude_std: standard deviation of the firing magnitude (ReLU'd at 0).
        orthogonalize_steps: steps of SAELens's dictionary orthogonalisation (0 = random unit
            vectors).
        complexity: how a sample's expected true L0 is drawn from ``[min_l0, max_l0]``:
            ``"loguniform"`` (many sparse samples, few dense ones) or ``"uniform"``.
        shared_component: cosine of every true feature with one common direction ``u`` (0 = none).
            Language-model activations are anisotropic in this way; it makes a sample's
            complexity (its number of active features) linearly readable along ``u``.
        seed: seed of the dictionary and of the firing probabilities.
    """

    num_features: int = 256
    hidden_dim: int = 64
    min_l0: float = 2.0
    max_l0: float = 50.0
    zipf_exponent: float = 0.5
    magnitude_mean: float = 1.0
    magnitude_std: float = 0.25
    orthogonalize_steps: int = 100
    shared_component: float = 0.3
    complexity: str = "loguniform"
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and its allowed range."""
        if self.num_features < 2:
            raise ValueError(f"num_features must be >= 2, got {self.num_features}")
        if self.hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {self.hidden_dim}")
        if not self.min_l0 > 0:
            raise ValueError(f"min_l0 must be > 0, got {self.min_l0}")
        if not self.min_l0 <= self.max_l0 <= self.num_features:
            raise ValueError(
                f"max_l0 must be in [min_l0, num_features] = [{self.min_l0}, "
                f"{self.num_features}], got {self.max_l0}"
            )
        if self.zipf_exponent < 0:
            raise ValueError(f"zipf_exponent must be >= 0, got {self.zipf_exponent}")
        if self.magnitude_mean <= 0:
            raise ValueError(f"magnitude_mean must be > 0, got {self.magnitude_mean}")
        if self.magnitude_std < 0:
            raise ValueError(f"magnitude_std must be >= 0, got {self.magnitude_std}")
        if self.orthogonalize_steps < 0:
            raise ValueError(f"orthogonalize_steps must be >= 0, got {self.orthogonalize_steps}")
        if self.complexity not in COMPLEXITY_DISTRIBUTIONS:
            raise ValueError(
                f"complexity must be one of {COMPLEXITY_DISTRIBUTIONS}, got {self.complexity!r}"
            )
        if not 0 <= self.shared_component < 1:
            raise ValueError(f"shared_component must be in [0, 1), got {self.shared_component}")


def _scaled_firing_probabilities(num_features: int, exponent: float, total: float) -> torch.Tensor:
    """Zipfian probabilities ``min(1, c · rank^-exponent)`` with ``c`` chosen so they sum to ``total``."""
    ranks = torch.arange(1, num_features + 1, dtype=torch.float64)
    base = ranks ** (-exponent)
    lo, hi = 0.0, total / base.min().item() + 1.0
    for _ in range(200):  # bisection on c; the sum is monotone in c
        mid = 0.5 * (lo + hi)
        if (mid * base).clamp(max=1.0).sum().item() < total:
            lo = mid
        else:
            hi = mid
    return (hi * base).clamp(max=1.0).to(torch.float32)


@torch.no_grad()
def _add_shared_component(feature_dict: FeatureDictionary, cosine: float, seed: int) -> None:
    """Rotate every feature so that its cosine with one seeded unit direction is ``cosine``."""
    vectors = feature_dict.feature_vectors.data
    generator = torch.Generator(device=vectors.device).manual_seed(seed + 7919)
    u = torch.randn(vectors.shape[1], generator=generator, device=vectors.device)
    u = u / u.norm()
    perp = vectors - (vectors @ u)[:, None] * u[None, :]
    perp = perp / perp.norm(dim=1, keepdim=True).clamp(min=1e-8)
    feature_dict.feature_vectors.data = math.sqrt(1 - cosine**2) * perp + cosine * u[None, :]


class DensityGate:
    """Per-sample density gate: an ``ActivationGenerator`` ``modify_activations`` hook.

    For each sample it draws ``λ`` log-uniformly (or uniformly) in ``[min_l0, max_l0]`` and keeps
    each firing feature with probability ``λ / max_l0`` (the base firings already have ``max_l0``
    active features on average), so a sample's expected true L0 is ``λ``. A sample left with no
    feature keeps one of its firings at random, so every true L0 is at least 1.
    """

    def __init__(self, min_l0: float, max_l0: float, distribution: str = "loguniform") -> None:
        self.min_l0 = float(min_l0)
        self.max_l0 = float(max_l0)
        self.distribution = distribution

    def __call__(self, feature_acts: torch.Tensor) -> torch.Tensor:
        batch = feature_acts.shape[0]
        u = torch.rand(batch, 1, device=feature_acts.device)
        if self.distribution == "uniform":
            expected_l0 = self.min_l0 + u * (self.max_l0 - self.min_l0)
        else:
            log_lo, log_hi = math.log(self.min_l0), math.log(self.max_l0)
            expected_l0 = torch.exp(log_lo + u * (log_hi - log_lo))
        fired = feature_acts != 0
        keep = fired & (torch.rand_like(feature_acts) < expected_l0 / self.max_l0)
        # every sample keeps at least one feature (a zero activation has nothing to explain)
        empty = ~keep.any(dim=-1) & fired.any(dim=-1)
        if empty.any():
            pick = (torch.rand_like(feature_acts[empty]) * fired[empty]).argmax(dim=-1)
            keep[empty.nonzero(as_tuple=True)[0], pick] = True
        return feature_acts * keep


class VariableComplexitySource:
    """The true dictionary, the gated activation generator, and seeded sampling.

    All randomness of sampling goes through an RNG state owned by the caller (a seed), never
    the global one's current position, so the same seed gives the same samples whatever else
    ran before (SAE initialisation included).
    """

    def __init__(self, cfg: VariableComplexityConfig, device: str = "cpu") -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = device
        initializer = (
            orthogonal_initializer(num_steps=cfg.orthogonalize_steps)
            if cfg.orthogonalize_steps > 0
            else None
        )
        self.feature_dict = FeatureDictionary(
            cfg.num_features, cfg.hidden_dim, initializer=initializer, device=device, seed=cfg.seed
        )
        if cfg.shared_component > 0:
            _add_shared_component(self.feature_dict, cfg.shared_component, cfg.seed)
        self.feature_dict.eval()
        self.firing_probabilities = _scaled_firing_probabilities(
            cfg.num_features, cfg.zipf_exponent, cfg.max_l0
        )
        self.activation_generator = ActivationGenerator(
            cfg.num_features,
            firing_probabilities=self.firing_probabilities,
            std_firing_magnitudes=cfg.magnitude_std,
            mean_firing_magnitudes=cfg.magnitude_mean,
            modify_activations=DensityGate(cfg.min_l0, cfg.max_l0, cfg.complexity),
            device=device,
        )

    @property
    def true_features(self) -> torch.Tensor:
        """The true dictionary, ``[num_features, hidden_dim]`` unit rows."""
        return self.feature_dict.feature_vectors.detach()

    @torch.no_grad()
    def sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` samples drawn with ``seed``: (true feature acts, hidden acts, true L0 per row)."""
        with IsolatedRNG(seed, self.device):
            feature_acts = self.activation_generator.sample(n)
        hidden = self.feature_dict(feature_acts)
        true_l0 = (feature_acts != 0).sum(dim=-1)
        return feature_acts, hidden, true_l0

    def stream(self, batch_size: int, seed: int) -> SeededActivationIterator:
        """SAELens activation iterator over hidden activations, reproducible by ``seed``."""
        return SeededActivationIterator(self, batch_size, seed)


class SeededActivationIterator(SyntheticActivationIterator):
    """SAELens's :class:`SyntheticActivationIterator` with its own RNG state.

    Two iterators with the same seed yield the same batches, so every SAE in a comparison sees
    the same stream.
    """

    def __init__(self, source: VariableComplexitySource, batch_size: int, seed: int) -> None:
        super().__init__(source.feature_dict, source.activation_generator, batch_size)
        self._rng = IsolatedRNG(seed, source.device)

    @torch.no_grad()
    def next_batch(self) -> torch.Tensor:
        with self._rng:
            return super().next_batch()


class IsolatedRNG:
    """A private RNG stream: inside ``with``, torch's global RNG (CPU, and the CUDA device when
    ``device`` is CUDA) continues this object's own state; outside, the global state is untouched.
    """

    def __init__(self, seed: int, device: str | torch.device = "cpu") -> None:
        dev = torch.device(device)
        self._cuda: int | None = None
        if dev.type == "cuda":
            self._cuda = 0 if dev.index is None else dev.index
        with torch.random.fork_rng(devices=self._devices()):
            torch.manual_seed(seed)
            self._cpu_state = torch.get_rng_state()
            self._cuda_state = (
                torch.cuda.get_rng_state(self._cuda) if self._cuda is not None else None
            )
        self._fork: Any = None

    def _devices(self) -> list[int]:
        return [] if self._cuda is None else [self._cuda]

    def __enter__(self) -> IsolatedRNG:
        self._fork = torch.random.fork_rng(devices=self._devices())
        self._fork.__enter__()
        torch.set_rng_state(self._cpu_state)
        if self._cuda is not None:
            torch.cuda.set_rng_state(self._cuda_state, self._cuda)
        return self

    def __exit__(self, *exc: object) -> None:
        self._cpu_state = torch.get_rng_state()
        if self._cuda is not None:
            self._cuda_state = torch.cuda.get_rng_state(self._cuda)
        self._fork.__exit__(*exc)
        self._fork = None


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

#: Keys every result entry carries (``results.json`` schema); all values are finite numbers
#: except ``architecture``/``name`` (str) and ``k_eval`` (int or null).
RESULT_KEYS: tuple[str, ...] = (
    "name",
    "architecture",
    "k_eval",
    "explained_variance",
    "mse",
    "cosine_similarity",
    "l0_mean",
    "l0_std",
    "l0_p90",
    "dead_latents",
    "mcc",
    "l0_spearman_vs_true",
    "train_seconds",
)


@torch.no_grad()
def evaluate_sae(
    sae: Any,
    hidden: torch.Tensor,
    feature_acts: torch.Tensor,
    true_features: torch.Tensor,
    batch_size: int = 4096,
) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics of an inference SAE on a held-out set; returns (metrics, per-sample SAE L0).

    ``mse`` is the squared error summed over dimensions and averaged over samples, as in
    SAELens's ``run_evals``; explained variance uses SAELens's ``ExplainedVarianceCalculator``;
    dead latents use SAELens's ``DeadLatentsCalculator`` over the held-out set; MCC is SAELens's
    Hungarian-matched ``mean_correlation_coefficient`` of decoder rows against the true
    dictionary.
    """
    from sae_lens.evals import ExplainedVarianceCalculator
    from sae_lens.synthetic import DeadLatentsCalculator, mean_correlation_coefficient

    del feature_acts  # the true L0 is passed to the caller's Spearman; kept for symmetry
    sae.eval()
    ev = ExplainedVarianceCalculator()
    dead = DeadLatentsCalculator(sae.cfg.d_sae)
    l0_rows, sq_err, cos = [], [], []
    for start in range(0, hidden.shape[0], batch_size):
        x = hidden[start : start + batch_size]
        acts = sae.encode(x)
        x_hat = sae.decode(acts)
        ev.add_batch(x_hat, x)
        dead.add_batch(acts)
        l0_rows.append((acts != 0).sum(dim=-1).float())
        sq_err.append((x - x_hat).pow(2).sum(dim=-1))
        cos.append(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-8))
    l0 = torch.cat(l0_rows)
    metrics = {
        "explained_variance": float(ev.compute()),
        "mse": float(torch.cat(sq_err).mean()),
        "cosine_similarity": float(torch.cat(cos).mean()),
        "l0_mean": float(l0.mean()),
        "l0_std": float(l0.std()) if l0.numel() > 1 else 0.0,
        "l0_p90": float(l0.quantile(0.9)),
        "dead_latents": int(dead.compute()),
        "mcc": float(mean_correlation_coefficient(sae.W_dec.detach(), true_features)),
    }
    return metrics, l0


# --------------------------------------------------------------------------------------------
# Compare runner
# --------------------------------------------------------------------------------------------

FIXED_K_ARCHITECTURES: tuple[str, ...] = ("topk", "batchtopk", "matryoshka_batchtopk")
#: Training order: the adaptive SAEs first, so the fixed-k baselines can match their mean L0.
ALL_ARCHITECTURES: tuple[str, ...] = (
    *ADAPTIVE_ARCHITECTURES,
    *FIXED_K_ARCHITECTURES,
    HIERARCHICAL_ARCHITECTURE,
)


@dataclass
class CompareConfig:
    """One comparison: data, SAE width, step budget, optimiser and evaluation settings.

    Attributes:
        source: the synthetic ground truth.
        d_sae: SAE width (default: ``source.num_features``).
        steps: training steps per SAE (same for all).
        batch_size: training batch size (samples per step).
        lr: Adam learning rate (constant after ``lr_warm_up_steps``).
        target_l0: target mean L0 of the adaptive SAEs; default: the mean true L0 of the
            held-out set.
        eval_samples: held-out samples for evaluation.
        architectures: which to train, in training order (unregistered ones are skipped).
        hierarchical_k_fractions: HierarchicalTopK is trained with ``K = max_l0`` and evaluated
            at ``k' = round(f · K)`` for each fraction plus at the fixed baselines' ``k``.
        topk_sweep: also train a SAELens TopK at each of those ``k'`` (rows ``topk@k=…``), so
            every HierarchicalTopK budget has its TopK to compare with (``ev_gap_vs_topk``).
        seed: seed of the training stream (the held-out set uses ``seed + 1``) and of the SAE
            initialisations.
        device: torch device.
        overrides: per-architecture config fields applied over the compare's own settings
            (e.g. ``{"adaptivek": {"target_fvu": 0.3}}``).
    """

    source: VariableComplexityConfig = field(default_factory=VariableComplexityConfig)
    d_sae: int | None = None
    steps: int = 1000
    batch_size: int = 512
    lr: float = 2e-3
    lr_warm_up_steps: int = 50
    target_l0: float | None = None
    eval_samples: int = 8192
    architectures: tuple[str, ...] = ALL_ARCHITECTURES
    hierarchical_k_fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    topk_sweep: bool = True
    seed: int = 0
    device: str = "cpu"
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and its allowed range."""
        self.source.validate()
        if self.d_sae is not None and self.d_sae < 2:
            raise ValueError(f"d_sae must be >= 2, got {self.d_sae}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_warm_up_steps < 0:
            raise ValueError(f"lr_warm_up_steps must be >= 0, got {self.lr_warm_up_steps}")
        if self.eval_samples < 2:
            raise ValueError(f"eval_samples must be >= 2, got {self.eval_samples}")
        width = self.d_sae or self.source.num_features
        if self.target_l0 is not None and not 1 <= self.target_l0 <= width:
            raise ValueError(f"target_l0 must be in [1, d_sae={width}], got {self.target_l0}")
        try:
            device = torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"device: {self.device!r} is not a torch device ({err})") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {self.device!r} requested but CUDA is not available")
        unknown = [a for a in self.architectures if a not in ALL_ARCHITECTURES]
        if unknown:
            raise ValueError(
                f"architectures: unknown {unknown}; allowed: {', '.join(ALL_ARCHITECTURES)}"
            )
        if not self.hierarchical_k_fractions or any(
            not 0 < f <= 1 for f in self.hierarchical_k_fractions
        ):
            raise ValueError(
                "hierarchical_k_fractions must be non-empty, each in (0, 1], got "
                f"{self.hierarchical_k_fractions}"
            )

    @property
    def width(self) -> int:
        return self.d_sae or self.source.num_features


@dataclass
class CompareResult:
    """Everything a comparison produced: table rows, skipped architectures, data for plots."""

    rows: list[dict[str, Any]]
    skipped: dict[str, str]
    true_l0: torch.Tensor
    sae_l0: dict[str, torch.Tensor]
    fixed_k: int
    target_l0: float
    info: dict[str, Any]


def registered_training_architectures() -> set[str]:
    """Architectures SAELens can train right now (ours appear once their module registers)."""
    import sae_lens  # noqa: F401  (import runs the plugin autoload)
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    from sae_adaptive_plugin.registration.loader import load_plugins

    load_plugins()  # idempotent; covers interpreters where the .pth autoload did not run
    return set(SAE_TRAINING_CLASS_REGISTRY)


def _config_fields(cfg_class: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cfg_class)}


def architecture_settings(
    architecture: str, cfg: CompareConfig, target_l0: float, fixed_k: int
) -> dict[str, Any]:
    """Config fields for ``architecture`` in this comparison (only those its config has are used).

    Fixed-k baselines get ``k = fixed_k``; HierarchicalTopK is trained with ``K = max_l0``; the
    adaptive SAEs get only their target mean ``k = target_l0`` and otherwise their defaults, as a
    user would train them (schedules follow the run's length).
    """
    k_hi = max(2, min(cfg.width, math.ceil(cfg.source.max_l0)))
    width = cfg.width
    if architecture in ("topk", "batchtopk"):
        return {"k": fixed_k}
    if architecture == "matryoshka_batchtopk":
        widths = sorted({max(1, width // 8), max(1, width // 4), max(1, width // 2), width})
        return {"k": fixed_k, "matryoshka_widths": widths}
    if architecture == HIERARCHICAL_ARCHITECTURE:
        return {"k": k_hi}
    if architecture in ADAPTIVE_ARCHITECTURES:
        return {"k": max(1, round(target_l0))}
    raise ValueError(f"architecture: no compare settings for {architecture!r}")


def build_training_sae(
    architecture: str, cfg: CompareConfig, target_l0: float, fixed_k: int
) -> Any:
    """A fresh training SAE of ``architecture`` from SAELens's registry."""
    from sae_lens.registry import get_sae_training_class

    sae_class, cfg_class = get_sae_training_class(architecture)
    settings = architecture_settings(architecture, cfg, target_l0, fixed_k)
    allowed = _config_fields(cfg_class)
    kwargs = {k: v for k, v in settings.items() if k in allowed}
    for key, value in cfg.overrides.get(architecture, {}).items():
        if key not in allowed:
            raise ValueError(
                f"overrides[{architecture!r}]: {key!r} is not a field of {cfg_class.__name__}"
            )
        kwargs[key] = value
    sae_cfg = cfg_class(d_in=cfg.source.hidden_dim, d_sae=cfg.width, device=cfg.device, **kwargs)
    return sae_class(sae_cfg)


def train_sae(sae: Any, source: VariableComplexitySource, cfg: CompareConfig) -> float:
    """Train with SAELens's ``SAETrainer`` on the seeded stream; returns wall seconds."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=min(cfg.lr_warm_up_steps, max(0, cfg.steps - 1)),
        device=cfg.device,
        dead_feature_window=max(10, min(1000, cfg.steps // 5)),
        feature_sampling_window=max(10, cfg.steps),
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=10,
    )
    trainer = SAETrainer(
        cfg=trainer_cfg,
        sae=sae,
        data_provider=source.stream(cfg.batch_size, seed=cfg.seed),
    )
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


def to_inference_sae(training_sae: Any, path: Path) -> Any:
    """Save the inference form (safetensors + JSON) and load it back through SAELens."""
    from sae_lens import SAE

    training_sae.save_inference_model(str(path))
    return SAE.load_from_disk(str(path), device=str(training_sae.device))


def run_compare(
    cfg: CompareConfig,
    out_dir: Path,
    log: Callable[[str], None] = print,
) -> CompareResult:
    """Train every requested, registered architecture on one stream and evaluate each.

    Writes each inference SAE to ``out_dir/saes/<name>/``. Architectures not registered in
    SAELens are returned in ``skipped`` with the reason; any other failure propagates.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    registered = registered_training_architectures()
    skipped = {
        a: "not registered in SAELens (its sae_adaptive_plugin module is not in "
        "PACKAGE_ARCHITECTURES yet)"
        for a in cfg.architectures
        if a not in registered
    }
    # training order is fixed (adaptive SAEs first, so the fixed-k baselines can match them)
    to_run = [a for a in ALL_ARCHITECTURES if a in cfg.architectures and a in registered]

    torch.manual_seed(cfg.seed)
    source = VariableComplexitySource(cfg.source, device=cfg.device)
    feature_acts, hidden, true_l0 = source.sample(cfg.eval_samples, seed=cfg.seed + 1)
    true_l0_f = true_l0.float()
    target_l0 = cfg.target_l0 if cfg.target_l0 is not None else float(true_l0_f.mean())
    info = {
        "true_l0_mean": float(true_l0_f.mean()),
        "true_l0_std": float(true_l0_f.std()),
        "true_l0_min": int(true_l0.min()),
        "true_l0_max": int(true_l0.max()),
        "true_l0_p90": float(true_l0_f.quantile(0.9)),
        "target_l0": target_l0,
        "seed": cfg.seed,
    }
    log(
        f"true L0 on {cfg.eval_samples} held-out samples: mean {info['true_l0_mean']:.1f}, "
        f"std {info['true_l0_std']:.1f}, range [{info['true_l0_min']}, {info['true_l0_max']}]"
    )

    rows: list[dict[str, Any]] = []
    sae_l0: dict[str, torch.Tensor] = {}
    fixed_k = max(1, round(target_l0))
    adaptive_l0s: list[float] = []
    fixed_k_set = False

    for index, architecture in enumerate(to_run, start=1):
        if architecture not in ADAPTIVE_ARCHITECTURES and not fixed_k_set:
            # fixed-k baselines are matched to the adaptive SAEs' measured mean L0
            if adaptive_l0s:
                fixed_k = max(1, round(sum(adaptive_l0s) / len(adaptive_l0s)))
            fixed_k_set = True
            log(f"fixed-k baselines use k = {fixed_k}")
        torch.manual_seed(cfg.seed + 1000 * index)
        sae = build_training_sae(architecture, cfg, target_l0, fixed_k)
        log(f"[{index}/{len(to_run)}] training {architecture} for {cfg.steps} steps")
        seconds = train_sae(sae, source, cfg)
        inference = to_inference_sae(sae, out_dir / "saes" / architecture)
        if architecture == HIERARCHICAL_ARCHITECTURE:
            big_k = int(inference.cfg.k)
            ks = sorted(
                {max(1, round(f * big_k)) for f in cfg.hierarchical_k_fractions}
                | {min(fixed_k, big_k)}
            )
            for k_eval in ks:
                inference.cfg.k = k_eval
                metrics, l0 = evaluate_sae(inference, hidden, feature_acts, source.true_features)
                name = f"{architecture}@k={k_eval}"
                rows.append(_row(name, architecture, k_eval, metrics, l0, true_l0_f, seconds))
                sae_l0[name] = l0.cpu()
            inference.cfg.k = big_k
            if cfg.topk_sweep and "topk" in registered:
                _topk_sweep(cfg, source, ks, rows, (hidden, feature_acts, true_l0_f), out_dir, log)
        else:
            metrics, l0 = evaluate_sae(inference, hidden, feature_acts, source.true_features)
            k_eval = fixed_k if architecture in FIXED_K_ARCHITECTURES else None
            rows.append(_row(architecture, architecture, k_eval, metrics, l0, true_l0_f, seconds))
            sae_l0[architecture] = l0.cpu()
            if architecture in ADAPTIVE_ARCHITECTURES:
                adaptive_l0s.append(metrics["l0_mean"])
        last = rows[-1]
        log(
            f"    {last['name']}: EV {last['explained_variance']:.3f}, L0 {last['l0_mean']:.1f}"
            f" ± {last['l0_std']:.1f}, Spearman vs true L0 {last['l0_spearman_vs_true']:.3f},"
            f" {seconds:.1f}s"
        )
    add_gap_to_topk_curve(rows)
    return CompareResult(rows, skipped, true_l0_f.cpu(), sae_l0, fixed_k, target_l0, info)


def add_gap_to_topk_curve(rows: list[dict[str, Any]]) -> None:
    """Give every variable-L0 row ``ev_gap_vs_topk``: its explained variance minus the TopK
    curve's (SAELens TopKs trained at several k, linearly interpolated in mean L0) at the row's
    mean L0. Needs TopKs at two or more k; rows outside the curve's L0 range get none."""
    curve = sorted(
        (r["l0_mean"], r["explained_variance"])
        for r in rows
        if r["architecture"] in ("topk", "topk_sweep")
    )
    if len(curve) < 2:
        return
    for row in rows:
        if row["architecture"] in ("topk", "topk_sweep", HIERARCHICAL_ARCHITECTURE):
            continue
        l0 = row["l0_mean"]
        for (x0, y0), (x1, y1) in itertools.pairwise(curve):
            if x0 <= l0 <= x1:
                at = y0 if x1 == x0 else y0 + (y1 - y0) * (l0 - x0) / (x1 - x0)
                row["ev_gap_vs_topk"] = row["explained_variance"] - at
                break


def _topk_sweep(
    cfg: CompareConfig,
    source: VariableComplexitySource,
    ks: list[int],
    rows: list[dict[str, Any]],
    held_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    out_dir: Path,
    log: Callable[[str], None],
) -> None:
    """Train a SAELens TopK at each budget ``k`` and add ``ev_gap_vs_topk`` to the
    HierarchicalTopK row at that ``k`` (its EV minus the TopK's)."""
    hidden, feature_acts, true_l0 = held_out
    by_k = {r["k_eval"]: r for r in rows if r["architecture"] == "topk"}
    for k in ks:
        if k not in by_k:
            torch.manual_seed(cfg.seed + 7 * k)
            sae = build_training_sae("topk", cfg, float(k), k)
            log(f"    TopK sweep: training topk at k = {k}")
            seconds = train_sae(sae, source, cfg)
            inference = to_inference_sae(sae, out_dir / "saes" / f"topk_k{k}")
            metrics, l0 = evaluate_sae(inference, hidden, feature_acts, source.true_features)
            row = _row(f"topk@k={k}", "topk_sweep", k, metrics, l0, true_l0, seconds)
            rows.append(row)
            by_k[k] = row
        for r in rows:
            if r["architecture"] == HIERARCHICAL_ARCHITECTURE and r["k_eval"] == k:
                r["ev_gap_vs_topk"] = r["explained_variance"] - by_k[k]["explained_variance"]


def _row(
    name: str,
    architecture: str,
    k_eval: int | None,
    metrics: dict[str, float],
    l0: torch.Tensor,
    true_l0: torch.Tensor,
    seconds: float,
) -> dict[str, Any]:
    return {
        "name": name,
        "architecture": architecture,
        "k_eval": k_eval,
        **metrics,
        "l0_spearman_vs_true": spearman(l0, true_l0),
        "train_seconds": float(seconds),
    }


def iter_finite_problems(rows: Sequence[dict[str, Any]]) -> Iterator[str]:
    """Describe every missing key or non-finite number in result rows (empty when all fine)."""
    for row in rows:
        for key in RESULT_KEYS:
            if key not in row:
                yield f"{row.get('name', '?')}: missing {key}"
                continue
            value = row[key]
            if key in ("name", "architecture") or (key == "k_eval" and value is None):
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                yield f"{row['name']}: {key} = {value!r} is not a finite number"


def aggregate_seeds(results: Sequence[CompareResult]) -> CompareResult:
    """One result from several seeds' runs: each row's numbers are the mean over the seeds that
    have it, with ``<key>_std`` (population std) and ``n_seeds`` beside them; per-sample data
    (L0 scatter) are the first run's."""
    first = results[0]
    groups: dict[str, list[dict[str, Any]]] = {}  # by name, in order of first appearance
    for result in results:
        for row in result.rows:
            groups.setdefault(row["name"], []).append(row)
    rows = []
    for group in groups.values():
        row: dict[str, Any] = dict(group[0])
        for key, value in group[0].items():
            if key == "k_eval" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            values = torch.tensor([float(r[key]) for r in group if key in r], dtype=torch.float64)
            row[key] = float(values.mean())
            row[f"{key}_std"] = float(values.std(correction=0))
        row["n_seeds"] = len(group)
        rows.append(row)
    info = dict(first.info)
    for key in ("true_l0_mean", "true_l0_std", "true_l0_p90", "target_l0"):
        info[key] = float(sum(r.info[key] for r in results) / len(results))
    info["seeds"] = [r.info.get("seed") for r in results]
    return CompareResult(
        rows, first.skipped, first.true_l0, first.sae_l0, first.fixed_k, first.target_l0, info
    )
