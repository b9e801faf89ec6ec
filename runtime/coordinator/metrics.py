"""Prometheus metrics of one coordinator.

Each `CoordinatorMetrics` owns its own `CollectorRegistry` rather than the process-wide
default one: tests and `fedkube run` can hold several coordinators in one process, and
the default registry refuses a second metric of the same name. `MetricsSubscriber` feeds
them from the engine's event stream; nothing here knows about gRPC or Kubernetes.

Names follow Prometheus' conventions (base units, `_total` on counters, `fedkube_` prefix):

| metric | type | meaning |
|---|---|---|
| fedkube_rounds_total | counter | rounds closed and aggregated |
| fedkube_round_duration_seconds | histogram | dispatch to aggregated model |
| fedkube_updates_accepted_total | counter | client updates folded into a round |
| fedkube_updates_rejected_total{reason} | counter | updates refused, by reason (`REASON_LABELS`) |
| fedkube_bytes_received_total | counter | update bytes from clients |
| fedkube_bytes_sent_total | counter | model bytes to clients |
| fedkube_clients_registered | gauge | clients registered with the coordinator |
| fedkube_clients_active | gauge | clients heard from recently |
| fedkube_privacy_epsilon | gauge | DP budget spent so far |
| fedkube_round_current | gauge | the round in progress or last closed |
| fedkube_model_accuracy | gauge | test accuracy of the global model |
| fedkube_compression_ratio | gauge | last round's upload bytes / raw float32 updates |
| fedkube_client_round_duration_seconds{client} | gauge | dispatch to its accepted update, last round |
| fedkube_client_local_loss{client} | gauge | training loss it reported last round |
| fedkube_client_local_accuracy{client} | gauge | training accuracy it reported last round |
| fedkube_client_bytes_received{client} | gauge | update bytes accepted from it in this job |
| fedkube_client_rejections{client} | gauge | its requests refused in this job |
| fedkube_client_rounds_participated{client} | gauge | rounds its update was folded into |
| fedkube_clients_untracked | gauge | clients beyond `MAX_CLIENT_SERIES`, left without series |

Every client label value is a set of new time series, so only the first
`MAX_CLIENT_SERIES` (50) clients of a coordinator get per-client series; the rest are
counted in fedkube_clients_untracked (their figures stay in the ClientNode status and
summary.json). Series are never created from anything but a registered node id.
"""

from __future__ import annotations

import math
import re
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from ..messages import RejectReason
from ..spec import ClientNodeStatus
from .events import (
    ClientChanged,
    ClientsCounted,
    Event,
    ModelSent,
    RoundClosed,
    UpdateAccepted,
    UpdateRefused,
)

__all__ = ["CONTENT_TYPE_LATEST", "REASON_LABELS", "CoordinatorMetrics", "MetricsSubscriber"]

# Rounds last from a fraction of a second (simulated clients on one machine) to tens of
# minutes (phones that train only while charging); the default buckets stop at 10 s.
ROUND_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

# The label values of fedkube_updates_rejected_total: exactly the protocol's refusal reasons.
REASON_LABELS = tuple(reason.label for reason in RejectReason)

# The most clients with their own per-client series (see the module's docstring).
MAX_CLIENT_SERIES = 50

# A reason is a label value, and every distinct value is a new time series: only short
# identifiers are allowed, so an error message can never end up as a label.
_REASON = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


class CoordinatorMetrics:
    """The coordinator's counters and gauges over a private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        r = self.registry
        self._rounds = Counter("fedkube_rounds", "Rounds closed and aggregated.", registry=r)
        self._round_duration = Histogram(
            "fedkube_round_duration_seconds",
            "Time from dispatching a round's tasks to its aggregated model.",
            buckets=ROUND_DURATION_BUCKETS, registry=r,
        )
        self._accepted = Counter(
            "fedkube_updates_accepted", "Client updates folded into a round.", registry=r
        )
        self._rejected = Counter(
            "fedkube_updates_rejected", "Client updates refused, by reason.", ["reason"],
            registry=r,
        )
        self._bytes_received = Counter(
            "fedkube_bytes_received", "Update bytes received from clients.", registry=r
        )
        self._bytes_sent = Counter(
            "fedkube_bytes_sent", "Model bytes sent to clients.", registry=r
        )
        self._registered = Gauge(
            "fedkube_clients_registered", "Clients registered with the coordinator.", registry=r
        )
        self._active = Gauge(
            "fedkube_clients_active", "Clients that sent a heartbeat recently.", registry=r
        )
        self._epsilon = Gauge(
            "fedkube_privacy_epsilon", "Differential-privacy budget spent so far.", registry=r
        )
        self._round = Gauge(
            "fedkube_round_current", "The round in progress or last closed.", registry=r
        )
        self._accuracy = Gauge(
            "fedkube_model_accuracy", "Test accuracy of the global model (0 to 1).", registry=r
        )
        self._compression = Gauge(
            "fedkube_compression_ratio",
            "Last round's upload bytes as a fraction of raw float32 updates (1: uncompressed).",
            registry=r,
        )
        self._per_client = {
            name: Gauge(f"fedkube_client_{name}", help_text, ["client"], registry=r)
            for name, help_text in (
                ("round_duration_seconds", "Dispatch to the client's accepted update."),
                ("local_loss", "Training loss the client reported last round."),
                ("local_accuracy", "Training accuracy the client reported last round."),
                ("bytes_received", "Update bytes accepted from the client in this job."),
                ("rejections", "Requests of the client refused in this job."),
                ("rounds_participated", "Rounds the client's update was folded into."),
            )
        }
        self._untracked = Gauge(
            "fedkube_clients_untracked",
            f"Clients beyond the first {MAX_CLIENT_SERIES}, left without per-client series.",
            registry=r,
        )
        self._tracked_clients: set[str] = set()
        self._untracked_clients: set[str] = set()

    # ------------------------------------------------------------------ recording

    def round_completed(self, seconds: float) -> None:
        """A round closed and was aggregated after `seconds` (from dispatch)."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"round duration must be a finite number >= 0, got {seconds}")
        self._rounds.inc()
        self._round_duration.observe(seconds)

    def update_accepted(self) -> None:
        """One client update was folded into the running aggregate."""
        self._accepted.inc()

    def update_rejected(self, reason: str) -> None:
        """One client update was refused; `reason` is a snake_case identifier
        (one of `REASON_LABELS`), never a free-text message."""
        if not _REASON.match(reason):
            raise ValueError(
                f"reject reason must be a short snake_case identifier, got {reason!r}"
            )
        if reason not in REASON_LABELS:
            raise ValueError(f"reject reason must be one of {', '.join(REASON_LABELS)}, "
                             f"got {reason!r}")
        self._rejected.labels(reason=reason).inc()

    def bytes_received(self, n: int) -> None:
        """`n` bytes of update payload arrived from a client."""
        self._bytes_received.inc(_non_negative(n, "bytes received"))

    def bytes_sent(self, n: int) -> None:
        """`n` bytes of model payload went to a client."""
        self._bytes_sent.inc(_non_negative(n, "bytes sent"))

    def clients(self, registered: int, active: int) -> None:
        """Current client counts."""
        _non_negative(registered, "registered clients")
        _non_negative(active, "active clients")
        if active > registered:
            raise ValueError(f"active clients ({active}) exceed registered ({registered})")
        self._registered.set(registered)
        self._active.set(active)

    def privacy_epsilon(self, eps: float) -> None:
        """Privacy budget spent so far (infinite when noise was too small to bound it)."""
        if math.isnan(eps) or eps < 0:
            raise ValueError(f"epsilon must be >= 0, got {eps}")
        self._epsilon.set(eps)

    def accuracy(self, acc: float) -> None:
        """Test accuracy of the newest global model, as a fraction."""
        if not 0.0 <= acc <= 1.0:
            raise ValueError(f"accuracy must lie in [0, 1], got {acc}")
        self._accuracy.set(acc)

    def compression_ratio(self, ratio: float) -> None:
        """Last round's upload against raw float32 updates."""
        if not math.isfinite(ratio) or ratio < 0:
            raise ValueError(f"compression ratio must be a finite number >= 0, got {ratio}")
        self._compression.set(ratio)

    def round(self, n: int) -> None:
        """The round now in progress (or last closed)."""
        self._round.set(_non_negative(n, "round"))

    def client(self, node_id: str, status: ClientNodeStatus) -> None:
        """One client's figures, as its ClientNode status has them (bounded series)."""
        if node_id not in self._tracked_clients:
            if len(self._tracked_clients) >= MAX_CLIENT_SERIES:
                self._untracked_clients.add(node_id)
                self._untracked.set(len(self._untracked_clients))
                return
            self._tracked_clients.add(node_id)
        values = {
            "round_duration_seconds": status.last_round_seconds,
            "local_loss": status.local_loss,
            "local_accuracy": status.local_accuracy,
            "bytes_received": status.bytes_up,
            "rejections": sum(status.rejections.values()),
            "rounds_participated": status.rounds_participated,
        }
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self._per_client[name].labels(client=node_id).set(value)

    # ------------------------------------------------------------------ exposing

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format (`CONTENT_TYPE_LATEST`)."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics over HTTP from a daemon thread; port 0 picks a free port.
        Returns the port actually bound. Call `close()` to stop."""
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


def _non_negative(n: int, what: str) -> int:
    if n < 0:
        raise ValueError(f"{what} must be >= 0, got {n}")
    return n


class MetricsSubscriber:
    """Keeps a CoordinatorMetrics up to date from the engine's event stream."""

    def __init__(self, metrics: CoordinatorMetrics) -> None:
        self.metrics = metrics

    def __call__(self, event: Event) -> None:
        metrics = self.metrics
        if isinstance(event, RoundClosed):
            record = event.record
            metrics.round_completed(record.seconds)
            metrics.round(record.round)
            metrics.accuracy(record.accuracy)
            if record.epsilon is not None:
                metrics.privacy_epsilon(record.epsilon)
            if record.compression_ratio is not None:
                metrics.compression_ratio(record.compression_ratio)
        elif isinstance(event, UpdateAccepted):
            metrics.update_accepted()
            metrics.bytes_received(event.nbytes)
        elif isinstance(event, UpdateRefused):
            metrics.update_rejected(event.reason.label)
        elif isinstance(event, ModelSent):
            metrics.bytes_sent(event.nbytes)
        elif isinstance(event, ClientsCounted):
            metrics.clients(event.registered, event.live)
        elif isinstance(event, ClientChanged):
            metrics.client(event.spec.node_id, event.status)
