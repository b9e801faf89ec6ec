"""Durable replacement of a small state file (privacy budgets, error-feedback residuals):
after a crash the file holds the old contents or the new, never a torn mix, because the new
bytes are written beside it, synced, renamed over it, and the folder's entry synced."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def replace_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Make `path` hold what `write` writes to the binary handle it is given; on any error
    `path` is left as it was and no temporary file stays behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                             dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    # The rename is only durable once the folder's entry is on disk; not every platform lets
    # a folder be opened for that, and there the rename is as durable as it gets.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(descriptor)
    finally:
        os.close(descriptor)
