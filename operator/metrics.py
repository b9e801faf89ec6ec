"""Prometheus metrics of the operator.

| metric | type | meaning |
|---|---|---|
| fedkube_operator_federatedjobs{phase} | gauge | FederatedJobs the operator sees, by phase |
| fedkube_operator_clientnodes{phase} | gauge | ClientNodes by phase (`Offline` among them) |
| fedkube_operator_reconciliations_total{handler,outcome} | counter | handler runs |
| fedkube_operator_reconcile_duration_seconds{handler} | histogram | handler run time |

Handlers see one object at a time, so the phase gauges are kept from a small index of
(namespace, name) -> phase that the handlers update on every event; every phase is
exported from the start (as 0) so that alerts on e.g. `Failed` have a series to read.
Like the coordinator's, these metrics live in a private registry, so several operators
can run in one test process.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Iterator
from contextlib import contextmanager
from wsgiref.simple_server import WSGIServer

import kopf
from fedkube.runtime.spec import ClientPhase, Phase
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

__all__ = ["CONTENT_TYPE_LATEST", "OperatorMetrics", "Outcome", "serve_operator_metrics"]

DEFAULT_METRICS_PORT = 9090


class Outcome:
    """Values of `outcome` on fedkube_operator_reconciliations_total, following kopf's
    error matrix."""

    SUCCESS = "success"
    TEMPORARY_ERROR = "temporary_error"  # kopf.TemporaryError: retried after its delay
    PERMANENT_ERROR = "permanent_error"  # kopf.PermanentError: a bad spec, not retried
    ERROR = "error"  # anything else: kopf retries with backoff


def classify(error: BaseException | None) -> str:
    """The outcome label for a handler that raised `error` (None: it returned)."""
    if error is None:
        return Outcome.SUCCESS
    if isinstance(error, kopf.TemporaryError):
        return Outcome.TEMPORARY_ERROR
    if isinstance(error, kopf.PermanentError):
        return Outcome.PERMANENT_ERROR
    return Outcome.ERROR


ObjectKey = tuple[str, str]  # (namespace, name)


class OperatorMetrics:
    """The operator's metrics over a private registry; safe to call from kopf's event
    loop and from the thread pool that runs synchronous handlers."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._job_phases: dict[ObjectKey, str] = {}
        self._client_phases: dict[ObjectKey, str] = {}
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        r = self.registry
        self._jobs = Gauge(
            "fedkube_operator_federatedjobs", "FederatedJobs seen by the operator, by phase.",
            ["phase"], registry=r,
        )
        self._clients = Gauge(
            "fedkube_operator_clientnodes", "ClientNodes seen by the operator, by phase.",
            ["phase"], registry=r,
        )
        self._reconciliations = Counter(
            "fedkube_operator_reconciliations", "Handler runs, by handler and outcome.",
            ["handler", "outcome"], registry=r,
        )
        self._duration = Histogram(
            "fedkube_operator_reconcile_duration_seconds", "Time a handler ran.",
            ["handler"], registry=r,
        )
        for phase in Phase:
            self._jobs.labels(phase=phase.value).set(0)
        for client_phase in ClientPhase:
            self._clients.labels(phase=client_phase.value).set(0)

    # ------------------------------------------------------------ object phases

    def job_phase(self, namespace: str, name: str, phase: Phase | str | None) -> None:
        """Record a FederatedJob's current phase; None when the job is gone."""
        value = Phase(phase).value if phase is not None else None
        self._track(self._job_phases, self._jobs, [p.value for p in Phase], (namespace, name),
                    value)

    def client_phase(self, namespace: str, name: str, phase: ClientPhase | str | None) -> None:
        """Record a ClientNode's current phase; None when the node is gone."""
        value = ClientPhase(phase).value if phase is not None else None
        self._track(self._client_phases, self._clients, [p.value for p in ClientPhase],
                    (namespace, name), value)

    def _track(self, index: dict[ObjectKey, str], gauge: Gauge, phases: list[str],
               key: ObjectKey, phase: str | None) -> None:
        with self._lock:
            if phase is None:
                index.pop(key, None)
            else:
                index[key] = phase
            # Recount from the index instead of inc/dec pairs: a missed or repeated
            # event (kopf resumes watches) then cannot leave the gauge drifting.
            counts = Tally(index.values())
            for value in phases:
                gauge.labels(phase=value).set(counts.get(value, 0))

    # ------------------------------------------------------------ handler runs

    def reconciled(self, handler: str, outcome: str, seconds: float) -> None:
        """One run of `handler` ended with `outcome` (see `Outcome`) after `seconds`."""
        if seconds < 0:
            raise ValueError(f"duration must be >= 0, got {seconds}")
        self._reconciliations.labels(handler=handler, outcome=outcome).inc()
        self._duration.labels(handler=handler).observe(seconds)

    @contextmanager
    def reconciliation(self, handler: str) -> Iterator[None]:
        """Time the block and count its outcome; exceptions pass through unchanged, so
        kopf still sees them and retries as usual."""
        start = time.monotonic()
        try:
            yield
        except Exception as error:
            # Only Exceptions: cancellation on shutdown is neither success nor failure.
            self.reconciled(handler, classify(error), time.monotonic() - start)
            raise
        self.reconciled(handler, Outcome.SUCCESS, time.monotonic() - start)

    # ------------------------------------------------------------ exposing

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format (`CONTENT_TYPE_LATEST`)."""
        return generate_latest(self.registry)

    def serve(self, port: int = DEFAULT_METRICS_PORT, host: str = "0.0.0.0") -> int:
        """Serve /metrics from a daemon thread; port 0 picks a free port. Returns the
        port bound. Call `close()` to stop."""
        if self._server is not None:
            raise RuntimeError(f"metrics already served on port {self._server.server_port}")
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop the HTTP server started by `serve` (no-op when none runs)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)


def serve_operator_metrics(
    port: int = DEFAULT_METRICS_PORT, host: str = "0.0.0.0"
) -> tuple[OperatorMetrics, int]:
    """Create the operator's metrics and serve them; returns them and the bound port.
    `fedkube operator --metrics-port N` calls this before starting kopf."""
    metrics = OperatorMetrics()
    return metrics, metrics.serve(port, host)
