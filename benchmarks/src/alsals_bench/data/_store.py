"""Where fetched data lives, and the error raised when a loader finds it missing.

Shared by ``fetch`` (which writes one folder per source plus a ``MANIFEST.json``)
and ``offline`` (which reads them), so both agree on the layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV_VAR = "ALSALS_DATA_DIR"
MANIFEST = "MANIFEST.json"


class DataNotFoundError(FileNotFoundError):
    """A fetched source (or one of its files) is missing; the message says how to fetch it."""


def data_dir() -> Path:
    """The folder holding all fetched sources: ``$ALSALS_DATA_DIR`` or ``~/.cache/alsals``."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "alsals"


def fetch_hint(name: str) -> str:
    """The command that fetches source ``name``, for error messages."""
    return (
        f"run `alsals-bench fetch --only {name}` "
        f"(or `python -m alsals_bench.data.fetch --only {name}`)"
    )


def folder_origin(given: str | None, alternatives: str) -> str:
    """Where the data folder came from, for an error about it: ``given`` (what named it
    explicitly), else ``$ALSALS_DATA_DIR``, else the default (``alternatives`` say how to
    name another)."""
    if given is not None:
        return given
    if os.environ.get(ENV_VAR):
        return f"${ENV_VAR}"
    return f"the default; set {alternatives} to use another"


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The parsed ``MANIFEST.json`` of a source folder, or None if absent or unreadable."""
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def source_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """The folder of fetched source ``name`` under ``root`` (default ``data_dir()``).

    Raises DataNotFoundError unless the folder holds a readable manifest: fetch writes
    the manifest last, so its presence means the fetch completed. A data root that is a
    file gets its own message: fetching alone would not help.
    """
    base = Path(root).expanduser() if root is not None else data_dir()
    if base.exists() and not base.is_dir():  # fetch could not help: say what to change
        argument = "the loader's root argument" if root is not None else None
        where = folder_origin(argument, f"${ENV_VAR}")
        raise DataNotFoundError(
            f"the data folder {base} ({where}) is a file, not a folder: use a folder, "
            f"then {fetch_hint(name)}"
        )
    folder = base / name
    if read_manifest(folder) is None:
        raise DataNotFoundError(
            f"data source {name!r} is not in {folder} (no valid {MANIFEST}); {fetch_hint(name)}"
        )
    return folder


def source_file(name: str, relpath: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Path of one fetched file, raising DataNotFoundError (with the fix) if it is missing."""
    path = source_dir(name, root) / relpath
    if not path.is_file():
        raise DataNotFoundError(
            f"{path} is missing although {name!r} was fetched; {fetch_hint(name)} --force"
        )
    return path
