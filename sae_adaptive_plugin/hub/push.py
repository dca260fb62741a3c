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


def _check_ids(repo_id: str, sae_id: str, revision: str | None) -> None:
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


def _retry_hint(path: Path, repo_id: str, sae_id: str, revision: str, private: bool) -> str:
    q = shlex.quote
    cmd = f"sae-adaptive push {q(str(path))} --repo-id {q(repo_id)} --sae-id {q(sae_id)}"
    if private:
        cmd += " --private"
    if revision != "main":
        cmd += f" --revision {q(revision)}"
    return cmd


def push_to_hub(
    path: str | Path,
    repo_id: str,
    sae_id: str,
    private: bool = False,
    revision: str | None = None,
    *,
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
        commit_message: defaults to ``"Upload SAE <sae_id>"``.
        token: Hub token (defaults to huggingface_hub's usual lookup).

    Returns a :class:`PushResult`; raises :class:`HubPushError` when the Hub refused or the
    connection failed (the SAE is then not committed, and the local folder is untouched).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from tqdm.auto import tqdm

    say = log or (lambda _msg: None)
    path = Path(path)
    _check_ids(repo_id, sae_id, revision)
    branch = revision or "main"
    cfg = _read_cfg(path)
    retry = _retry_hint(path, repo_id, sae_id, branch, private)

    def failed(e: BaseException) -> HubPushError:
        return HubPushError(
            f"upload of {path} to {repo_id} (revision {branch!r}, folder {sae_id!r}) failed: "
            f"{type(e).__name__}: {e}\nThe SAE was not committed (the repo or branch may have been "
            f"created) and the local files in {path} are untouched. Retry with: {retry}"
        )

    steps = tqdm(total=4, desc=f"push {sae_id}", unit="step", disable=not show_progress)
    with tempfile.TemporaryDirectory(prefix="sae-adaptive-push-") as tmp:
        source, converted = path, False
        steps.set_postfix_str("checking")
        if is_training_checkpoint(path, cfg):
            say(f"{path} is a training checkpoint: converting to the inference SAE first")
            source, converted = convert_to_inference(path, Path(tmp) / "inference"), True
            cfg = _read_cfg(source)
        architecture = check_architecture(cfg, source=str(source / SAE_CFG_FILENAME))
        load_sae_folder(source)  # complete, finite weights and a valid config; else nothing is sent
        provider = architecture_provider(architecture, cfg)
        files = {name: source / name for name in SAE_FILES if (source / name).is_file()}
        cfg_bytes = files[SAE_CFG_FILENAME].read_bytes()
        if provider and (cfg.get("metadata") or {}).get(PROVIDER_METADATA_KEY) != provider:
            cfg_out = dict(cfg)
            cfg_out["metadata"] = {**(cfg.get("metadata") or {}), PROVIDER_METADATA_KEY: provider}
            cfg_bytes = json.dumps(cfg_out).encode()
        summary = training_summary(cfg, files.get(SPARSITY_FILENAME))
        if converted:
            summary["converted_from"] = "a training checkpoint, converted to the inference SAE"
        steps.update()

        api = HfApi(token=token)
        try:
            steps.set_postfix_str("creating repo")
            api.create_repo(repo_id, private=private, exist_ok=True)
            if branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            existing_files = set(api.list_repo_files(repo_id, revision=branch))
            steps.update()

            steps.set_postfix_str("model card")
            readme = None
            if README_FILENAME in existing_files:
                try:
                    readme_path = hf_hub_download(
                        repo_id, README_FILENAME, revision=branch, token=token
                    )
                    readme = Path(readme_path).read_text(encoding="utf-8")
                except (EntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError):
                    readme = None
            card = model_card(repo_id, sae_id, summary, existing=readme, provider=provider)
            steps.update()

            operations: list[Any] = [
                CommitOperationAdd(f"{sae_id}/{SAE_CFG_FILENAME}", cfg_bytes),
                *(
                    CommitOperationAdd(f"{sae_id}/{name}", str(file))
                    for name, file in files.items()
                    if name != SAE_CFG_FILENAME
                ),
                CommitOperationAdd(README_FILENAME, card.encode("utf-8")),
            ]
            stale = sorted(
                f"{sae_id}/{name}"
                for name in SAE_FILES
                if name not in files and f"{sae_id}/{name}" in existing_files
            )
            operations += [CommitOperationDelete(p) for p in stale]
            sizes = ", ".join(
                f"{name} ({(len(cfg_bytes) if name == SAE_CFG_FILENAME else file.stat().st_size):,} B)"
                for name, file in files.items()
            )
            say(f"uploading to {repo_id}@{branch}/{sae_id}: {sizes} + {README_FILENAME}")
            steps.set_postfix_str("uploading")
            info = api.create_commit(
                repo_id,
                operations,
                commit_message=commit_message or f"Upload SAE {sae_id}",
                revision=branch,
            )
            steps.update()
        except (HfHubHTTPError, OSError, ValueError) as e:
            steps.close()
            raise failed(e) from e
        except Exception as e:  # network errors of httpx/requests, whatever the client uses
            steps.close()
            if type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "requests", "urllib3"):
                raise
            raise failed(e) from e
        steps.close()
    return PushResult(
        repo_id=repo_id,
        sae_id=sae_id,
        revision=branch,
        commit_oid=getattr(info, "oid", None),
        commit_url=getattr(info, "commit_url", None),
        files=[f"{sae_id}/{name}" for name in files] + [README_FILENAME],
        deleted=stale,
        converted_from_training=converted,
    )


def push_command(args: argparse.Namespace) -> int:
    try:
        result = push_to_hub(
            args.path,
            args.repo_id,
            args.sae_id,
            private=args.private,
            revision=args.revision,
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
