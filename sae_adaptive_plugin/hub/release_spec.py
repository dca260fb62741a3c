"""The release spec of ``sae-adaptive release``: one YAML file → the checked plan of SAEs.

A spec names the model, a hook pattern and its layers, the architectures with their ``k``, the
TopK baselines (at the evaluated mean L0 of each SAE, and at listed ``k``), the tokens and
``d_sae``; ``runner:`` and ``sae:`` hold any other field of SAELens's runner and SAE configs.
:func:`load_spec` checks every field (:class:`ReleaseSpecError` names it) and builds every
SAE's training config before anything trains. The format is in docs/hub.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
