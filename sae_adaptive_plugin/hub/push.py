"""Publish one SAE folder to the Hugging Face Hub in SAELens's layout, with a model card.

:func:`push_to_hub` uploads ``cfg.json``, ``sae_weights.safetensors`` and, where present,
``sparsity.safetensors`` and ``runner_cfg.json`` under the folder ``sae_id`` of a model repo,
with the repo's ``README.md`` (:mod:`~sae_adaptive_plugin.hub.model_card`), in one commit: a
failed upload changes nothing on the Hub, and the local folder is only read. A training
checkpoint is first converted to its inference form in a temporary folder. SAELens then loads it
with ``SAE.from_pretrained("USER/REPO", "SAE_ID")``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_lens.constants import (
    RUNNER_CFG_FILENAME,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
)

from sae_adaptive_plugin.hub.load import (
    _read_cfg,
    architecture_provider,
    check_architecture,
    convert_to_inference,
    is_training_checkpoint,
    load_sae_folder,
)
from sae_adaptive_plugin.hub.model_card import model_card, training_summary
from sae_adaptive_plugin.provenance import PROVIDER_METADATA_KEY

#: What a published SAE folder holds (SAELens's own layout).
SAE_FILES = (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME, RUNNER_CFG_FILENAME)
README_FILENAME = "README.md"
#: ``cfg.json`` metadata key that Neuronpedia and SAELens read the SAE's Neuronpedia id from.
NEURONPEDIA_METADATA_KEY = "neuronpedia_id"


class HubPushError(RuntimeError):
    """An upload to the Hub failed; the local files are untouched and the message says what to retry."""


@dataclass
class PushResult:
    """What :func:`push_to_hub` published."""

    repo_id: str
    sae_id: str
    revision: str
    commit_oid: str | None
    commit_url: str | None
    files: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    converted_from_training: bool = False


def check_ids(repo_id: str, sae_id: str, revision: str | None) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if not isinstance(repo_id, str) or "/" not in repo_id:
            raise HFValidationError("no namespace")
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(
            f"--repo-id must look like USER/REPO (letters, digits, '-', '_', '.'), got {repo_id!r}"
        ) from e
    parts = sae_id.split("/") if isinstance(sae_id, str) else [""]
    if (
        not sae_id
        or sae_id.startswith("/")
        or "\\" in sae_id
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ValueError(
            f"--sae-id must be a relative folder name such as 'blocks.8.hook_resid_post' "
            f"(no empty, '.' or '..' parts, no backslashes), got {sae_id!r}"
        )
    if revision is not None and (not revision or revision.startswith("/")):
        raise ValueError(f"--revision must be a branch name, got {revision!r}")


def _retry_hint(
    path: Path,
    repo_id: str,
    sae_id: str,
    revision: str,
    private: bool,
    neuronpedia_id: str | None = None,
) -> str:
    q = shlex.quote
    cmd = f"sae-adaptive push {q(str(path))} --repo-id {q(repo_id)} --sae-id {q(sae_id)}"
    if neuronpedia_id is not None:
        cmd += f" --neuronpedia-id {q(neuronpedia_id)}"
    if private:
        cmd += " --private"
    if revision != "main":
        cmd += f" --revision {q(revision)}"
    return cmd


@dataclass
class PreparedSAE:
    """One SAE folder checked and ready to upload under ``sae_id`` (:func:`prepare_sae`)."""

    sae_id: str
    files: dict[str, Path]
    cfg_bytes: bytes
    summary: dict[str, Any]
    provider: str | None
    converted: bool

    def operations(self) -> list[Any]:
        """The commit operations that add this SAE's files under its folder."""
        from huggingface_hub import CommitOperationAdd

        return [
            CommitOperationAdd(f"{self.sae_id}/{SAE_CFG_FILENAME}", self.cfg_bytes),
            *(
                CommitOperationAdd(f"{self.sae_id}/{name}", str(file))
                for name, file in self.files.items()
                if name != SAE_CFG_FILENAME
            ),
        ]

    def sizes(self) -> str:
        return ", ".join(
            f"{name} ({(len(self.cfg_bytes) if name == SAE_CFG_FILENAME else file.stat().st_size):,} B)"
            for name, file in self.files.items()
        )


def _check_neuronpedia_id(neuronpedia_id: str | None) -> None:
    if neuronpedia_id is not None and (
        not isinstance(neuronpedia_id, str) or not neuronpedia_id.strip() or "\n" in neuronpedia_id
    ):
        raise ValueError(
            f"--neuronpedia-id must be a non-empty one-line string such as "
            f"'gpt2-small/6-res-adaptivek', got {neuronpedia_id!r}"
        )


def prepare_sae(
    path: str | Path,
    sae_id: str,
    workdir: str | Path,
    neuronpedia_id: str | None = None,
    log: Callable[[str], None] | None = None,
) -> PreparedSAE:
    """Check the SAE folder ``path`` for upload under ``sae_id``: a training checkpoint is converted
    into ``workdir`` first; the architecture must be registered and the weights complete and finite
    (else ``ValueError`` / ``FileNotFoundError`` naming the file). The uploaded ``cfg.json`` names
    the providing package and, when given, ``metadata.neuronpedia_id``. ``path`` is only read."""
    say = log or (lambda _msg: None)
    path = Path(path)
    _check_neuronpedia_id(neuronpedia_id)
    cfg = _read_cfg(path)
    source, converted = path, False
    if is_training_checkpoint(path, cfg):
        say(f"{path} is a training checkpoint: converting to the inference SAE first")
        source, converted = convert_to_inference(path, Path(workdir) / "inference"), True
        cfg = _read_cfg(source)
    architecture = check_architecture(cfg, source=str(source / SAE_CFG_FILENAME))
    load_sae_folder(source)  # complete, finite weights and a valid config; else nothing is sent
    provider = architecture_provider(architecture, cfg)
    files = {name: source / name for name in SAE_FILES if (source / name).is_file()}
    cfg_bytes = files[SAE_CFG_FILENAME].read_bytes()
    metadata = dict(cfg.get("metadata") or {})
    if provider and metadata.get(PROVIDER_METADATA_KEY) != provider:
        metadata[PROVIDER_METADATA_KEY] = provider
    if neuronpedia_id is not None:
        metadata[NEURONPEDIA_METADATA_KEY] = neuronpedia_id
    if metadata != (cfg.get("metadata") or {}):
        cfg = {**cfg, "metadata": metadata}
        cfg_bytes = json.dumps(cfg).encode()
    summary = training_summary(cfg, files.get(SPARSITY_FILENAME))
    if converted:
        summary["converted_from"] = "a training checkpoint, converted to the inference SAE"
    return PreparedSAE(sae_id, files, cfg_bytes, summary, provider, converted)


def commit_to_hub(
    repo_id: str,
    branch: str,
    private: bool,
    build_operations: Callable[[set[str]], list[Any]],
    commit_message: str,
    failed: Callable[[BaseException], HubPushError],
    token: str | None = None,
    on_step: Callable[[str], None] | None = None,
) -> Any:
    """Create the repo (and branch) if missing and commit ``build_operations(files already on the
    branch)`` in one commit. Hub and connection errors become ``failed(error)``."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    step = on_step or (lambda _what: None)
    api = HfApi(token=token)
    try:
        step("creating repo")
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        existing_files = set(api.list_repo_files(repo_id, revision=branch))
        operations = build_operations(existing_files)
        step("uploading")
        return api.create_commit(
            repo_id, operations, commit_message=commit_message, revision=branch
        )
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise failed(e) from e
    except Exception as e:  # network errors of httpx/requests, whatever the client uses
        if type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "requests", "urllib3"):
            raise
        raise failed(e) from e


def read_hub_file(repo_id: str, filename: str, branch: str, token: str | None) -> str | None:
    """The text of ``filename`` on ``branch`` of ``repo_id``, or None if it is not there."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        local = hf_hub_download(repo_id, filename, revision=branch, token=token)
    except (EntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError):
        return None
    return Path(local).read_text(encoding="utf-8")


def push_to_hub(
    path: str | Path,
    repo_id: str,
    sae_id: str,
    private: bool = False,
    revision: str | None = None,
    *,
    neuronpedia_id: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> PushResult:
    """Publish the SAE folder ``path`` to ``repo_id`` under the folder ``sae_id``.

    Args:
        path: a SAELens SAE folder (inference, or a training checkpoint, converted first).
        repo_id: ``USER/REPO`` (created if missing, ``private`` applies only then).
        sae_id: the folder inside the repo; ``SAE.from_pretrained(repo_id, sae_id)`` loads it.
        revision: branch to commit to (created from ``main`` if missing); default ``main``.
        neuronpedia_id: written to the uploaded ``cfg.json`` as ``metadata.neuronpedia_id``.
        commit_message: defaults to ``"Upload SAE <sae_id>"``.
        token: Hub token (defaults to huggingface_hub's usual lookup).

    Returns a :class:`PushResult`; raises :class:`HubPushError` when the Hub refused or the
    connection failed (the SAE is then not committed, and the local folder is untouched).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from tqdm.auto import tqdm

    say = log or (lambda _msg: None)
    path = Path(path)
    check_ids(repo_id, sae_id, revision)
    branch = revision or "main"
    retry = _retry_hint(path, repo_id, sae_id, branch, private, neuronpedia_id)

    def failed(e: BaseException) -> HubPushError:
        return HubPushError(
            f"upload of {path} to {repo_id} (revision {branch!r}, folder {sae_id!r}) failed: "
            f"{type(e).__name__}: {e}\nThe SAE was not committed (the repo or branch may have been "
            f"created) and the local files in {path} are untouched. Retry with: {retry}"
        )

    steps = tqdm(total=3, desc=f"push {sae_id}", unit="step", disable=not show_progress)
    stale: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sae-adaptive-push-") as tmp:
        steps.set_postfix_str("checking")
        prepared = prepare_sae(path, sae_id, tmp, neuronpedia_id=neuronpedia_id, log=say)
        steps.update()

        def operations(existing_files: set[str]) -> list[Any]:
            steps.set_postfix_str("model card")
            readme = (
                read_hub_file(repo_id, README_FILENAME, branch, token)
                if README_FILENAME in existing_files
                else None
            )
            card = model_card(
                repo_id, sae_id, prepared.summary, existing=readme, provider=prepared.provider
            )
            steps.update()
            stale.extend(
                sorted(
                    f"{sae_id}/{name}"
                    for name in SAE_FILES
                    if name not in prepared.files and f"{sae_id}/{name}" in existing_files
                )
            )
            say(f"uploading to {repo_id}@{branch}/{sae_id}: {prepared.sizes()} + {README_FILENAME}")
            return [
                *prepared.operations(),
                CommitOperationAdd(README_FILENAME, card.encode("utf-8")),
                *(CommitOperationDelete(p) for p in stale),
            ]

        try:
            info = commit_to_hub(
                repo_id,
                branch,
                private,
                operations,
                commit_message or f"Upload SAE {sae_id}",
                failed,
                token=token,
                on_step=steps.set_postfix_str,
            )
        finally:
            steps.close()
    return PushResult(
        repo_id=repo_id,
        sae_id=sae_id,
        revision=branch,
        commit_oid=getattr(info, "oid", None),
        commit_url=getattr(info, "commit_url", None),
        files=[f"{sae_id}/{name}" for name in prepared.files] + [README_FILENAME],
        deleted=stale,
        converted_from_training=prepared.converted,
    )


def push_command(args: argparse.Namespace) -> int:
    try:
        result = push_to_hub(
            args.path,
            args.repo_id,
            args.sae_id,
            private=args.private,
            revision=args.revision,
            neuronpedia_id=args.neuronpedia_id,
            commit_message=args.commit_message,
        )
    except HubPushError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"committed {result.commit_oid} to {result.repo_id}@{result.revision}")
    if result.commit_url:
        print(result.commit_url)
    print(
        "load with:\n    from sae_lens import SAE\n"
        f'    sae = SAE.from_pretrained("{result.repo_id}", "{result.sae_id}")'
    )
    return 0
