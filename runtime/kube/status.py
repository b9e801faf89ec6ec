"""The one writer of a FederatedJob's status: server-side apply of one writer's share.

Each of the two writers (operator, coordinator; `spec.Writer`) applies, on the status
subresource and under its own field manager, exactly the fields and condition types
that `spec.STATUS_FIELD_OWNERS` / `spec.CONDITION_OWNERS` give it, and refuses anything
else. Server-side apply then does the merging that used to be hand-written: the API
server keeps the other writer's fields and conditions (status.conditions is a list-map
keyed by type), and removes what this writer applied before but leaves out now.

Apply is always forced: the tables make the two shares disjoint, so force only takes a
field over from someone outside them (a `kubectl patch`, or an older fedkube whose merge
patches left it owned by an Update manager) rather than failing forever on it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, Literal

from kubernetes.client.exceptions import ApiException

from ..spec import (
    API_GROUP_VERSION,
    Condition,
    Writer,
    check_owned,
    owned_status,
    upsert_condition,
)
from .client import KubeClient, Obj

_ATTEMPTS = 5


class JobStatusWriter:
    """Applies `writer`'s share of FederatedJob statuses."""

    def __init__(self, client: KubeClient, writer: Writer) -> None:
        self.client = client
        self.writer = writer

    def apply(self, namespace: str, name: str, share: Mapping[str, Any], *,
              resource_version: str | None = None) -> Obj:
        """Apply `share` (wire form: camelCase keys) as the whole of this writer's part
        of the job's status. NotOwnedError if it holds a field or condition type this
        writer does not own; with `resource_version`, a 409 if the job changed since."""
        check_owned(share, self.writer)
        metadata: Obj = {"name": name, "namespace": namespace}
        if resource_version is not None:
            metadata["resourceVersion"] = resource_version
        return self.client.apply(
            {"apiVersion": API_GROUP_VERSION, "kind": "FederatedJob", "metadata": metadata,
             "status": dict(share)},
            field_manager=self.writer.field_manager, force=True, subresource="status")

    def update(self, namespace: str, name: str,
               change: Callable[[dict[str, Any]], None]) -> tuple[Obj, Obj] | None:
        """Read this writer's current share, let `change` edit it in place, apply the
        result; (before, after), or None when the job is gone. The read and the apply
        are guarded by resourceVersion and retried on a conflict, so a writer with
        several concurrent handlers (kopf's timers run beside its change handlers) never
        applies a share that lacks what another handler just wrote."""
        for _ in range(_ATTEMPTS):
            current = self.client.get(API_GROUP_VERSION, "FederatedJob", namespace, name,
                                      subresource="status")
            if current is None:
                return None
            before = owned_status(current.get("status") or {}, self.writer)
            after = copy.deepcopy(before)
            change(after)
            if after == before:
                return before, after
            try:
                self.apply(namespace, name, after,
                           resource_version=current["metadata"].get("resourceVersion"))
            except ApiException as error:
                if error.status != 409:
                    raise
                continue
            return before, after
        raise ApiException(status=409, reason=f"the status of FederatedJob {namespace}/{name} "
                           f"kept changing under the {self.writer.value}")


def set_condition(
    share: dict[str, Any],
    *,
    type: str,
    status: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    now: str,
    observed_generation: int | None = None,
) -> None:
    """Upsert one condition into a share (wire form), in place; lastTransitionTime moves
    only when the status flips."""
    current = [Condition.model_validate(c) for c in share.get("conditions") or []]
    updated = upsert_condition(current, type=type, status=status, reason=reason,
                               message=message, now=now,
                               observed_generation=observed_generation)
    share["conditions"] = [c.to_wire() for c in updated]


def condition(share: Mapping[str, Any], type: str) -> Mapping[str, Any] | None:
    """The condition of `type` in a status or share (wire form), or None."""
    return next((c for c in share.get("conditions") or [] if c.get("type") == type), None)
