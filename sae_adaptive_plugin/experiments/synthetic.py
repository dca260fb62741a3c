"""Variable-complexity synthetic ground truth, built from SAELens's :mod:`sae_lens.synthetic`.

A :class:`~sae_lens.synthetic.FeatureDictionary` (the true dictionary) and an
:class:`~sae_lens.synthetic.ActivationGenerator` (Bernoulli firings with per-feature Zipfian
probabilities) with a per-sample *density gate* as its ``modify_activations`` hook: the gate draws
for every sample an expected number of active features ``λ`` in ``[min_l0, max_l0]``
(log-uniform or uniform) and keeps each firing with probability ``λ / max_l0``; the base
probabilities are scaled so that an ungated sample has ``max_l0`` active features on average. A
sample's true L0 therefore ranges from ~``min_l0`` to ~``max_l0`` and is kept for evaluation.
:func:`train_sae` trains any SAE on the stream with SAELens's ``SAETrainer``; :func:`evaluate_sae`
measures it against the truth.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from sae_lens.synthetic import (
    ActivationGenerator,
    FeatureDictionary,
    SyntheticActivationIterator,
    orthogonal_initializer,
)

from sae_adaptive_plugin.experiments.isolated_rng import IsolatedRNG
from sae_adaptive_plugin.experiments.registry_saes import (
    reconstruction_metrics,
    to_inference_sae,  # noqa: F401  (re-exported: scripts on the stream use it from here)
)
from sae_adaptive_plugin.registration.plugin import (
    ADAPTIVE_ARCHITECTURES,
    HIERARCHICAL_ARCHITECTURE,
)
from sae_adaptive_plugin.saes.config_checks import check_recipe
from sae_adaptive_plugin.stats import spearman  # noqa: F401  (re-exported, as above)

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


def synthetic_batches(
    batch: int, d_in: int, n_batches: int, device: Any = "cpu"
) -> list[torch.Tensor]:
    """``n_batches`` batches ``[batch, d_in]`` of a variable-complexity source with ``4·d_in``
    true features (no orthogonalisation, seed 0): a stream for speed runs at any width."""
    cfg = VariableComplexityConfig(
        num_features=4 * d_in, hidden_dim=d_in, max_l0=min(50.0, 2.0 * d_in), orthogonalize_steps=0
    )
    source = VariableComplexitySource(cfg, device=str(device))
    _, hidden, _ = source.sample(n_batches * batch, seed=0)
    return list(hidden.split(batch))


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
        b_dec_init_method: ``None`` (each SAE's own default: SAELens's start ``b_dec`` at
            zeros) or how every SAE of the comparison starts ``b_dec``: ``"zeros"`` or
            ``"mean"`` (the first batch's mean; SAELens's own SAEs, which have no such field,
            get the same start patched in, so the recipe is the same for all).
        auxk_rare_tokens: ``None`` (each SAE's own default: SAELens's dead-feature window only)
            or the ``auxk_rare_tokens`` of every SAE of the comparison (patched into SAELens's
            own SAEs likewise).
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
    b_dec_init_method: str | None = None
    auxk_rare_tokens: int | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and its allowed range."""
        check_recipe(self)
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


def evaluate_sae(
    sae: Any,
    hidden: torch.Tensor,
    feature_acts: torch.Tensor,
    true_features: torch.Tensor,
    batch_size: int = 4096,
) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics of an inference SAE on a held-out set; returns (metrics, per-sample SAE L0).

    :func:`~sae_adaptive_plugin.experiments.registry_saes.reconstruction_metrics` plus MCC,
    SAELens's Hungarian-matched ``mean_correlation_coefficient`` of decoder rows against the
    true dictionary. ``feature_acts`` (the true activations) is not used; the caller compares the
    L0 it returns with the true L0.
    """
    from sae_lens.synthetic import mean_correlation_coefficient

    del feature_acts
    metrics, l0 = reconstruction_metrics(sae, hidden, batch_size)
    metrics["mcc"] = float(mean_correlation_coefficient(sae.W_dec.detach(), true_features))
    return metrics, l0


def train_sae(sae: Any, source: VariableComplexitySource, cfg: Any) -> float:
    """Train with SAELens's ``SAETrainer`` on the seeded stream (``cfg``: a ``CompareConfig``);
    returns wall seconds."""
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
