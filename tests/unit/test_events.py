"""The coordinator's event stream: typed events reach every subscriber, and one that
fails never stops the others (nor the job)."""

from __future__ import annotations

import random

from fedkube.runtime.coordinator.events import (
    EventBus,
    JobStatusChanged,
    Milestone,
    RoundClosed,
    RoundRecord,
    SinkSubscriber,
    on_round_closed,
)
from fedkube.runtime.coordinator.registry import Client
from fedkube.runtime.coordinator.round import select_clients
from fedkube.runtime.spec import ClientNodeSpec, FederatedJobStatus, Phase


def _record(number: int) -> RoundRecord:
    return RoundRecord(round=number, accuracy=0.5, loss=1.0, clients_selected=2, clients_in=2,
                       clients_dropped=0, set_aside=0, seconds=0.1, epsilon=None, bytes_up=0,
                       bytes_down=0, train_loss=None, model_version=number)


class _Sink:
    def __init__(self) -> None:
        self.jobs: list[FederatedJobStatus] = []
        self.events: list[tuple[str, str, bool]] = []

    def publish_job(self, status: FederatedJobStatus) -> None:
        self.jobs.append(status)

    def publish_client(self, spec, status) -> None:
        raise AssertionError("no client was published")

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        self.events.append((reason, message, warning))


def test_a_failing_subscriber_does_not_stop_the_others() -> None:
    bus = EventBus()
    rounds: list[int] = []

    def broken(event: object) -> None:
        raise RuntimeError("listener bug")

    sink = _Sink()
    bus.subscribe(broken)
    bus.subscribe(on_round_closed(lambda record: rounds.append(record.round)))
    bus.subscribe(SinkSubscriber(sink))
    bus.publish(RoundClosed(_record(1)))
    bus.publish(JobStatusChanged(FederatedJobStatus(phase=Phase.running)))
    bus.publish(Milestone("RoundCompleted", "round 1", warning=False))
    assert rounds == [1]
    assert [s.phase for s in sink.jobs] == [Phase.running]
    assert sink.events == [("RoundCompleted", "round 1", False)]


def test_selection_is_seeded_and_over_selects_for_dropout() -> None:
    clients = [Client(node_id=f"n{i}", spec=ClientNodeSpec(node_id=f"n{i}"),
                      simulated_index=i, last_seen=0.0) for i in range(10)]
    first = select_clients(clients, wanted=4, expected_dropout=0.5, rng=random.Random(3))
    again = select_clients(list(reversed(clients)), wanted=4, expected_dropout=0.5,
                           rng=random.Random(3))
    assert [c.node_id for c in first] == [c.node_id for c in again]
    assert len(first) == 8  # 4 / (1 - 0.5)
    assert len(select_clients(clients, wanted=4, expected_dropout=0.9,
                              rng=random.Random(0))) == 10  # never more than there are
