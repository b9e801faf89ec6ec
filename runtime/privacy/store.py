"""The privacy budget a device has spent, kept on the device, one JSON file per job.

Flower's Opacus example builds a new ``PrivacyEngine`` every round, so the epsilon it shows
is per round and a restarted client starts from zero. A device that forgets what it spent
can be made to spend it again; so the agent saves its accountant here after every round
(before the update leaves the device) and loads it back when it starts.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from ..files import replace_atomically
from .accountant import PrivacyAccountant

__all__ = ["BudgetFileError", "BudgetRecord", "BudgetStore"]

_FORMAT_VERSION = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class BudgetFileError(ValueError):
    """A budget file exists but cannot be trusted (corrupt, foreign, another format)."""


class BudgetRecord(NamedTuple):
    """What was saved for a job: the accountant and the caller's extra facts (for the agent:
    the calibrated noise multiplier, planned steps, delta, target)."""

    accountant: PrivacyAccountant
    extra: dict[str, Any]


class BudgetStore:
    """Per-job privacy accountants persisted under ``root``.

    Writes are atomic (temporary file in the same folder, fsync, ``os.replace``, fsync of the
    folder), so a crash leaves either the old file or the new one. A file that cannot be read
    raises rather than reading as "nothing spent": losing a budget silently would reset it.
    """

    def __init__(self, root: Path) -> None:
        self._root = Path(root)

    @property
    def root(self) -> Path:
        return self._root

    def path_for(self, job: str) -> Path:
        """The file holding ``job``'s budget. Job names may hold ``/`` (namespace/name) or
        anything else; the file name keeps the safe characters for people and adds a hash
        of the exact name so that distinct jobs never share a file."""
        if not job:
            raise ValueError("job name must not be empty")
        readable = _UNSAFE.sub("_", job).lstrip(".")[:80] or "job"
        digest = hashlib.sha256(job.encode("utf-8")).hexdigest()[:16]
        return self._root / f"{readable}-{digest}.json"

    def read(self, job: str) -> BudgetRecord | None:
        """The saved accountant and extra facts of ``job``, or None if none was saved.
        Raises :class:`BudgetFileError` when a file exists but cannot be trusted."""
        path = self.path_for(job)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise BudgetFileError(f"privacy budget file {path} is not valid JSON: {error}") from None
        if not isinstance(document, dict) or document.get("version") != _FORMAT_VERSION:
            raise BudgetFileError(
                f"privacy budget file {path} is not a version {_FORMAT_VERSION} budget document"
            )
        if document.get("job") != job:
            raise BudgetFileError(
                f"privacy budget file {path} belongs to job {document.get('job')!r}, not {job!r}"
            )
        extra = document.get("extra")
        if not isinstance(extra, dict):
            raise BudgetFileError(f"privacy budget file {path} has no 'extra' object")
        try:
            accountant = PrivacyAccountant.from_state_dict(document.get("accountant"))
        except (ValueError, TypeError) as error:
            raise BudgetFileError(f"privacy budget file {path}: {error}") from None
        return BudgetRecord(accountant, extra)

    def load(self, job: str) -> PrivacyAccountant | None:
        """The saved accountant of ``job``, or None if none was saved."""
        record = self.read(job)
        return None if record is None else record.accountant

    def save(
        self, job: str, accountant: PrivacyAccountant, *, extra: Mapping[str, Any]
    ) -> None:
        """Replace ``job``'s saved budget with ``accountant``'s state and ``extra`` (which
        must be JSON-serialisable; checked before anything touches the disk)."""
        path = self.path_for(job)
        document = {
            "version": _FORMAT_VERSION,
            "job": job,
            "accountant": accountant.state_dict(),
            "extra": dict(extra),
        }
        payload = json.dumps(document, indent=2, sort_keys=True, allow_nan=False)
        replace_atomically(path, lambda handle: handle.write(payload.encode("utf-8")))

