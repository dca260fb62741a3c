"""A suite of SAEs as one release: ``sae-adaptive release SPEC.yaml --out DIR`` and ``release push``.

From one YAML spec (model, hook pattern and layers, architectures with their ``k``, TopK
baselines at the adaptive SAEs' evaluated mean L0, tokens, ``d_sae``; format in docs/hub.md) each
SAE is trained with the package's runner (:func:`~sae_adaptive_plugin.training.run.run_training`),
copied into ``DIR/<sae_id>/`` in SAELens's layout with ``metadata.neuronpedia_id`` in its
``cfg.json``, and evaluated (:func:`~sae_adaptive_plugin.evaluation.evaluate_paths`) into
``DIR/<sae_id>/eval.json``. A SAE with its ``eval.json`` is finished and skipped on a rerun; one
trained but not evaluated is only evaluated; one with checkpoints resumes from the latest.
``DIR`` also gets ``release.json`` (the plan and metrics), ``releases.yaml`` (the SAELens
directory entry, ``l0``/``variance_explained`` from the evaluation) and ``README.md`` (the model
card with every SAE's EV, CE score, L0 mean/std and dead latents). :func:`push_release`
uploads all of it in one commit after ``push``'s checks of every SAE folder.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Files of a release folder besides the SAE folders.
MANIFEST_FILENAME = "release.json"
RELEASES_FILENAME = "releases.yaml"
SPEC_FILENAME = "release_spec.yaml"
EVAL_FILENAME = "eval.json"
README_FILENAME = "README.md"
#: Scratch space (training checkpoints) inside the release folder; never uploaded.
WORK_DIRNAME = ".work"
DEFAULT_NEURONPEDIA = "{model_id}/{layer}-{name}"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SPEC_FIELDS = {
    "release": "the release name (letters, digits, '.', '_', '-')",
    "repo_id": "Hub repo USER/REPO the release points at (or release push --repo-id)",
    "model": "model_name the SAEs are trained on (a .gguf, HF folder, or model name)",
    "model_id": "the directory entry's 'model' (default: model)",
    "hook": "hook name pattern with {layer}, e.g. blocks.{layer}.hook_resid_post",
    "layers": "list of layers (ints or strings) put into hook",
    "d_in": "width of the hooked activation",
    "d_sae": "latents of every SAE",
    "training_tokens": "tokens each SAE trains on",
    "runner": "other LanguageModelSAERunnerConfig fields shared by every SAE",
    "sae": "SAE config fields shared by every SAE (e.g. normalize_activations)",
    "saes": "list of {architecture, k, name?, other SAE fields}",
    "baselines": "{architecture: topk, matched_l0: true, k: [..], other SAE fields}",
    "eval": "{n_batches, batch_size_prompts, dataset_path, device}",
    "neuronpedia": f"Neuronpedia id pattern (default {DEFAULT_NEURONPEDIA!r}; null for none)",
}
_REQUIRED = ("release", "model", "hook", "layers", "d_in", "d_sae", "training_tokens", "saes")
_EVAL_DEFAULTS = {"n_batches": 10, "batch_size_prompts": 8, "dataset_path": None, "device": None}
#: keys the spec sets itself, refused inside ``runner:``.
_RUNNER_OWNED = ("model_name", "hook_name", "training_tokens", "checkpoint_path", "output_path")


class ReleaseSpecError(ValueError):
    """A release spec field that is missing or out of range; the message names the field."""


@dataclass
class PlannedSAE:
    """One SAE of the release: where it goes and how it is trained."""

    id: str
    layer: str | int
    hook: str
    name: str
    architecture: str
    sae: dict[str, Any]
    neuronpedia: str | None
    matches: list[str] = field(default_factory=list)  # for a baseline: the SAEs whose L0 it matches


@dataclass
class ReleaseSpec:
    """A checked release spec (:func:`load_spec`)."""

    release: str
    model: str
    model_id: str
    hook: str
    layers: list[str | int]
    d_in: int
    d_sae: int
    training_tokens: int
    saes: list[dict[str, Any]]
    repo_id: str | None = None
    runner: dict[str, Any] = field(default_factory=dict)
    sae: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    neuronpedia: str | None = DEFAULT_NEURONPEDIA
    source: str = "spec"

    def planned(
        self, layer: str | int, entry: dict[str, Any], matches: Sequence[str] = ()
    ) -> PlannedSAE:
        """The :class:`PlannedSAE` of one ``saes`` entry (or baseline) at ``layer``."""
        entry = dict(entry)
        name = entry.pop("name", None) or entry["architecture"]
        hook = self.hook.format(layer=layer)
        sae_id = f"{hook}/{name}"
        neuronpedia = None
        if self.neuronpedia is not None:
            neuronpedia = self.neuronpedia.format(
                model_id=self.model_id, layer=layer, name=name, hook=hook, release=self.release
            )
        return PlannedSAE(
            sae_id, layer, hook, name, entry["architecture"], entry, neuronpedia, list(matches)
        )

    def first_stage(self) -> list[PlannedSAE]:
        """The SAEs of the ``saes`` list, layer by layer."""
        return [self.planned(layer, entry) for layer in self.layers for entry in self.saes]

    def baselines_for(self, layer: str | int, l0s: dict[str, float]) -> list[PlannedSAE]:
        """The baselines at ``layer``: one per distinct rounded L0 of ``l0s`` (SAE name → mean
        L0) when ``matched_l0``, and one per listed ``k``."""
        settings = dict(self.baselines)
        architecture = settings.pop("architecture", "topk")
        matched = settings.pop("matched_l0", True)
        by_k: dict[int, list[str]] = {int(k): [] for k in settings.pop("k", [])}
        if matched:
            for name, l0 in l0s.items():
                by_k.setdefault(max(1, round(l0)), []).append(name)
        return [
            self.planned(
                layer,
                {**settings, "architecture": architecture, "k": k, "name": f"{architecture}_k{k}"},
                matches,
            )
            for k, matches in sorted(by_k.items())
        ]

    def runner_mapping(self, planned: PlannedSAE, work: Path) -> dict[str, Any]:
        """The ``sae-adaptive train`` config mapping of one planned SAE."""
        return {
            **self.runner,
            "model_name": self.model,
            "hook_name": planned.hook,
            "training_tokens": self.training_tokens,
            "checkpoint_path": str(work / "checkpoints"),
            "output_path": str(work / "final"),
            "sae": {**self.sae, **planned.sae, "d_in": self.d_in, "d_sae": self.d_sae},
        }


def _spec_error(source: str, key: str, message: str) -> ReleaseSpecError:
    return ReleaseSpecError(f"release spec {source}: field '{key}' {message}")


def _positive_int(raw: dict[str, Any], key: str, source: str) -> int:
    value = raw[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _spec_error(source, key, f"must be an integer > 0, got {value!r}")
    return value


def _mapping(raw: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise _spec_error(source, key, f"must be a mapping, got {type(value).__name__}")
    return dict(value)


def check_spec(raw: Any, source: str = "spec") -> ReleaseSpec:
    """Check a parsed release spec; :class:`ReleaseSpecError` names the first bad field."""
    if not isinstance(raw, dict):
        raise ReleaseSpecError(f"release spec {source}: must be a mapping of the fields below")
    unknown = sorted(set(raw) - set(_SPEC_FIELDS))
    if unknown:
        allowed = "; ".join(f"{k}: {v}" for k, v in _SPEC_FIELDS.items())
        raise _spec_error(source, unknown[0], f"is not a release spec field; allowed: {allowed}")
    for key in _REQUIRED:
        if raw.get(key) is None:
            raise _spec_error(source, key, f"is required ({_SPEC_FIELDS[key]})")
    for key in ("release", "model", "hook", "model_id", "repo_id"):
        if key in raw and raw[key] is not None and not (isinstance(raw[key], str) and raw[key]):
            raise _spec_error(source, key, f"must be a non-empty string, got {raw[key]!r}")
    if not _NAME_RE.match(raw["release"]):
        raise _spec_error(
            source, "release", f"must use letters, digits, '.', '_', '-': {raw['release']!r}"
        )
    if raw.get("repo_id") is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            if "/" not in raw["repo_id"]:
                raise HFValidationError("no namespace")
            validate_repo_id(raw["repo_id"])
        except HFValidationError:
            raise _spec_error(
                source, "repo_id", f"must look like USER/REPO, got {raw['repo_id']!r}"
            ) from None
    layers = raw["layers"]
    if (
        not isinstance(layers, list)
        or not layers
        or any(isinstance(v, bool) or not isinstance(v, (int, str)) for v in layers)
        or len(set(map(str, layers))) != len(layers)
    ):
        raise _spec_error(
            source,
            "layers",
            f"must be a non-empty list of distinct ints or strings, got {layers!r}",
        )
    if "{layer}" not in raw["hook"]:
        raise _spec_error(source, "hook", f"must contain {{layer}}, got {raw['hook']!r}")
    sizes = {key: _positive_int(raw, key, source) for key in ("d_in", "d_sae", "training_tokens")}
    runner, shared, baselines = (_mapping(raw, k, source) for k in ("runner", "sae", "baselines"))
    for key in _RUNNER_OWNED:
        if key in runner:
            raise _spec_error(
                source,
                f"runner.{key}",
                "is set by the release (model, hook, training_tokens, the output folder)",
            )
    if "architecture" in shared:
        raise _spec_error(source, "sae.architecture", "belongs in each saes entry")
    evaluation = {**_EVAL_DEFAULTS, **_mapping(raw, "eval", source)}
    unknown = sorted(set(evaluation) - set(_EVAL_DEFAULTS))
    if unknown:
        raise _spec_error(
            source, f"eval.{unknown[0]}", f"is not allowed; allowed: {', '.join(_EVAL_DEFAULTS)}"
        )
    for key in ("n_batches", "batch_size_prompts"):
        _positive_int(evaluation, key, f"{source} (eval)")
    saes = raw["saes"]
    if not isinstance(saes, list) or not saes:
        raise _spec_error(source, "saes", "must be a non-empty list of {architecture, k, ...}")
    names = set()
    for i, entry in enumerate(saes):
        if not isinstance(entry, dict) or not isinstance(entry.get("architecture"), str):
            raise _spec_error(source, f"saes[{i}]", "must be a mapping with an 'architecture'")
        name = entry.get("name") or entry["architecture"]
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise _spec_error(
                source, f"saes[{i}].name", f"must use letters, digits, '.', '_', '-': {name!r}"
            )
        if name in names:
            raise _spec_error(
                source,
                f"saes[{i}].name",
                f"{name!r} is used twice: give each SAE of one architecture its own name",
            )
        names.add(name)
    if not isinstance(baselines.get("matched_l0", True), bool):
        raise _spec_error(source, "baselines.matched_l0", "must be true or false")
    ks = baselines.get("k", [])
    if not isinstance(ks, list) or any(
        isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= sizes["d_sae"] for k in ks
    ):
        raise _spec_error(
            source,
            "baselines.k",
            f"must be a list of integers in [1, d_sae={sizes['d_sae']}], got {ks!r}",
        )
    neuronpedia = raw.get("neuronpedia", DEFAULT_NEURONPEDIA)
    if neuronpedia is not None and not isinstance(neuronpedia, str):
        raise _spec_error(
            source, "neuronpedia", f"must be a string pattern or null, got {neuronpedia!r}"
        )
    spec = ReleaseSpec(
        release=raw["release"],
        model=raw["model"],
        model_id=raw.get("model_id") or raw["model"],
        hook=raw["hook"],
        layers=list(layers),
        saes=[dict(s) for s in saes],
        repo_id=raw.get("repo_id"),
        runner=runner,
        sae=shared,
        baselines=baselines,
        evaluation=evaluation,
        neuronpedia=neuronpedia,
        source=source,
        **sizes,
    )
    try:
        planned = spec.first_stage() + [
            p for layer in spec.layers for p in spec.baselines_for(layer, dict.fromkeys(names, 1.0))
        ]
    except (KeyError, IndexError, ValueError) as e:
        raise _spec_error(
            source,
            "neuronpedia",
            f"pattern {neuronpedia!r} uses an unknown field {e} (known: model_id, layer, name, hook, release)",
        ) from None
    ids = [p.neuronpedia for p in planned if p.neuronpedia is not None]
    if len(set(ids)) != len(ids):
        raise _spec_error(
            source,
            "neuronpedia",
            f"pattern {neuronpedia!r} gives the same id to two SAEs: include {{layer}} and {{name}}",
        )
    return spec


def load_spec(path: str | Path) -> ReleaseSpec:
    """Read and check the YAML release spec at ``path``; every training config is built (and so
    checked, naming the field) before anything trains."""
    import yaml

    from sae_adaptive_plugin.training.config import ConfigError, build_runner_config

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"release spec {path} is not a file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ReleaseSpecError(f"release spec {path}: not valid YAML: {e}") from e
    spec = check_spec(raw, str(path))
    names = [p.name for p in spec.first_stage()]
    for planned in spec.first_stage() + spec.baselines_for(
        spec.layers[0], dict.fromkeys(names, 1.0)
    ):
        try:
            build_runner_config(spec.runner_mapping(planned, Path("unused")))
        except ConfigError as e:
            where = "baselines" if planned.matches else f"saes entry {planned.name!r}"
            raise ReleaseSpecError(
                f"release spec {path} ({where}; 'runner'/'sae' blocks): {e}"
            ) from e
    return spec


# ------------------------------------------------------------------------------------------------
# building the release folder
# ------------------------------------------------------------------------------------------------


def _is_sae_folder(path: Path) -> bool:
    from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

    return (path / SAE_CFG_FILENAME).is_file() and (path / SAE_WEIGHTS_FILENAME).is_file()


def _latest_checkpoint(checkpoints: Path) -> Path | None:
    from sae_lens.constants import TRAINER_STATE_FILENAME

    found = [p.parent for p in checkpoints.glob(f"*/*/{TRAINER_STATE_FILENAME}")]
    found = [p for p in found if p.name.isdigit()]
    return max(found, key=lambda p: int(p.name)) if found else None


def _publish_folder(final: Path, folder: Path, neuronpedia: str | None) -> None:
    """Copy SAELens's files of ``final`` into ``folder`` (replaced whole), with the Neuronpedia
    id in ``cfg.json``'s metadata."""
    from sae_lens.constants import SAE_CFG_FILENAME

    from sae_adaptive_plugin.hub.push import NEURONPEDIA_METADATA_KEY, SAE_FILES
    from sae_adaptive_plugin.outputs import replacing_dir

    with replacing_dir(folder) as staging:
        for name in SAE_FILES:
            if (final / name).is_file():
                shutil.copyfile(final / name, staging / name)
        cfg = json.loads((staging / SAE_CFG_FILENAME).read_text())
        if neuronpedia is not None:
            cfg["metadata"] = {**(cfg.get("metadata") or {}), NEURONPEDIA_METADATA_KEY: neuronpedia}
        (staging / SAE_CFG_FILENAME).write_text(json.dumps(cfg, indent=2))


def _summary(planned: PlannedSAE, metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one SAE that the card and the directory entry show."""

    def get(*path: str) -> Any:
        value: Any = metrics
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    return {
        "explained_variance": get("reconstruction_quality", "explained_variance"),
        "ce_loss_score": get("model_performance_preservation", "ce_loss_score"),
        "kl_div_score": get("model_behavior_preservation", "kl_div_score"),
        "l0_mean": get("k_distribution", "mean"),
        "l0_std": get("k_distribution", "std"),
        "dead": get("k_distribution", "never_fired"),
        "eval_tokens": get("k_distribution", "n_tokens"),
    }


def _train_and_evaluate(
    spec: ReleaseSpec, planned: PlannedSAE, out: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    from sae_adaptive_plugin import reporting
    from sae_adaptive_plugin.evaluation import evaluate_paths
    from sae_adaptive_plugin.outputs import replacing_file
    from sae_adaptive_plugin.training.config import build_runner_config
    from sae_adaptive_plugin.training.run import run_training

    folder = out / planned.id
    if (folder / EVAL_FILENAME).is_file():
        log(f"{planned.id}: finished, skipped")
        return json.loads((folder / EVAL_FILENAME).read_text())
    work = out / WORK_DIRNAME / planned.id
    if not _is_sae_folder(folder):
        if not _is_sae_folder(work / "final"):
            raw = spec.runner_mapping(planned, work)
            checkpoint = _latest_checkpoint(work / "checkpoints")
            if checkpoint is not None:
                raw["resume_from_checkpoint"] = str(checkpoint)
                log(f"{planned.id}: resuming from {checkpoint}")
            else:
                log(
                    f"{planned.id}: training {planned.architecture} ({spec.training_tokens:,} tokens)"
                )
            run_training(build_runner_config(raw), overwrite=True)
        _publish_folder(work / "final", folder, planned.neuronpedia)
    log(f"{planned.id}: evaluating")
    device = spec.evaluation["device"] or spec.runner.get("device", "cpu")
    metrics = evaluate_paths(
        [str(folder)],
        dataset_path=spec.evaluation["dataset_path"],
        n_batches=spec.evaluation["n_batches"],
        batch_size_prompts=spec.evaluation["batch_size_prompts"],
        device=device,
    )[str(folder)]
    metrics = reporting.jsonable(metrics)
    with replacing_file(folder / EVAL_FILENAME) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    return metrics


@dataclass
class ReleaseResult:
    """What :func:`build_release` wrote."""

    out: Path
    saes: list[dict[str, Any]]
    trained: list[str]


def build_release(
    spec_path: str | Path, out: str | Path, log: Callable[[str], None] | None = print
) -> ReleaseResult:
    """Train, evaluate and lay out every SAE of the spec at ``spec_path`` into ``out`` (see the
    module docstring); a rerun skips the finished SAEs. ``out`` built from a different spec is
    refused (:class:`ReleaseSpecError`)."""
    import yaml

    say = log or (lambda _msg: None)
    spec = load_spec(spec_path)
    out = Path(out)
    spec_text = Path(spec_path).read_text(encoding="utf-8")
    saved_spec = out / SPEC_FILENAME
    if saved_spec.is_file():
        if yaml.safe_load(saved_spec.read_text(encoding="utf-8")) != yaml.safe_load(spec_text):
            raise ReleaseSpecError(
                f"--out {out} holds a release built from another spec ({saved_spec}); use a new "
                "--out folder, or delete it to rebuild"
            )
    elif out.exists() and any(out.iterdir()):
        raise ReleaseSpecError(f"--out {out} is not empty and holds no {SPEC_FILENAME}")
    out.mkdir(parents=True, exist_ok=True)
    saved_spec.write_text(spec_text, encoding="utf-8")

    entries: list[dict[str, Any]] = []
    trained: list[str] = []

    def run(planned: PlannedSAE) -> dict[str, Any]:
        finished = (out / planned.id / EVAL_FILENAME).is_file()
        metrics = _train_and_evaluate(spec, planned, out, say)
        if not finished:
            trained.append(planned.id)
        summary = _summary(planned, metrics)
        entries.append({**asdict(planned), **summary})
        return summary

    for layer in spec.layers:
        l0s = {}
        for planned in spec.first_stage():
            if planned.layer == layer:
                l0s[planned.name] = run(planned)["l0_mean"]
        for planned in spec.baselines_for(layer, l0s):
            run(planned)
    manifest = {
        "release": spec.release,
        "repo_id": spec.repo_id,
        "model": spec.model_id,
        "trained_on": spec.model,
        "training_tokens": spec.training_tokens,
        "d_sae": spec.d_sae,
        "eval_dataset": spec.evaluation["dataset_path"] or spec.runner.get("dataset_path"),
        "eval_prompts": spec.evaluation["n_batches"] * spec.evaluation["batch_size_prompts"],
        "saes": entries,
    }
    write_release_files(out, manifest, spec.repo_id)
    return ReleaseResult(out=out, saes=entries, trained=trained)


def release_entry(manifest: dict[str, Any], repo_id: str) -> dict[str, Any]:
    """The SAELens directory entry (``pretrained_saes.yaml`` schema) of a built release."""
    saes = []
    for sae in manifest["saes"]:
        item: dict[str, Any] = {"id": sae["id"], "path": sae["id"]}
        if sae.get("l0_mean") is not None:
            item["l0"] = round(float(sae["l0_mean"]), 4)
        if sae.get("explained_variance") is not None:
            item["variance_explained"] = round(float(sae["explained_variance"]), 4)
        if sae.get("neuronpedia") is not None:
            item["neuronpedia"] = sae["neuronpedia"]
        saes.append(item)
    return {"repo_id": repo_id, "model": manifest["model"], "conversion_func": None, "saes": saes}


#: the card's table: (header, key in a manifest SAE, format)
CARD_COLUMNS = (
    ("SAE id", "id", "`{}`"),
    ("architecture", "architecture", "`{}`"),
    ("k", "k", "{}"),
    ("TopK at the L0 of", "matched", "{}"),
    ("EV", "explained_variance", "{:.4f}"),
    ("CE score", "ce_loss_score", "{:.4f}"),
    ("L0 mean", "l0_mean", "{:.2f}"),
    ("L0 std", "l0_std", "{:.2f}"),
    ("dead latents", "dead", "{}"),
    ("Neuronpedia id", "neuronpedia", "`{}`"),
)


def _k_setting(sae: dict[str, Any]) -> str | None:
    """The k an SAE was configured with: ``k``, or its ``k_min``–``k_max`` range."""
    if sae.get("k") is not None:
        return str(sae["k"])
    if sae.get("k_min") is not None or sae.get("k_max") is not None:
        return f"{sae.get('k_min', '?')}–{sae.get('k_max', '?')}"
    return None


def release_card(manifest: dict[str, Any], repo_id: str | None) -> str:
    """The repo's ``README.md``: front matter for the Hub, how to load, one row per SAE."""
    from huggingface_hub import ModelCard, ModelCardData

    from sae_adaptive_plugin import reporting
    from sae_adaptive_plugin.provenance import PACKAGE_NAME

    release, repo = manifest["release"], repo_id or "USER/REPO"
    architectures = sorted({s["architecture"] for s in manifest["saes"]})
    data = ModelCardData(
        library_name="saelens",
        tags=["saelens", "sparse-autoencoder", PACKAGE_NAME, *architectures],
    )
    rows = [
        {
            **s,
            "k": _k_setting(s.get("sae") or {}),
            "matched": ", ".join(s.get("matches") or []) or None,
        }
        for s in manifest["saes"]
    ]
    table = reporting.markdown_table(rows, CARD_COLUMNS)
    first = manifest["saes"][0]["id"]
    entry = json.dumps({release: release_entry(manifest, repo)}, indent=2)
    body = f"""
# {release}: sparse autoencoders for `{manifest["model"]}`

{len(manifest["saes"])} SAEs ({", ".join(architectures)}) in [SAELens](https://github.com/decoderesearch/SAELens)'s
format, trained on `{manifest["trained_on"]}` ({manifest["training_tokens"]:,} tokens each,
{manifest["d_sae"]} latents) with `sae-adaptive release`. The adaptive architectures need
`pip install {PACKAGE_NAME}` (it registers them into SAELens).

```python
from sae_lens import SAE

sae = SAE.from_pretrained("{repo}", "{first}")       # by repo and folder
sae = SAE.from_pretrained("{release}", "{first}")    # by release name, once registered (below)
```

The release name resolves once a SAELens plugin declares the entry in `{RELEASES_FILENAME}` (the
`sae_lens_releases` hook of {PACKAGE_NAME}; SAEBench's regex selection and Neuronpedia read the
same directory). Every SAE's `cfg.json` carries `metadata.neuronpedia_id`.

Evaluated with SAELens's `run_evals` on {manifest["eval_prompts"]} prompts of `{manifest["eval_dataset"]}`:
EV is the explained variance, CE score the CE-loss score with the reconstruction spliced into the
model, L0 mean/std the per-token number of active latents, dead latents those that never fired on
the evaluation tokens.

{table}

Directory entry (`{RELEASES_FILENAME}`):

```json
{entry}
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def write_release_files(out: Path, manifest: dict[str, Any], repo_id: str | None) -> None:
    """Write ``release.json``, ``README.md`` and (with a repo id) ``releases.yaml`` into ``out``."""
    import yaml

    from sae_adaptive_plugin.outputs import replacing_file

    manifest = {**manifest, "repo_id": repo_id}
    files = {
        MANIFEST_FILENAME: json.dumps(manifest, indent=2),
        README_FILENAME: release_card(manifest, repo_id),
    }
    if repo_id is not None:
        entry = {manifest["release"]: release_entry(manifest, repo_id)}
        files[RELEASES_FILENAME] = yaml.safe_dump(entry, sort_keys=False)
    for name, text in files.items():
        with replacing_file(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# pushing
# ------------------------------------------------------------------------------------------------


def push_release(
    out: str | Path,
    repo_id: str | None = None,
    private: bool = False,
    revision: str | None = None,
    *,
    commit_message: str | None = None,
    token: str | None = None,
    log: Callable[[str], None] | None = print,
) -> Any:
    """Upload the release folder ``out`` in one commit: every SAE folder (after ``push``'s checks,
    with its ``eval.json``), ``README.md`` and ``releases.yaml`` (both rewritten for ``repo_id``,
    default the spec's). Returns the commit info; :class:`HubPushError` if the Hub refused."""
    from huggingface_hub import CommitOperationAdd

    from sae_adaptive_plugin.hub.push import HubPushError, check_ids, commit_to_hub, prepare_sae

    say = log or (lambda _msg: None)
    out = Path(out)
    if not (out / MANIFEST_FILENAME).is_file():
        raise FileNotFoundError(
            f"{out} has no {MANIFEST_FILENAME}: not a release folder built by `sae-adaptive release`"
        )
    manifest = json.loads((out / MANIFEST_FILENAME).read_text())
    repo_id = repo_id or manifest.get("repo_id")
    if not repo_id:
        raise ValueError("--repo-id is required: the release spec names no repo_id")
    branch = revision or "main"
    missing = [s["id"] for s in manifest["saes"] if not (out / s["id"] / EVAL_FILENAME).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{out}: SAEs not finished (no {EVAL_FILENAME}): {missing}; rerun `sae-adaptive release`"
        )
    for sae in manifest["saes"]:
        check_ids(repo_id, sae["id"], revision)
    with tempfile.TemporaryDirectory(prefix="sae-adaptive-release-") as tmp:
        prepared = [
            prepare_sae(
                out / s["id"], s["id"], Path(tmp) / str(i), neuronpedia_id=s.get("neuronpedia")
            )
            for i, s in enumerate(manifest["saes"])
        ]
        for sae in manifest["saes"]:
            json.loads((out / sae["id"] / EVAL_FILENAME).read_text())  # valid JSON, else refused
        write_release_files(out, manifest, repo_id)
        retry = f"sae-adaptive release push {out} --repo-id {repo_id}" + (
            f" --revision {branch}" if branch != "main" else ""
        )

        def failed(e: BaseException) -> HubPushError:
            return HubPushError(
                f"upload of release {out} to {repo_id} (revision {branch!r}) failed: "
                f"{type(e).__name__}: {e}\nNothing was committed; the local files are untouched. "
                f"Retry with: {retry}"
            )

        def operations(_existing: set[str]) -> list[Any]:
            ops: list[Any] = []
            for item in prepared:
                ops += item.operations()
                ops.append(
                    CommitOperationAdd(
                        f"{item.sae_id}/{EVAL_FILENAME}", str(out / item.sae_id / EVAL_FILENAME)
                    )
                )
            for name in (README_FILENAME, RELEASES_FILENAME):
                ops.append(CommitOperationAdd(name, str(out / name)))
            say(
                f"uploading {len(prepared)} SAEs of release {manifest['release']} to {repo_id}@{branch}"
            )
            return ops

        return commit_to_hub(
            repo_id,
            branch,
            private,
            operations,
            commit_message or f"Upload release {manifest['release']} ({len(prepared)} SAEs)",
            failed,
            token=token,
        )


def release_command(args: argparse.Namespace) -> int:
    """``sae-adaptive release SPEC.yaml --out DIR`` / ``sae-adaptive release push DIR``."""
    from sae_adaptive_plugin.hub.push import HubPushError
    from sae_adaptive_plugin.training.config import ConfigError
    from sae_adaptive_plugin.training.runner import NonFiniteTrainingError

    try:
        if args.spec == "push":
            if args.dir is None:
                raise ValueError(
                    "release push needs the release folder: release push DIR --repo-id USER/REPO"
                )
            info = push_release(
                args.dir,
                args.repo_id,
                private=args.private,
                revision=args.revision,
                commit_message=args.commit_message,
            )
            print(f"committed {getattr(info, 'oid', None)}")
            return 0
        if args.out is None or args.dir is not None:
            raise ValueError(
                "usage: release SPEC.yaml --out DIR (or release push DIR --repo-id USER/REPO)"
            )
        result = build_release(args.spec, args.out)
    except HubPushError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except NonFiniteTrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ReleaseSpecError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"release {result.out}: {len(result.saes)} SAEs ({len(result.trained)} built now)")
    print(f"model card: {result.out / README_FILENAME}")
    return 0
