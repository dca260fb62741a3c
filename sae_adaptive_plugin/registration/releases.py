"""Releases as plugin data: ``sae_lens_releases`` entries merged into SAELens's pretrained directory.

SAELens resolves a release name only through ``get_pretrained_saes_directory()`` (cached; it
parses the 1.5 MB ``pretrained_saes.yaml``). :func:`install_directory_hook` puts
:func:`lookup_directory` in its place in every module that holds it; the first call builds
SAELens's directory and has the loader add each plugin's ``sae_lens_releases`` to that (cached)
dict (:func:`merge_releases`). Nothing is read before that first lookup, so ``import sae_lens`` costs
no more. A release name already in the directory is warned about and skipped (never overwritten);
a hook that raises, or an entry that does not fit the schema, is logged and skipped, and the other
plugins' releases are still added. The lookup objects are built from the dataclass fields of
SAELens's ``PretrainedSAELookup``, so fields added or removed across SAELens 6.5x do not break it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger("sae_adaptive_plugin")

#: the SAELens function that every release-name lookup goes through.
DIRECTORY_FUNCTION = "get_pretrained_saes_directory"
#: the file in which this package declares its own releases (empty until a suite is published).
PACKAGE_RELEASES_FILE = Path(__file__).resolve().parent.parent / "releases.yaml"


class ReleaseError(ValueError):
    """A release entry that does not fit SAELens's ``pretrained_saes.yaml`` schema."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_release(name: Any, entry: Any, source: str) -> dict[str, Any]:
    """Return ``entry`` normalised (paths as strings), or raise :class:`ReleaseError` naming
    ``source``, the release and the field."""
    where = f"{source}: release {name!r}"
    if not isinstance(name, str) or not name:
        raise ReleaseError(f"{source}: release names must be non-empty strings, got {name!r}")
    if not isinstance(entry, Mapping):
        raise ReleaseError(f"{where} must be a mapping, got {type(entry).__name__}")
    for key in ("repo_id", "model"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise ReleaseError(f"{where}: field '{key}' must be a non-empty string")
    if entry.get("conversion_func") is not None and not isinstance(entry["conversion_func"], str):
        raise ReleaseError(f"{where}: field 'conversion_func' must be a string or null")
    if entry.get("config_overrides") is not None and not isinstance(
        entry["config_overrides"], Mapping
    ):
        raise ReleaseError(f"{where}: field 'config_overrides' must be a mapping or null")
    saes = entry.get("saes")
    if not isinstance(saes, list) or not saes:
        raise ReleaseError(f"{where}: field 'saes' must be a non-empty list of {{id, path, ...}}")
    seen: set[str] = set()
    checked = []
    for i, sae in enumerate(saes):
        at = f"{where}: saes[{i}]"
        if not isinstance(sae, Mapping):
            raise ReleaseError(f"{at} must be a mapping with 'id' and 'path'")
        if not isinstance(sae.get("id"), str) or not sae["id"]:
            raise ReleaseError(f"{at}: field 'id' must be a non-empty string")
        if sae["id"] in seen:
            raise ReleaseError(f"{at}: id {sae['id']!r} appears twice")
        seen.add(sae["id"])
        path = sae.get("path")
        if isinstance(path, int) and not isinstance(path, bool):
            path = str(path)
        if not isinstance(path, str) or not path:
            raise ReleaseError(f"{at}: field 'path' must be a non-empty string (the repo folder)")
        for key in ("l0", "variance_explained", "norm_scaling_factor"):
            if sae.get(key) is not None and not _is_number(sae[key]):
                raise ReleaseError(f"{at}: field '{key}' must be a finite number, got {sae[key]!r}")
        if sae.get("neuronpedia") is not None and not isinstance(sae["neuronpedia"], str):
            raise ReleaseError(f"{at}: field 'neuronpedia' must be a string or null")
        checked.append({**sae, "path": path})
    return {**entry, "saes": checked}


def lookup_from_entry(name: str, entry: Mapping[str, Any], lookup_cls: type | None = None) -> Any:
    """SAELens's ``PretrainedSAELookup`` for one checked entry, field by field of the dataclass.

    Known fields get SAELens's own defaults (variance explained 1.0, L0 0.0); a field this code
    does not know takes the entry's top-level key of that name, else its default, else None.
    """
    if lookup_cls is None:
        from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup as lookup_cls
    saes = entry["saes"]
    known: dict[str, Any] = {
        "release": name,
        "repo_id": entry["repo_id"],
        "model": entry["model"],
        "conversion_func": entry.get("conversion_func"),
        "config_overrides": entry.get("config_overrides"),
        "saes_map": {s["id"]: s["path"] for s in saes},
        "expected_var_explained": {s["id"]: s.get("variance_explained", 1.0) for s in saes},
        "expected_l0": {s["id"]: s.get("l0", 0.0) for s in saes},
        "neuronpedia_id": {s["id"]: s.get("neuronpedia") for s in saes},
        "norm_scaling_factor": {
            s["id"]: s["norm_scaling_factor"] for s in saes if "norm_scaling_factor" in s
        },
    }
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(lookup_cls):
        if not f.init:
            continue
        if f.name in known:
            kwargs[f.name] = known[f.name]
        elif f.name in entry:
            kwargs[f.name] = entry[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            kwargs[f.name] = None
    return lookup_cls(**kwargs)


def read_releases_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """The releases mapping of a YAML (or JSON) file; an empty file is no releases. Every entry
    is checked (:class:`ReleaseError` naming the file, release and field)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ReleaseError(f"releases file {path}: cannot be read: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ReleaseError(
            f"releases file {path}: must map release names to entries, got {type(data).__name__}"
        )
    return {name: check_release(name, entry, str(path)) for name, entry in data.items()}


def merge_releases(
    directory: dict[str, Any],
    releases: Mapping[str, Any],
    source: str,
    lookup_cls: type | None = None,
) -> tuple[list[str], list[str]]:
    """Add ``releases`` (name → entry) from ``source`` to ``directory`` in place.

    Returns ``(added, skipped)``: a name already in the directory is skipped with a warning; an
    entry off the schema raises :class:`ReleaseError` before anything is added.
    """
    if not isinstance(releases, Mapping):
        raise ReleaseError(f"{source} returned {type(releases).__name__}, expected a mapping")
    lookups = {
        name: lookup_from_entry(name, check_release(name, entry, source), lookup_cls)
        for name, entry in releases.items()
    }
    added, skipped = [], []
    for name, lookup in lookups.items():
        if name in directory:
            logger.warning(
                "SAELens release %r from %s is already in the pretrained-SAE directory (repo %s); "
                "skipped, the existing entry is kept",
                name,
                source,
                getattr(directory[name], "repo_id", "?"),
            )
            skipped.append(name)
        else:
            directory[name] = lookup
            added.append(name)
    return added, skipped


_lock = threading.RLock()
_merged = False
_merging = False
_original: Callable[[], dict[str, Any]] | None = None
_add_releases: Callable[[dict[str, Any]], None] | None = None


def lookup_directory() -> dict[str, Any]:
    """SAELens's ``get_pretrained_saes_directory()`` with every plugin's releases added, on the
    first call; the same cached dict afterwards."""
    global _merged, _merging
    assert _original is not None, "install_directory_hook() was not called"
    directory = _original()
    if _merged:
        return directory
    with _lock:  # another thread merging: wait for it
        if not _merged and not _merging:  # _merging: a plugin hook looking the directory up
            _merging = True
            try:
                if _add_releases is not None:
                    _add_releases(directory)
            finally:
                _merging = False
            _merged = True
    return directory


def _cache_clear() -> None:
    """Clear SAELens's cache; the next lookup rebuilds the directory and adds the releases again."""
    global _merged
    with _lock:
        if _original is not None:
            _original.cache_clear()  # type: ignore[attr-defined]
        _merged = False


lookup_directory.cache_clear = _cache_clear  # type: ignore[attr-defined]
lookup_directory.cache_info = lambda: _original.cache_info()  # type: ignore[attr-defined,union-attr]


def install_directory_hook(add_releases: Callable[[dict[str, Any]], None]) -> None:
    """Put :func:`lookup_directory` in place of SAELens's ``get_pretrained_saes_directory`` in
    its module and in every module already imported that holds it (``sae_lens.saes.sae``,
    ``sae_lens.evals``, ...); its first call runs ``add_releases(directory)``. Reads nothing;
    idempotent."""
    global _original, _add_releases
    from sae_lens.loading import pretrained_saes_directory as module

    with _lock:
        _add_releases = add_releases
        current = getattr(module, DIRECTORY_FUNCTION)
        if current is lookup_directory:
            return
        _original = current
        for mod in list(sys.modules.values()):
            namespace = getattr(mod, "__dict__", None)
            if isinstance(namespace, dict) and namespace.get(DIRECTORY_FUNCTION) is current:
                setattr(mod, DIRECTORY_FUNCTION, lookup_directory)


def directory_is_merged() -> bool:
    """Whether the plugins' releases have been added (a release lookup has happened)."""
    return _merged
