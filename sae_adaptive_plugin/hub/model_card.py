"""The Hub repo's ``README.md``: one section per published SAE under a YAML front matter.

The front matter is read and written by ``huggingface_hub.ModelCard``; it keeps its keys and gets
``library_name: saelens`` and the union of the tags. Sections of other SAEs, and text a person
wrote, are kept.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sae_adaptive_plugin.provenance import PACKAGE_NAME, PROVIDER_VERSION_METADATA_KEY

_CARD_MARK = "<!-- sae-adaptive-plugin:card -->"
#: cfg.json fields every SAELens SAE has; the card lists the others as the architecture's settings.
_BASE_CFG_FIELDS = {
    "architecture",
    "d_in",
    "d_sae",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
    "metadata",
}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def training_summary(
    cfg: dict[str, Any], sparsity_path: str | Path | None = None
) -> dict[str, Any]:
    """The facts the model card shows, from ``cfg.json`` (and ``sparsity.safetensors``)."""
    meta = cfg.get("metadata") or {}
    details = meta.get("training_architecture_details") or {}
    summary: dict[str, Any] = {
        "architecture": cfg.get("architecture"),
        "training_architecture": meta.get("training_architecture"),
        "model": meta.get("model_name"),
        "hook": meta.get("hook_name"),
        "hook_head_index": meta.get("hook_head_index"),
        "dataset": meta.get("dataset_path"),
        "context_size": meta.get("context_size"),
        "d_in": cfg.get("d_in"),
        "d_sae": cfg.get("d_sae"),
        "dtype": cfg.get("dtype"),
        "normalize_activations": cfg.get("normalize_activations"),
        "sae_lens_version": meta.get("sae_lens_training_version") or meta.get("sae_lens_version"),
        "provider_version": meta.get(PROVIDER_VERSION_METADATA_KEY),
    }
    # architecture settings: every inference field beyond SAELens's base ones (k, k_max, …)
    settings = {k: v for k, v in cfg.items() if k not in _BASE_CFG_FIELDS}
    # k settings of the training config that the inference config does not carry
    for key, value in details.items():
        if key not in settings and (key == "k" or key.startswith("k_") or "_k" in key):
            settings[key] = value
    summary["settings"] = settings
    # metadata.l0 is the saved SAE's own only where it was measured after training (held-out
    # tokens, sae-adaptive train); otherwise it is SAELens's training-window mean (shown as such)
    heldout = meta.get("l0_heldout_tokens")
    if heldout and meta.get("l0") is not None:
        summary["l0"] = meta["l0"]
        summary["l0_source"] = f"the saved SAE on {heldout} held-out tokens after training"
        window = meta.get("l0_training_window")
    else:
        summary["l0"], summary["l0_source"] = None, None
        window = meta.get("l0")
    summary["l0_training_window"] = window
    summary["l0_window_source"] = "mean over the last feature-sparsity window of training"
    summary["dead_features"] = meta.get("num_dead_features")
    summary["dead_source"] = "from training: not fired within the dead-feature window"
    if sparsity_path is not None and Path(sparsity_path).is_file():
        from safetensors.torch import load_file

        log_sparsity = load_file(str(sparsity_path)).get("sparsity")
        if log_sparsity is not None:
            freq = 10.0 ** log_sparsity.double()
            if summary["l0_training_window"] is None:
                summary["l0_training_window"] = float(freq.sum())
                summary["l0_window_source"] = (
                    "sum of the feature firing frequencies of the last training window "
                    "(sparsity.safetensors)"
                )
            if summary["dead_features"] is None:
                summary["dead_features"] = int((log_sparsity <= -9.999).sum())
                summary["dead_source"] = "zero firing frequency in sparsity.safetensors"
    return summary


def _section(repo_id: str, sae_id: str, summary: dict[str, Any], provider: str | None) -> str:
    rows: list[tuple[str, str]] = []
    arch = f"`{summary['architecture']}`"
    if summary.get("training_architecture") not in (None, summary["architecture"]):
        arch += f" (trained as `{summary['training_architecture']}`)"
    rows.append(("architecture", arch))
    if provider:
        version = summary.get("provider_version")
        rows.append(("provided by", f"`{provider}`" + (f" {version}" if version else "")))
    for key, label in (
        ("model", "model"),
        ("hook", "hook"),
        ("hook_head_index", "hook head index"),
        ("dataset", "dataset"),
        ("context_size", "context size"),
    ):
        if summary.get(key) is not None:
            rows.append((label, f"`{summary[key]}`"))
    rows.append(("d_in / d_sae", f"{summary['d_in']} / {summary['d_sae']}"))
    if summary["settings"]:
        settings = ", ".join(f"`{k}={_fmt(v)}`" for k, v in summary["settings"].items())
        rows.append(("settings (k …)", settings))
    if summary.get("l0") is not None:
        rows.append(("L0", f"{_fmt(float(summary['l0']))} ({summary['l0_source']})"))
    if summary.get("l0_training_window") is not None:
        window = _fmt(float(summary["l0_training_window"]))
        note = f"{summary['l0_window_source']}; not the saved SAE's L0"
        rows.append(("training-window L0", f"{window} ({note})"))
    if summary.get("dead_features") is not None:
        dead = int(summary["dead_features"])
        share = f", {100.0 * dead / summary['d_sae']:.2f}%" if summary.get("d_sae") else ""
        rows.append(("dead features", f"{dead}{share} ({summary['dead_source']})"))
    for key, label in (("dtype", "dtype"), ("normalize_activations", "normalize_activations")):
        if summary.get(key) is not None:
            rows.append((label, f"`{summary[key]}`"))
    if summary.get("sae_lens_version"):
        rows.append(("SAELens", summary["sae_lens_version"]))
    if summary.get("converted_from"):
        rows.append(("published from", summary["converted_from"]))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    install = f"pip install {provider}" if provider else "pip install sae-lens"
    note = (
        f"  # {provider} registers `{summary['architecture']}` into SAELens when installed"
        if provider
        else ""
    )
    return (
        f"<!-- sae-adaptive-plugin:begin {sae_id} -->\n"
        f"## `{sae_id}`\n\n"
        f"```bash\n{install}\n```\n\n"
        f"| | |\n|---|---|\n{table}\n\n"
        f"```python\nfrom sae_lens import SAE{note}\n\n"
        f'sae = SAE.from_pretrained("{repo_id}", "{sae_id}")\n```\n'
        f"<!-- sae-adaptive-plugin:end {sae_id} -->\n"
    )


def _parse_card(text: str) -> Any:
    """``text`` as a ``ModelCard``; a README without a valid YAML front matter is all body."""
    import yaml
    from huggingface_hub import ModelCard

    if text.startswith("---"):
        try:
            return ModelCard(text, ignore_metadata_errors=True)
        except (ValueError, yaml.YAMLError):
            pass
    card = ModelCard("---\n{}\n---\n")
    card.text = text
    return card


def model_card(
    repo_id: str,
    sae_id: str,
    summary: dict[str, Any],
    existing: str | None = None,
    provider: str | None = None,
) -> str:
    """The repo's ``README.md`` with this SAE's section added or replaced.

    Sections of other SAEs in ``existing`` (and any text a person wrote there) are kept; the YAML
    front matter keeps its keys, gets ``library_name: saelens`` and the union of the tags.
    """
    card = _parse_card(existing or "")
    body = card.text.lstrip("\n")
    tags = card.data.tags or []
    tags = [str(tags)] if isinstance(tags, str) else [str(t) for t in tags]
    for tag in ("saelens", "sparse-autoencoder", PACKAGE_NAME, summary["architecture"]):
        if tag and tag not in tags:
            tags.append(tag)
    card.data.library_name = "saelens"
    card.data.tags = tags
    if _CARD_MARK not in body and body.strip():
        body = body.rstrip("\n") + f"\n\n{_CARD_MARK}\n"  # a person's README: append below it
    elif _CARD_MARK not in body:
        body = (
            f"{_CARD_MARK}\n# Sparse autoencoders for SAELens\n\n"
            f"```bash\npip install {PACKAGE_NAME}\n```\n\n"
            f"Sparse autoencoders (SAEs) in [SAELens](https://github.com/decoderesearch/SAELens)'s "
            f"format, published with [{PACKAGE_NAME}](https://pypi.org/project/{PACKAGE_NAME}/). "
            "Each folder below is one SAE (`cfg.json`, `sae_weights.safetensors`, and "
            "`sparsity.safetensors` / `runner_cfg.json` where available); load it with "
            '`SAE.from_pretrained("REPO", "FOLDER")`. Adaptive architectures (`adaptivek`, '
            f"`softsae`, `hierarchical_topk`) need `pip install {PACKAGE_NAME}` — SAELens then "
            "finds them without any import.\n"
        )
    section = _section(repo_id, sae_id, summary, provider)
    pattern = re.compile(
        rf"<!-- sae-adaptive-plugin:begin {re.escape(sae_id)} -->.*?"
        rf"<!-- sae-adaptive-plugin:end {re.escape(sae_id)} -->\n?",
        re.S,
    )
    if pattern.search(body):
        body = pattern.sub(lambda _: section, body, count=1)
    else:
        body = body.rstrip("\n") + "\n\n" + section
    card.text = "\n" + body
    return str(card)
