"""Outputs that never replace a user's files silently, and never half-replace them.

A command that writes a file or folder first calls :func:`refuse_existing`: an existing output is an
:class:`OutputExistsError` naming the path and ``--overwrite``. With ``--overwrite`` the new output
is written beside the old one (:func:`replacing_file`, :func:`replacing_dir`: a sibling temporary
path in the same folder, so the final rename stays on one file system) and renamed into place only
once it is complete; an interrupted write leaves the old copy whole and removes the temporary one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputExistsError(FileExistsError):
    """An output path already holds something and ``--overwrite`` was not given."""


def refuse_existing(path: str | Path, overwrite: bool, what: str) -> None:
    """Raise :class:`OutputExistsError` if ``path`` exists (a non-empty folder, for a folder
    output) and ``overwrite`` is false; ``what`` names the option that gave the path."""
    path = Path(path)
    if overwrite or not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    kind = "folder" if path.is_dir() else "file"
    raise OutputExistsError(
        f"{what} {path}: the {kind} already exists; refusing to overwrite it. Pass --overwrite "
        "to replace it (the new output is written beside it and renamed into place when complete)."
    )


@contextmanager
def replacing_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path``
    atomically (``os.replace``), on an exception it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def replacing_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of ``path``; on success it takes ``path``'s place
    (the old folder is moved aside, the new one renamed in, then the old one deleted), on an
    exception it is deleted and ``path`` is untouched. Nothing of the old folder survives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:
                os.replace(old / path.name, path)
            raise
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
