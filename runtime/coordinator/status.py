"""Where the coordinator publishes progress.

The round engine knows nothing about Kubernetes or files: it hands each new job status,
each client's state and each milestone to a StatusSink. Locally that sink writes
metrics.jsonl and the console; in a cluster it patches the FederatedJob's status
subresource and the ClientNode objects (see runtime/kube/sink.py).
"""

from __future__ import annotations

from typing import Protocol

from ..spec import ClientNodeSpec, ClientNodeStatus, FederatedJobStatus


class StatusSink(Protocol):
    """Receives progress; implementations must not raise into the round engine for
    transient failures (log and retry on the next call instead)."""

    def publish_job(self, status: FederatedJobStatus) -> None:
        """The whole current status of the job (called after every change)."""

    def publish_client(self, spec: ClientNodeSpec, status: ClientNodeStatus) -> None:
        """One client's facts and state (on register, heartbeat phase changes, rounds)."""

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        """A milestone: created, running, round N, finished."""


class FanOut:
    """Sends everything to several sinks, so local output and Kubernetes can coexist."""

    def __init__(self, *sinks: StatusSink) -> None:
        self._sinks = sinks

    def publish_job(self, status: FederatedJobStatus) -> None:
        for sink in self._sinks:
            sink.publish_job(status)

    def publish_client(self, spec: ClientNodeSpec, status: ClientNodeStatus) -> None:
        for sink in self._sinks:
            sink.publish_client(spec, status)

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        for sink in self._sinks:
            sink.event(reason, message, warning=warning)
