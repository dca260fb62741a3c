"""SAEs of any architecture SAELens has registered, as the experiments build and measure them.

:func:`build_training_sae` makes a fresh training SAE from SAELens's registry: the experiment's
settings that the architecture's config has, then per-architecture overrides (each must be a
field; a ``"mean"`` ``b_dec_init_method`` and an ``auxk_rare_tokens`` setting reach SAELens's
own SAEs too).
:func:`reconstruction_metrics` measures an inference SAE on held-out activations:
explained variance (SAELens's ``ExplainedVarianceCalculator``), squared error summed over
dimensions and averaged over rows (as in ``run_evals``), cosine similarity, L0 mean / std / p90
and dead latents over the held-out set (SAELens's ``DeadLatentsCalculator``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: The first keys of every experiment's result row: which SAE, at which evaluated budget ``k_eval``
#: (``None`` for an SAE with one budget), and how well it reconstructs.
RESULT_ROW_HEAD: tuple[str, ...] = (
    "name",
    "architecture",
    "k_eval",
    "explained_variance",
    "mse",
    "cosine_similarity",
)


def registered_training_architectures() -> set[str]:
    """Architectures SAELens can train right now (ours appear once their module registers)."""
    import sae_lens  # noqa: F401  (import runs the plugin autoload)
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    from sae_adaptive_plugin.registration.loader import load_plugins

    load_plugins()  # idempotent; covers interpreters where the .pth autoload did not run
    return set(SAE_TRAINING_CLASS_REGISTRY)


#: Training-recipe settings a comparison can give every SAE alike (``None``: each SAE's own
#: default); SAELens's own SAEs, whose configs lack them, get them patched in.
RECIPE_SETTINGS = ("b_dec_init_method", "auxk_rare_tokens")


def recipe_settings(cfg: Any) -> dict[str, Any]:
    """The :data:`RECIPE_SETTINGS` that ``cfg`` (a comparison's config) sets."""
    return {k: getattr(cfg, k) for k in RECIPE_SETTINGS if getattr(cfg, k, None) is not None}


def copy_recipe_arguments(args: Any, cfg: Any) -> None:
    """Copy ``--b-dec-init-method`` and ``--auxk-rare-tokens`` from parsed ``args``, if given."""
    for name in RECIPE_SETTINGS:
        if getattr(args, name, None) is not None:
            setattr(cfg, name, getattr(args, name))


def build_training_sae(
    architecture: str,
    settings: dict[str, Any],
    overrides: dict[str, dict[str, Any]],
    **base: Any,
) -> Any:
    """A training SAE of ``architecture``: ``base`` fields (d_in, d_sae, device), the
    ``settings`` its config has, then ``overrides[architecture]`` (a non-field is an error)."""
    from sae_lens.registry import get_sae_training_class
    from sae_lens.util import filter_valid_dataclass_fields

    sae_class, cfg_class = get_sae_training_class(architecture)
    check_overrides({architecture: overrides.get(architecture, {})})
    valid = overrides.get(architecture, {})
    kwargs = {**filter_valid_dataclass_fields(settings, cfg_class), **valid}
    sae = sae_class(cfg_class(**base, **kwargs))
    if settings.get("b_dec_init_method") == "mean" and "b_dec_init_method" not in kwargs:
        start_b_dec_at_mean_like_ours(sae)
    if settings.get("auxk_rare_tokens") is not None and "auxk_rare_tokens" not in kwargs:
        count_rare_latents_dead_like_ours(sae, settings["auxk_rare_tokens"])
    return sae


def start_b_dec_at_mean_like_ours(sae: Any) -> None:
    """Give a training SAE whose config has no ``b_dec_init_method`` (SAELens's own TopK,
    BatchTopK, …) the adaptive SAEs' ``"mean"`` start, so that a comparison trains every SAE
    with the same recipe: its first training step first sets ``b_dec`` to the batch mean
    (:func:`~sae_adaptive_plugin.saes.topk_family.start_b_dec_at_batch_mean`)."""
    from sae_adaptive_plugin.saes.topk_family import start_b_dec_at_batch_mean

    step = sae.training_forward_pass

    def training_forward_pass(step_input: Any) -> Any:
        if step_input.n_training_steps == 0:
            start_b_dec_at_batch_mean(sae, step_input.sae_in)
        return step(step_input)

    sae.training_forward_pass = training_forward_pass


def count_rare_latents_dead_like_ours(sae: Any, every_tokens: int) -> None:
    """Give a training SAE whose config has no ``auxk_rare_tokens`` (SAELens's own TopK, …) the
    adaptive SAEs' criterion: each step's AuxK dead mask also holds the latents firing less than
    once per ``every_tokens`` tokens (:mod:`~sae_adaptive_plugin.saes.rare_latents`), counted
    from the step's ``feature_acts``."""
    from sae_adaptive_plugin.saes.rare_latents import RareLatents, firing_counts

    rare = RareLatents(every_tokens)
    step = sae.training_forward_pass

    def training_forward_pass(step_input: Any) -> Any:
        out = step(rare.step_input(step_input))
        rows = out.feature_acts.reshape(-1, sae.cfg.d_sae).shape[0]
        rare.record(firing_counts(out.feature_acts.detach()), rows)
        return out

    sae.training_forward_pass = training_forward_pass


def check_overrides(overrides: dict[str, dict[str, Any]]) -> None:
    """Raise ``ValueError`` naming the key unless every architecture of ``overrides`` is
    registered and every field is one of its training config's."""
    from dataclasses import fields

    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    known = registered_training_architectures()
    for architecture, extra in overrides.items():
        if architecture not in known:
            raise ValueError(
                f"--set: {architecture!r} is not a registered architecture ({sorted(known)})"
            )
        cfg_class = SAE_TRAINING_CLASS_REGISTRY[architecture][1]
        names = {f.name for f in fields(cfg_class)}
        for key in extra:
            if key not in names:
                raise ValueError(
                    f"--set: {architecture}.{key} is not a field of {cfg_class.__name__}"
                )


def to_inference_sae(training_sae: Any, path: Path) -> Any:
    """Save the inference form (safetensors + JSON) and load it back through SAELens."""
    from sae_lens import SAE

    training_sae.save_inference_model(str(path))
    return SAE.load_from_disk(str(path), device=str(training_sae.device))


@torch.no_grad()
def dead_latents(sae: Any, acts: torch.Tensor, batch_size: int = 4096) -> int:
    """Latents of an inference SAE that fire on none of the rows of ``acts [N, d_in]``."""
    from sae_lens.synthetic import DeadLatentsCalculator

    sae.eval()
    dead = DeadLatentsCalculator(sae.cfg.d_sae)
    for start in range(0, acts.shape[0], batch_size):
        dead.add_batch(sae.encode(acts[start : start + batch_size].to(sae.W_dec.device)))
    return int(dead.compute())


@torch.no_grad()
def reconstruction_metrics(
    sae: Any, acts: torch.Tensor, batch_size: int = 4096
) -> tuple[dict[str, float], torch.Tensor]:
    """``(metrics, per-row L0)`` of an inference SAE on held-out activations ``acts [N, d_in]``."""
    from sae_lens.evals import ExplainedVarianceCalculator
    from sae_lens.synthetic import DeadLatentsCalculator

    sae.eval()
    ev = ExplainedVarianceCalculator()
    dead = DeadLatentsCalculator(sae.cfg.d_sae)
    l0_rows, sq_err, cos = [], [], []
    device = sae.W_dec.device
    for start in range(0, acts.shape[0], batch_size):
        x = acts[start : start + batch_size].to(device)
        latents = sae.encode(x)
        x_hat = sae.decode(latents)
        ev.add_batch(x_hat, x)
        dead.add_batch(latents)
        l0_rows.append((latents != 0).sum(dim=-1).float().cpu())
        sq_err.append((x - x_hat).pow(2).sum(dim=-1).cpu())
        cos.append(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-8).cpu())
    l0 = torch.cat(l0_rows)
    metrics = {
        "explained_variance": float(ev.compute()),
        "mse": float(torch.cat(sq_err).mean()),
        "cosine_similarity": float(torch.cat(cos).mean()),
        "l0_mean": float(l0.mean()),
        "l0_std": float(l0.std()) if l0.numel() > 1 else 0.0,
        "l0_p90": float(l0.quantile(0.9)),
        "dead_latents": int(dead.compute()),
    }
    return metrics, l0
