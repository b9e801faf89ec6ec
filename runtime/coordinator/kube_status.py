"""The coordinator's StatusSink inside a cluster: progress into the FederatedJob's status
subresource, one ClientNode per registered agent, milestones as Events.

The round engine must never wait on the API server, so every call here only records
the latest value and wakes a background thread; that thread sends what is newest
(coalescing a burst of job statuses into one PATCH), retries transient failures with
backoff, and drops what the server refuses for good (logged). `close()` (also run at
interpreter exit) sends what is still pending, so the final phase reaches the job.

Conditions are shared with the operator, which owns SpecAccepted, Insecure, Degraded
and SpecChangeRefused: a merge patch would replace the whole list, so each job PATCH
first reads the current conditions, upserts the coordinator's by type and sends the
result with the resourceVersion it read (a 409 means someone wrote in between: reread).

Only the `kubernetes` client is used here, never kopf: this runs in the coordinator pod
with the job's own ServiceAccount (see operator/resources.py for its Role).
"""

from __future__ import annotations

import atexit
import collections
import datetime
import hashlib
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import kubernetes
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from ..spec import (
    API_GROUP_VERSION,
    ClientNodeSpec,
    ClientNodeStatus,
    FederatedJobStatus,
)

log = logging.getLogger("fedkube.coordinator.kube_status")

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


def merge_conditions(server: list[Mapping[str, Any]], ours: list[Mapping[str, Any]]) -> list[Obj]:
    """The server's conditions with ours upserted by type: the operator's types survive,
    ours replace theirs of the same type, order is kept and new types are appended."""
    by_type = {c["type"]: dict(c) for c in ours}
    merged = [by_type.pop(c["type"], dict(c)) for c in server]
    return merged + list(by_type.values())


def _connect() -> ApiClient:
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return ApiClient()


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
        self._api = api_client if api_client is not None else _connect()
        self._heartbeat_refresh = heartbeat_refresh_seconds
        self._max_backoff = max_backoff_seconds
        self._job_path = (f"/apis/{API_GROUP_VERSION}/namespaces/{namespace}"
                          f"/federatedjobs/{job_name}")
        self._nodes_path = f"/apis/{API_GROUP_VERSION}/namespaces/{namespace}/clientnodes"
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
                job, self._job = self._job, None
                clients, self._clients = self._clients, {}
                events = list(self._events)
                self._events.clear()
                self._busy = True
            retry = self._send(job, clients, events)
            with self._cv:
                self._busy = False
                if retry.job is not None and self._job is None:
                    self._job = retry.job  # nothing newer arrived meanwhile
                for node_id, update in retry.clients.items():
                    self._clients.setdefault(node_id, update)
                self._events.extendleft(reversed(retry.events))
                self._cv.notify_all()
            if retry.empty():
                backoff = 0.0
                continue
            backoff = min(self._max_backoff, backoff * 2 or 0.5)
            with self._cv:
                # Sleep, but wake up for close() so shutdown is not delayed by a backoff.
                if self._closing_deadline is None:
                    self._cv.wait(backoff)

    def _send(self, job: FederatedJobStatus | None,
              clients: dict[str, tuple[ClientNodeSpec, ClientNodeStatus]],
              events: list[tuple[str, str, bool, str]]) -> _Retry:
        retry = _Retry()
        for node_id, (spec, status) in clients.items():
            if not self._attempt(f"ClientNode {node_id}",
                                 lambda s=spec, st=status: self._upsert_client(s, st)):
                retry.clients[node_id] = (spec, status)
        for index, item in enumerate(events):
            if not self._attempt(f"event {item[0]}", lambda i=item: self._post_event(*i)):
                retry.events = events[index:]
                break
        # The job's status last: once it reads Succeeded the operator removes this pod, so
        # the ClientNodes and Events of the same moment must already be written.
        if job is not None and not self._attempt("job status", lambda: self._patch_job(job)):
            retry.job = job
        return retry

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

    def _request(self, method: str, path: str, body: Mapping[str, Any] | None = None,
                 content_type: str = "application/json") -> Obj:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, payload, _ = self._api.param_serialize(
            method=method, resource_path=path, header_params=headers,
            body=dict(body) if body is not None else None, auth_settings=["BearerToken"])
        response = self._api.call_api(method, url, header_params=headers, body=payload,
                                      _request_timeout=15)
        data = response.read()
        if not 200 <= response.status <= 299:
            ApiException.from_response(http_resp=response,
                                       body=data.decode("utf-8", "replace"), data=None)
        return json.loads(data) if data else {}

    def _merge_patch(self, path: str, body: Mapping[str, Any]) -> Obj:
        return self._request("PATCH", path, body, "application/merge-patch+json")

    def _owner(self) -> str:
        """The job's uid, read once (ownerReferences and Events name it)."""
        if self._owner_uid is None:
            try:
                self._owner_uid = self._request("GET", self._job_path)["metadata"]["uid"]
            except ApiException as error:
                if error.status == 404:
                    raise _JobGone(f"FederatedJob {self.namespace}/{self.job_name} is gone",
                                   ) from error
                raise
        return self._owner_uid

    def _patch_job(self, status: FederatedJobStatus) -> None:
        wire = status.to_wire()
        for _ in range(5):
            current = self._request("GET", f"{self._job_path}/status")
            server = (current.get("status") or {}).get("conditions") or []
            wire["conditions"] = merge_conditions(server, status.to_wire().get("conditions", []))
            body = {"metadata": {"resourceVersion": current["metadata"].get("resourceVersion")},
                    "status": wire}
            try:
                self._merge_patch(f"{self._job_path}/status", body)
                return
            except ApiException as error:
                if error.status != 409:
                    raise
        raise ApiException(status=409, reason="status kept changing under the coordinator")

    def _client_node(self, spec: ClientNodeSpec, name: str) -> Obj:
        return {
            "apiVersion": API_GROUP_VERSION,
            "kind": "ClientNode",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {
                    "app.kubernetes.io/name": "fedkube",
                    "app.kubernetes.io/component": "client",
                    "app.kubernetes.io/managed-by": "fedkube-coordinator",
                    "fedkube.io/job": self.job_name,
                },
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
        without_heartbeat = {k: v for k, v in status_wire.items() if k != "lastHeartbeat"}
        sent = self._sent.get(name)
        if sent is not None and sent[:2] == (spec_wire, without_heartbeat) and (
                time.monotonic() - sent[2] < self._heartbeat_refresh):
            return  # only the heartbeat moved, and it was refreshed recently
        path = f"{self._nodes_path}/{name}"
        node = self._client_node(spec, name) if name not in self._created else None
        try:
            if node is not None:
                try:
                    self._request("POST", self._nodes_path, node)
                except ApiException as error:
                    if error.status != 409:
                        raise
                    self._merge_patch(path, {"spec": spec_wire})  # an agent that came back
                self._created.add(name)
            elif sent is None or sent[0] != spec_wire:
                self._merge_patch(path, {"spec": spec_wire})
            self._merge_patch(f"{path}/status", {"status": status_wire})
        except ApiException as error:
            if error.status != 404:
                raise
            # Deleted behind our back (kubectl delete cn): create it again on the retry.
            self._created.discard(name)
            self._sent.pop(name, None)
            raise _Vanished(f"ClientNode {name} disappeared") from error
        self._sent[name] = (spec_wire, without_heartbeat, time.monotonic())

    def _post_event(self, reason: str, message: str, warning: bool, at: str) -> None:
        involved: Obj = {"apiVersion": API_GROUP_VERSION, "kind": "FederatedJob",
                         "name": self.job_name, "namespace": self.namespace}
        involved["uid"] = self._owner()
        self._request("POST", f"/api/v1/namespaces/{self.namespace}/events", {
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


class _Retry:
    """What one pass of the sender could not deliver yet."""

    def __init__(self) -> None:
        self.job: FederatedJobStatus | None = None
        self.clients: dict[str, tuple[ClientNodeSpec, ClientNodeStatus]] = {}
        self.events: list[tuple[str, str, bool, str]] = []

    def empty(self) -> bool:
        return self.job is None and not self.clients and not self.events
