"""The coordinator's StatusSink inside a cluster: progress into the FederatedJob's status
subresource, one ClientNode per registered agent, milestones as Events.

The round engine must never wait on the API server, so every call here only records
the latest value and wakes a background thread; that thread sends what is newest
(coalescing a burst of job statuses into one PATCH), retries transient failures with
backoff, and drops what the server refuses for good (logged). `close()` (also run at
interpreter exit) sends what is still pending, so the final phase reaches the job.

The job status goes by server-side apply on the status subresource under the field
manager fedkube-coordinator, holding only the coordinator's share (spec.CONDITION_OWNERS,
spec.STATUS_FIELD_OWNERS): the operator's fields and conditions are the API server's to
keep, and each apply is the whole of what the coordinator says, so nothing needs reading
first. ClientNodes are applied the same way (object, then status).

Only the `kubernetes` client is used here, never kopf: this runs in the coordinator pod
with the job's own ServiceAccount (see operator/resources.py for its Role).
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import datetime
import hashlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from ..spec import (
    API_GROUP_VERSION,
    QUARANTINE_LABEL,
    TERMINAL_PHASES,
    ClientNodeSpec,
    ClientNodeStatus,
    ClientPhase,
    FederatedJobStatus,
    Writer,
    owned_status,
)
from .client import KubeClient
from .status import JobStatusWriter

log = logging.getLogger("fedkube.kube.sink")
FIELD_MANAGER = Writer.coordinator.field_manager

Obj = dict[str, Any]

_TRANSIENT_STATUS = frozenset({0, 409, 429, 500, 502, 503, 504})
_EVENT_BACKLOG = 256
_MAX_NAME = 253
_INVALID_NAME_CHARS = re.compile(r"[^a-z0-9.-]+")


def client_node_name(job: str, node_id: str) -> str:
    """`<job>-<node id>` made a valid object name (DNS subdomain): lowercase, other
    characters as `-`, and a hash suffix where it had to be shortened, so two long ids
    never collide."""
    raw = f"{job}-{node_id}"
    name = _INVALID_NAME_CHARS.sub("-", raw.lower()).strip("-.")
    if len(name) > _MAX_NAME or name != raw:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        name = f"{name[:_MAX_NAME - 9].rstrip('-.')}-{digest}"
    return name


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _transient(error: Exception) -> bool:
    if isinstance(error, _JobGone):
        return False
    if isinstance(error, ApiException):
        return (error.status or 0) in _TRANSIENT_STATUS
    return True  # connection refused, timeouts, TLS hiccups: the server may come back


class KubernetesStatusSink:
    """StatusSink writing to the Kubernetes API; see the module docstring."""

    def __init__(
        self,
        *,
        job_name: str,
        namespace: str,
        api_client: ApiClient | None = None,
        heartbeat_refresh_seconds: float = 10.0,
        max_backoff_seconds: float = 10.0,
    ) -> None:
        self.job_name = job_name
        self.namespace = namespace
        self._client = KubeClient(api_client, timeout_seconds=15)
        self._status = JobStatusWriter(self._client, Writer.coordinator)
        self._heartbeat_refresh = heartbeat_refresh_seconds
        self._max_backoff = max_backoff_seconds
        self._owner_uid: str | None = None
        self._created: set[str] = set()
        # name -> (spec as sent, status as sent without lastHeartbeat, when)
        self._sent: dict[str, tuple[Obj, Obj, float]] = {}

        self._cv = threading.Condition()
        self._job: FederatedJobStatus | None = None
        self._clients: dict[str, tuple[ClientNodeSpec, ClientNodeStatus]] = {}
        self._events: collections.deque[tuple[str, str, bool, str]] = collections.deque(
            maxlen=_EVENT_BACKLOG)
        self._busy = False
        self._job_went_last = False
        self._client_went_last = False
        self._closing_deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name="kube-status", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # ------------------------------------------------------------ StatusSink

    def publish_job(self, status: FederatedJobStatus) -> None:
        with self._cv:
            self._job = status.model_copy(deep=True)
            self._cv.notify()

    def publish_client(self, spec: ClientNodeSpec, status: ClientNodeStatus) -> None:
        with self._cv:
            self._clients[spec.node_id] = (spec.model_copy(deep=True),
                                           status.model_copy(deep=True))
            self._cv.notify()

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        with self._cv:
            self._events.append((reason, message, warning, _now()))
            self._cv.notify()

    # ------------------------------------------------------------ lifecycle

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything published so far was sent (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._has_work() or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Send what is pending (trying for at most `timeout` seconds), then stop."""
        with self._cv:
            if self._closing_deadline is None:
                self._closing_deadline = time.monotonic() + timeout
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout + 1)
        atexit.unregister(self.close)

    def _has_work(self) -> bool:
        return self._job is not None or bool(self._clients) or bool(self._events)

    # ------------------------------------------------------------ the sender

    def _run(self) -> None:
        backoff = 0.0
        while True:
            with self._cv:
                while not self._has_work() and self._closing_deadline is None:
                    self._cv.wait()
                if self._closing_deadline is not None and (
                        not self._has_work() or time.monotonic() > self._closing_deadline):
                    if self._has_work():
                        log.warning("gave up sending status to the API server at shutdown")
                    self._cv.notify_all()
                    return
                item = self._take()
                self._busy = True
            done = self._attempt(item.what, item.send)
            with self._cv:
                self._busy = False
                if not done:
                    self._put_back(item)
                self._cv.notify_all()
            if done:
                backoff = 0.0
                continue
            backoff = min(self._max_backoff, backoff * 2 or 0.5)
            with self._cv:
                # Sleep, but wake up for close() so shutdown is not delayed by a backoff.
                if self._closing_deadline is None:
                    self._cv.wait(backoff)

    def _take(self) -> _Item:
        """The next thing to send. The job's status goes every other send at least: it is
        what `kubectl get fj` shows and what must land at shutdown, so behind a slow API
        server it waits for one ClientNode or Event at most, and they in turn are not
        starved by a stream of job statuses, nor Events by ClientNodes. Called with the
        lock held."""
        others = bool(self._clients or self._events)
        # A final status goes after everything else of the same moment: once it reads
        # Succeeded the operator removes this pod, and what is still queued is lost.
        final = self._job is not None and self._job.phase in TERMINAL_PHASES
        if self._job is not None and not (others and (self._job_went_last or final)):
            job, self._job = self._job, None
            self._job_went_last = True
            return _Item("job status", lambda: self._patch_job(job), job=job)
        self._job_went_last = False
        # Nor do ClientNodes (a heartbeat or round change of some node is nearly always
        # queued on a busy job) starve the Events: with both queued, they take turns.
        if self._clients and not (self._events and self._client_went_last):
            self._client_went_last = True
            node_id = next(iter(self._clients))
            spec, status = self._clients.pop(node_id)
            return _Item(f"ClientNode {node_id}", lambda: self._upsert_client(spec, status),
                         client=(node_id, spec, status))
        self._client_went_last = False
        event = self._events.popleft()
        return _Item(f"event {event[0]}", lambda: self._post_event(*event), event=event)

    def _put_back(self, item: _Item) -> None:
        """Queue a failed send again, unless something newer replaced it meanwhile."""
        if item.job is not None and self._job is None:
            self._job = item.job
        elif item.client is not None:
            node_id, spec, status = item.client
            self._clients.setdefault(node_id, (spec, status))
        elif item.event is not None:
            self._events.appendleft(item.event)

    def _attempt(self, what: str, action: Any) -> bool:
        """Run `action`; True when done or refused for good (nothing to retry)."""
        try:
            action()
        except Exception as error:  # noqa: BLE001  (the sender thread must survive anything)
            status = getattr(error, "status", None)
            if _transient(error):
                log.warning("sending %s failed (will retry): %s", what,
                            f"HTTP {status}" if status else error)
                return False
            log.error("the API server refused %s (HTTP %s), dropped: %s", what, status,
                      getattr(error, "body", "") or error)
        return True

    # ------------------------------------------------------------ API calls

    def _owner(self) -> str:
        """The job's uid, read once (ownerReferences and Events name it)."""
        if self._owner_uid is None:
            job = self._client.get(API_GROUP_VERSION, "FederatedJob", self.namespace,
                                   self.job_name)
            if job is None:
                raise _JobGone(f"FederatedJob {self.namespace}/{self.job_name} is gone")
            self._owner_uid = job["metadata"]["uid"]
        return self._owner_uid

    def _patch_job(self, status: FederatedJobStatus) -> None:
        try:
            self._status.apply(self.namespace, self.job_name,
                               owned_status(status.to_wire(), Writer.coordinator))
        except ApiException as error:
            if error.status == 404:
                raise _JobGone(f"FederatedJob {self.namespace}/{self.job_name} is gone",
                               ) from error
            raise

    def _client_node(self, spec: ClientNodeSpec, name: str, *, quarantined: bool = False) -> Obj:
        labels = {
            "app.kubernetes.io/name": "fedkube",
            "app.kubernetes.io/component": "client",
            "app.kubernetes.io/managed-by": "fedkube-coordinator",
            "fedkube.io/job": self.job_name,
        }
        if quarantined:
            # Ours while the node is Quarantined; a user who removes it releases the node
            # (quarantine_cleared), and our next apply without it keeps it removed.
            labels[QUARANTINE_LABEL] = "true"
        return {
            "apiVersion": API_GROUP_VERSION,
            "kind": "ClientNode",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": labels,
                # Deleting the job deletes its ClientNodes. No blockOwnerDeletion: that
                # would need update rights on the job's finalizers.
                "ownerReferences": [{
                    "apiVersion": API_GROUP_VERSION, "kind": "FederatedJob",
                    "name": self.job_name, "uid": self._owner(), "controller": True,
                }],
            },
            "spec": spec.model_copy(update={"job": self.job_name}).to_wire(),
        }

    def _upsert_client(self, spec: ClientNodeSpec, status: ClientNodeStatus) -> None:
        name = client_node_name(self.job_name, spec.node_id)
        spec_wire = spec.model_copy(update={"job": self.job_name}).to_wire()
        status_wire = status.to_wire()
        quarantined = status.phase == ClientPhase.quarantined
        # The quarantine label is part of the object we apply: a change of it re-applies.
        spec_wire = {**spec_wire, "_quarantined": quarantined}
        without_heartbeat = {k: v for k, v in status_wire.items() if k != "lastHeartbeat"}
        sent = self._sent.get(name)
        if sent is not None and sent[:2] == (spec_wire, without_heartbeat) and (
                time.monotonic() - sent[2] < self._heartbeat_refresh):
            return  # only the heartbeat moved, and it was refreshed recently
        try:
            if name not in self._created or sent is None or sent[0] != spec_wire:
                # Creates it, or updates an agent that came back with other facts.
                self._client.apply(self._client_node(spec, name, quarantined=quarantined),
                                   field_manager=FIELD_MANAGER, force=True)
                self._created.add(name)
            self._client.apply(
                {"apiVersion": API_GROUP_VERSION, "kind": "ClientNode",
                 "metadata": {"name": name, "namespace": self.namespace},
                 "status": status_wire},
                field_manager=FIELD_MANAGER, force=True, subresource="status")
        except ApiException as error:
            if error.status != 404:
                raise
            # Deleted behind our back (kubectl delete cn): create it again on the retry.
            self._created.discard(name)
            self._sent.pop(name, None)
            raise _Vanished(f"ClientNode {name} disappeared") from error
        self._sent[name] = (spec_wire, without_heartbeat, time.monotonic())

    def quarantine_cleared(self, node_ids: Collection[str]) -> set[str]:
        """Those of `node_ids` (Quarantined, labelled by us) whose ClientNode no longer
        carries the quarantine label: a user removed it to release them. Read directly,
        from the engine's worker thread; a node not yet written, or that cannot be read
        now, counts as not cleared."""
        cleared = set()
        for node_id in node_ids:
            name = client_node_name(self.job_name, node_id)
            sent = self._sent.get(name)
            if sent is None or not sent[0].get("_quarantined"):
                continue  # our label is not on it yet
            try:
                node = self._client.get(API_GROUP_VERSION, "ClientNode", self.namespace, name)
            except Exception as error:  # noqa: BLE001 - unreachable: its rounds release it
                log.warning("cannot read ClientNode %s for a quarantine release: %s", name, error)
                continue
            labels = ((node or {}).get("metadata") or {}).get("labels") or {}
            if node is not None and labels.get(QUARANTINE_LABEL) != "true":
                cleared.add(node_id)
        return cleared

    def _post_event(self, reason: str, message: str, warning: bool, at: str) -> None:
        involved: Obj = {"apiVersion": API_GROUP_VERSION, "kind": "FederatedJob",
                         "name": self.job_name, "namespace": self.namespace}
        involved["uid"] = self._owner()
        self._client.create({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{self.job_name}.", "namespace": self.namespace},
            "involvedObject": involved,
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": "fedkube-coordinator"},
            "reportingComponent": "fedkube-coordinator",
            "reportingInstance": socket.gethostname(),
            "firstTimestamp": at,
            "lastTimestamp": at,
            "count": 1,
        })


class _JobGone(Exception):
    """The FederatedJob was deleted: nothing more can be written about it."""

    status = 404


class _Vanished(Exception):
    """An object we created is gone; retrying recreates it (transient by design)."""


@dataclasses.dataclass
class _Item:
    """One thing for the sender to send, and what to queue again if that fails."""

    what: str
    send: Callable[[], None]
    job: FederatedJobStatus | None = None
    client: tuple[str, ClientNodeSpec, ClientNodeStatus] | None = None
    event: tuple[str, str, bool, str] | None = None
