"""A folder no file can be written in, for the tests of the checks made before any work."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


def unwritable(folder: Path, monkeypatch) -> Path:
    """Make ``folder`` (created if missing) read-only: mode 0o555. Where the mode stops no
    write (as root), the write check's probe, the temporary file that
    ``alsals_bench._paths.writable_folder`` creates there, is refused as the mode would
    refuse it: the check under test is the same either way."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    probe = folder / ".probe"
    try:
        probe.touch()
    except PermissionError:
        return folder  # the mode holds: a real read-only folder
    probe.unlink()
    real = tempfile.NamedTemporaryFile

    def refuse(*args, **kwargs):
        if kwargs.get("dir") is not None and Path(kwargs["dir"]).resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    return folder
