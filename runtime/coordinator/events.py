"""The coordinator's one typed event stream.

The round engine says what happened — a round closed, a client changed, the job's status
changed, an update was refused, a milestone was passed — and knows nothing of who listens.
The run report, the console progress, the Prometheus metrics and the Kubernetes writer
subscribe. A subscriber that fails is logged and skipped: publishing never fails the job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..messages import RejectReason
from ..spec import ClientNodeSpec, ClientNodeStatus, FederatedJobStatus
from .status import StatusSink

log = logging.getLogger("fedkube.coordinator.events")


@dataclass(frozen=True)
class RoundRecord:
    """One closed round; one line of metrics.jsonl."""

    round: int
    accuracy: float
    loss: float
    clients_selected: int
    clients_in: int
    clients_dropped: int
    set_aside: int
    seconds: float
    epsilon: float | None
    bytes_up: int
    bytes_down: int
    train_loss: float | None
    model_version: int
    # This round's traffic (bytes_up/bytes_down above are the job's totals so far) and
    # its upload against the raw float32 updates it stands for (1.0: uncompressed).
    round_bytes_up: int = 0
    round_bytes_down: int = 0
    compression_ratio: float | None = None
    # strategy.mode async: the mean staleness of the server step's buffered updates.
    mean_staleness: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class RoundClosed:
    record: RoundRecord


@dataclass(frozen=True)
class ClientChanged:
    spec: ClientNodeSpec
    status: ClientNodeStatus


@dataclass(frozen=True)
class JobStatusChanged:
    status: FederatedJobStatus


@dataclass(frozen=True)
class UpdateRefused:
    node_id: str
    reason: RejectReason
    message: str


@dataclass(frozen=True)
class UpdateAccepted:
    node_id: str
    nbytes: int


@dataclass(frozen=True)
class ModelSent:
    nbytes: int


@dataclass(frozen=True)
class ClientsCounted:
    registered: int
    live: int  # heard from recently, with a task stream open


@dataclass(frozen=True)
class Milestone:
    """Created, running, round N, finished: a Kubernetes Event in a cluster."""

    reason: str
    message: str
    warning: bool = False


Event = (RoundClosed | ClientChanged | JobStatusChanged | UpdateRefused | UpdateAccepted
         | ModelSent | ClientsCounted | Milestone)
Subscriber = Callable[[Event], None]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def publish(self, event: Event) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:
                log.exception("event subscriber %r failed on %s", subscriber,
                              type(event).__name__)


class SinkSubscriber:
    """Feeds a StatusSink (the report, the console, the Kubernetes writer) from the
    stream: job statuses, client states and milestones."""

    def __init__(self, sink: StatusSink) -> None:
        self.sink = sink

    def __call__(self, event: Event) -> None:
        if isinstance(event, JobStatusChanged):
            self.sink.publish_job(event.status)
        elif isinstance(event, ClientChanged):
            self.sink.publish_client(event.spec, event.status)
        elif isinstance(event, Milestone):
            self.sink.event(event.reason, event.message, warning=event.warning)


def on_round_closed(handler: Callable[[RoundRecord], None]) -> Subscriber:
    """A subscriber calling `handler` with each closed round's record."""

    def subscriber(event: Event) -> None:
        if isinstance(event, RoundClosed):
            handler(event.record)

    return subscriber
