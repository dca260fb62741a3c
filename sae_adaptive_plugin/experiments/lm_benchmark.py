"""``sae-adaptive compare --lm``: adaptive vs fixed-k SAEs on one layer of a real language model.

Activations of the decoder layer ``layer`` (SAELens's HF hook name ``model.layers.<layer>``, the
residual stream after that block) are cached on a training corpus — running only the first
``layer + 1`` blocks — and on a different, held-out corpus with the full model, keeping each
token's surprisal ``−log p(x_t | x_<t)`` beside its activation. Sequences are ``context_size``
tokens, a BOS token first; BOS positions are not used. Every SAE is trained by SAELens's
``SAETrainer`` on the same seeded batches of the training cache, saved in SAELens's inference
format and reloaded, then evaluated on the held-out tokens: explained variance, L0 mean/std,
dead latents (on the held-out tokens and on a fixed sample of training tokens), Spearman of
per-token L0 against surprisal / position / activation norm, and the CE-loss score
``(CE_zero − CE_sae) / (CE_zero − CE_clean)`` and KL(clean ‖ spliced) with the reconstruction
spliced into the full model at every non-BOS position.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_adaptive_plugin.experiments.lm_activations import (
    CachedBatches,
    cache_key,
    cached_activations,
    decoder_layers,
    documents_to_sequences,
    hook_name,
    layer_activations,
    load_causal_lm,
    splice_scores,
)
from sae_adaptive_plugin.experiments.registry_saes import RESULT_ROW_HEAD, recipe_settings
from sae_adaptive_plugin.saes.config_checks import check_recipe


@dataclass
class LMCompareConfig:
    """One real-model comparison (defaults: the ``make demo-lm`` run; its time: docs/compare_lm.md).

    Attributes:
        model: a ``.gguf`` file, a Hugging Face model folder, or a Hub name.
        layer: decoder layer whose output (residual stream) the SAEs read.
        text: training corpus file (see :mod:`sae_adaptive_plugin.data.corpus`).
        heldout_text: a different corpus for evaluation.
        train_tokens: training tokens cached (BOS excluded).
        heldout_tokens: held-out tokens cached and evaluated (BOS excluded).
        ce_tokens: held-out tokens (from the start) the CE/KL splice is run on.
        context_size: tokens per sequence, BOS included.
        d_sae: SAE width.
        k: target sparsity of the adaptive SAEs: SoftSAE's target mean L0; AdaptiveK's range
            ``[k/4, 4k]``.
        topk_sweep: TopK budgets trained for the curve, besides one TopK at each adaptive SAE's
            measured mean L0; HierarchicalTopK is trained at the largest and evaluated at all.
        steps, batch_size, lr: SAELens trainer budget, identical for every SAE.
        architectures: which of the six to train.
        seed, device, cache_dir: as named.
        overrides: per-architecture config fields (``{"adaptivek": {"target_fvu": 0.2}}``).
        b_dec_init_method: ``None`` (each SAE's own default) or how every SAE starts ``b_dec``
            (``"zeros"`` or ``"mean"``; SAELens's own SAEs get the same start patched in).
        auxk_rare_tokens: ``None`` (each SAE's own default) or every SAE's ``auxk_rare_tokens``
            (patched into SAELens's own SAEs likewise).
    """

    model: str = ""
    layer: int = 6
    text: str = ""
    heldout_text: str = ""
    train_tokens: int = 65_536
    heldout_tokens: int = 8_192
    ce_tokens: int = 2_048
    context_size: int = 128
    d_sae: int = 1024
    k: int = 32
    topk_sweep: tuple[int, ...] = (8, 16, 32, 64)
    steps: int = 256
    batch_size: int = 256
    lr: float = 2e-3
    architectures: tuple[str, ...] = ()
    seed: int = 0
    device: str = "cpu"
    cache_dir: str = "runs/lm_cache"
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    b_dec_init_method: str | None = None
    auxk_rare_tokens: int | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field."""
        check_recipe(self)
        from sae_adaptive_plugin.experiments.synthetic import ALL_ARCHITECTURES

        for name in ("model", "text", "heldout_text"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required")
        for name in ("text", "heldout_text"):
            if not Path(getattr(self, name)).is_file():
                raise ValueError(f"{name}: file {getattr(self, name)} does not exist")
        for name, low in (
            ("layer", 0),
            ("train_tokens", 1),
            ("heldout_tokens", 2),
            ("ce_tokens", 1),
            ("context_size", 3),
            ("d_sae", 2),
            ("k", 1),
            ("steps", 1),
            ("batch_size", 1),
        ):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not self.topk_sweep or any(not 1 <= k <= self.d_sae for k in self.topk_sweep):
            raise ValueError(
                f"topk_sweep: each k in [1, d_sae={self.d_sae}], got {self.topk_sweep}"
            )
        if self.k > self.d_sae:
            raise ValueError(f"k must be <= d_sae={self.d_sae}, got {self.k}")
        unknown = [a for a in self.architectures if a not in ALL_ARCHITECTURES]
        if unknown:
            raise ValueError(f"architectures: unknown {unknown}; allowed: {ALL_ARCHITECTURES}")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {self.device!r} requested but CUDA is not available")


# --------------------------------------------------------------------------------------------
# Training on cached activations
# --------------------------------------------------------------------------------------------


def sae_settings(architecture: str, cfg: LMCompareConfig, k: int) -> dict[str, Any]:
    """The fields this comparison sets: the target sparsity ``k`` (and Matryoshka's widths);
    everything else is the architecture's default, as a user would train it (the adaptive
    SAEs' schedules follow the run's length)."""
    settings: dict[str, Any] = {"normalize_activations": "expected_average_only_in", "k": k}
    settings.update(recipe_settings(cfg))
    if architecture == "matryoshka_batchtopk":
        w = cfg.d_sae
        settings["matryoshka_widths"] = sorted({w // 8, w // 4, w // 2, w})
    return settings


def build_sae(architecture: str, cfg: LMCompareConfig, d_in: int, k: int) -> Any:
    """A fresh training SAE from SAELens's registry with :func:`sae_settings` and overrides."""
    from sae_adaptive_plugin.experiments.registry_saes import build_training_sae

    return build_training_sae(
        architecture,
        sae_settings(architecture, cfg, k),
        cfg.overrides,
        d_in=d_in,
        d_sae=cfg.d_sae,
        device=cfg.device,
    )


def train_on_cache(sae: Any, acts: torch.Tensor, cfg: LMCompareConfig) -> float:
    """SAELens ``SAETrainer`` on :class:`CachedBatches`; returns wall seconds."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr,
        lr_warm_up_steps=min(50, cfg.steps - 1),
        device=cfg.device,
        dead_feature_window=max(10, min(1000, cfg.steps // 5)),
        feature_sampling_window=max(10, cfg.steps),
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=10,
    )
    batches = CachedBatches(acts, cfg.batch_size, cfg.seed, cfg.device)
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches)
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------

#: Training tokens (a fixed random sample) on which ``dead_latents_train`` counts latents that
#: never fire: the held-out text is another domain and short, so it counts more latents dead.
DEAD_SAMPLE_TOKENS = 65_536


def dead_latent_sample(train_acts: torch.Tensor) -> torch.Tensor:
    """The rows ``dead_latents_train`` is counted on: ``DEAD_SAMPLE_TOKENS`` training tokens
    drawn by a fixed generator, the same for every SAE and seed of a cache."""
    order = torch.randperm(train_acts.shape[0], generator=torch.Generator().manual_seed(0))
    return train_acts[order[:DEAD_SAMPLE_TOKENS]]


RESULT_KEYS: tuple[str, ...] = (
    *RESULT_ROW_HEAD,
    "ce_loss_score",
    "ce_loss",
    "kl_div",
    "l0_mean",
    "l0_std",
    "dead_latents",
    "dead_latents_train",
    "spearman_l0_surprisal",
    "spearman_l0_position",
    "spearman_l0_norm",
    "train_seconds",
)


@dataclass
class LMCompareResult:
    """Rows of the table, per-token data of the held-out set for plots, and run facts."""

    rows: list[dict[str, Any]]
    l0: dict[str, torch.Tensor]
    surprisal: torch.Tensor
    positions: torch.Tensor
    sample_tokens: list[str]
    info: dict[str, Any]


def run_lm_compare(
    cfg: LMCompareConfig,
    out_dir: Path,
    log: Callable[[str], None] = print,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> LMCompareResult:
    """Cache, train every requested architecture, evaluate; SAEs go to ``out_dir/saes/<name>``."""
    from sae_adaptive_plugin.data.corpus import read_documents
    from sae_adaptive_plugin.experiments.registry_saes import (
        dead_latents,
        reconstruction_metrics,
        registered_training_architectures,
        to_inference_sae,
    )
    from sae_adaptive_plugin.experiments.synthetic import ALL_ARCHITECTURES
    from sae_adaptive_plugin.registration.plugin import (
        ADAPTIVE_ARCHITECTURES,
        HIERARCHICAL_ARCHITECTURE,
    )
    from sae_adaptive_plugin.stats import spearman
    from sae_adaptive_plugin.training.config import ConfigError

    cfg.validate()
    out_dir = Path(out_dir)
    registered = registered_training_architectures()
    wanted = cfg.architectures or ALL_ARCHITECTURES
    to_run = [a for a in ALL_ARCHITECTURES if a in wanted and a in registered]
    t0 = time.perf_counter()
    hf_model, tokenizer = model_and_tokenizer or load_causal_lm(cfg.model, cfg.device)
    n_layers = len(decoder_layers(hf_model))
    if cfg.layer >= n_layers:
        raise ConfigError(
            f"layer must be < {n_layers} (the model's decoder layers), got {cfg.layer}: hook "
            f"{hook_name(cfg.layer)!r} is not a hook point of the model (nearest: "
            f"{hook_name(n_layers - 1)!r}; hooks {hook_name(0)!r} … {hook_name(n_layers - 1)!r})"
        )
    log(f"model {cfg.model}: {n_layers} layers, loaded in {time.perf_counter() - t0:.0f}s")

    def compute(text: str, n_tokens: int, full: bool, split: str):
        def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            docs = read_documents(text)
            tokens = documents_to_sequences(tokenizer, docs, n_tokens, cfg.context_size)
            acts, surprisal = layer_activations(
                hf_model, tokens, cfg.layer, with_surprisal=full, progress=f"caching {split}"
            )
            return tokens, acts, surprisal

        return run

    t_cache = time.perf_counter()
    caches = {}
    for split, text, n_tokens, full in (
        ("train", cfg.text, cfg.train_tokens, False),
        ("heldout", cfg.heldout_text, cfg.heldout_tokens, True),
    ):
        key = cache_key(cfg.model, cfg.layer, text, n_tokens, cfg.context_size, split)
        caches[split] = cached_activations(
            key, Path(cfg.cache_dir), compute(text, n_tokens, full, split), log
        )
    cache_seconds = time.perf_counter() - t_cache
    train_acts = caches["train"].acts[: cfg.train_tokens]
    dead_sample = dead_latent_sample(train_acts)
    held = caches["heldout"]
    held_acts = held.acts
    surprisal, positions = held.surprisal, held.positions.float()
    norms = held_acts.norm(dim=-1)
    d_in = held_acts.shape[1]
    width = getattr(getattr(hf_model, "config", None), "hidden_size", d_in)
    for cache in caches.values():  # before any training: a cache of another model's width
        if cache.acts.shape[1] != width:
            raise ConfigError(
                f"activation cache {cache.path}: rows are {cache.acts.shape[1]} wide but the "
                f"model's activations at hook {hook_name(cfg.layer)!r} are {width} wide; delete "
                "the file or use another --cache-dir"
            )

    rows: list[dict[str, Any]] = []
    l0s: dict[str, torch.Tensor] = {}
    splicers: dict[str, Any] = {}
    fixed_k = cfg.k

    def record(name: str, arch: str, k_eval: int | None, sae: Any, seconds: float) -> None:
        metrics, l0 = reconstruction_metrics(sae, held_acts)
        rows.append(
            {
                "name": name,
                "architecture": arch,
                "k_eval": k_eval,
                **metrics,
                "dead_latents_train": dead_latents(sae, dead_sample),
                "spearman_l0_surprisal": spearman(l0, surprisal),
                "spearman_l0_position": spearman(l0, positions),
                "spearman_l0_norm": spearman(l0, norms),
                "train_seconds": seconds,
            }
        )
        l0s[name] = l0
        log(
            f"    {name}: EV {metrics['explained_variance']:.3f}, L0 {metrics['l0_mean']:.1f} ± "
            f"{metrics['l0_std']:.1f}, Spearman(L0, surprisal) {rows[-1]['spearman_l0_surprisal']:.3f}"
        )

    def splicer(sae: Any, k_eval: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(x: torch.Tensor) -> torch.Tensor:
            if k_eval is not None and hasattr(sae.cfg, "k"):
                sae.cfg.k = k_eval
            return sae.decode(sae.encode(x.float()))

        return fn

    def train(arch: str, k: int, folder: str) -> tuple[Any, float]:
        nonlocal done
        done += 1
        torch.manual_seed(cfg.seed + 1000 * done)
        log(f"[{done}] training {arch} (k = {k}) for {cfg.steps} steps")
        sae = build_sae(arch, cfg, d_in, k)
        seconds = train_on_cache(sae, train_acts, cfg)
        return to_inference_sae(sae, out_dir / "saes" / folder), seconds

    done = 0
    # adaptive SAEs first; the fixed-k SAEs are then matched to their measured mean L0: TopK at
    # each adaptive SAE's L0 (besides the sweep), BatchTopK / Matryoshka at the mean of those
    matched_k: dict[str, int] = {}
    for arch in (a for a in to_run if a in ADAPTIVE_ARCHITECTURES):
        inference, seconds = train(arch, cfg.k, arch)
        record(arch, arch, None, inference, seconds)
        splicers[arch] = splicer(inference, None)
        matched_k[arch] = max(1, round(rows[-1]["l0_mean"]))
    if matched_k:
        fixed_k = max(1, round(sum(r["l0_mean"] for r in rows) / len(rows)))
    topk_ks = sorted({*cfg.topk_sweep, *matched_k.values()})
    for arch in (a for a in to_run if a not in ADAPTIVE_ARCHITECTURES):
        if arch == "topk":
            for k in topk_ks:
                inference, seconds = train(arch, k, f"topk_k{k}")
                record(f"topk@k={k}", arch, k, inference, seconds)
                splicers[f"topk@k={k}"] = splicer(inference, None)
        elif arch == HIERARCHICAL_ARCHITECTURE:
            inference, seconds = train(arch, max(topk_ks), arch)
            for k_eval in sorted({*topk_ks, fixed_k}):
                inference.cfg.k = k_eval
                name = f"{arch}@k={k_eval}"
                record(name, arch, k_eval, inference, seconds)
                splicers[name] = splicer(inference, k_eval)
            inference.cfg.k = max(topk_ks)
        else:
            inference, seconds = train(arch, fixed_k, arch)
            record(arch, arch, fixed_k, inference, seconds)
            splicers[arch] = splicer(inference, None)

    n_ce = max(1, min(held.tokens.shape[0], math.ceil(cfg.ce_tokens / (cfg.context_size - 1))))
    log(f"CE/KL: splicing {len(splicers)} SAEs into the model on {n_ce} held-out sequences")
    t_ce = time.perf_counter()
    scores = splice_scores(hf_model, held.tokens[:n_ce], cfg.layer, splicers)
    for row in rows:
        row.update(scores[row["name"]])
    sample = held.tokens[0]
    info = {
        "hook_name": hook_name(cfg.layer),
        "n_layers": n_layers,
        "d_in": d_in,
        "fixed_k": fixed_k,
        "matched_k": matched_k,
        "train_tokens": int(train_acts.shape[0]),
        "heldout_tokens": int(held_acts.shape[0]),
        "ce_tokens": int(n_ce * (cfg.context_size - 2)),
        "ce_loss_clean": scores["clean"]["ce_loss"],
        "ce_loss_zero_ablation": scores["zero"]["ce_loss"],
        "surprisal_mean": float(surprisal.mean()),
        "cache_seconds": cache_seconds,
        "cache_reused": {s: c.reused for s, c in caches.items()},
        "ce_seconds": time.perf_counter() - t_ce,
        "total_seconds": time.perf_counter() - t0,
    }
    return LMCompareResult(
        rows,
        l0s,
        surprisal,
        positions,
        [tokenizer.decode([int(t)]) for t in sample[1:]],
        info,
    )


def config_dict(cfg: LMCompareConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["topk_sweep"] = list(cfg.topk_sweep)
    d["architectures"] = list(cfg.architectures)
    return d
