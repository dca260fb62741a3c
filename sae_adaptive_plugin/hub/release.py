"""A suite of SAEs as one release: ``sae-adaptive release SPEC.yaml --out DIR`` and ``release push``.

From one YAML spec (:mod:`~sae_adaptive_plugin.hub.release_spec`; format in docs/hub.md) each
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
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sae_adaptive_plugin.hub.release_spec import (
    PlannedSAE,
    ReleaseSpec,
    ReleaseSpecError,
    load_spec,
)

#: Files of a release folder besides the SAE folders.
MANIFEST_FILENAME = "release.json"
RELEASES_FILENAME = "releases.yaml"
SPEC_FILENAME = "release_spec.yaml"
EVAL_FILENAME = "eval.json"
README_FILENAME = "README.md"
#: Scratch space (training checkpoints) inside the release folder; never uploaded.
WORK_DIRNAME = ".work"


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

sae = SAE.from_pretrained("{repo}", "{first}")  # by repo and folder
sae = SAE.from_pretrained("{release}", "{first}")  # by release name, once registered (below)
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
