"""Folders the subcommands write into, checked before any work: a folder that cannot take
the files (a file in its place, no permission, a read-only disk) is found in a second, not
as a traceback after an hour of training or measuring."""

from __future__ import annotations

import tempfile
from pathlib import Path


class FolderError(Exception):
    """A folder that cannot take files; the message completes ``<folder> ...``."""


def writable_folder(folder: Path) -> None:
    """Make ``folder`` (and its parents) if missing, then create and remove a temporary
    file there: the one test of writing that holds for every cause (permissions, read-only
    mounts, ``root``'s overrides). A ``FolderError`` says which step failed."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FolderError("is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FolderError(f"cannot be created ({err.strerror or err})") from None
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".alsals-write-check-"):
            pass
    except OSError as err:
        raise FolderError(f"cannot be written to ({err.strerror or err})") from None
