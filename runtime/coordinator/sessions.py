"""Session credentials: what proves, after Register, that a caller is the node it names.

A node id alone is no authority (ids are predictable and shown on ClientNodes). Register
issues a random credential bound to the id; every later call presents it, and it is
compared in constant time. The credentials live in memory only: after a coordinator
restart every node registers again and gets a fresh one.
"""

from __future__ import annotations

import secrets

from ..messages import Rejected, RejectReason


class SessionBook:
    """node id -> the one credential currently valid for it."""

    def __init__(self) -> None:
        self._credentials: dict[str, str] = {}

    def issue(self, node_id: str) -> str:
        """A new credential for `node_id`; any earlier one stops working."""
        credential = secrets.token_urlsafe(32)
        self._credentials[node_id] = credential
        return credential

    def holds(self, node_id: str, credential: str) -> bool:
        """Whether `credential` is the one issued for `node_id` (constant-time)."""
        expected = self._credentials.get(node_id)
        # Compare against something even for unknown ids, so timing says nothing.
        return secrets.compare_digest(
            (expected or "\0").encode(), (credential or "").encode()) and expected is not None

    def check(self, node_id: str, credential: str) -> None:
        """Raises Rejected(UNAUTHENTICATED) unless `credential` belongs to `node_id`."""
        if not self.holds(node_id, credential):
            raise Rejected(RejectReason.UNAUTHENTICATED,
                           f"no valid session for node {node_id!r}: register and present the "
                           "session credential as gRPC metadata 'fedkube-session'")

    def forget(self, node_id: str) -> None:
        self._credentials.pop(node_id, None)

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._credentials
