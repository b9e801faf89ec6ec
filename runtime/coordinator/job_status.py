"""The job's status as the coordinator keeps it, and its publication on the event stream:
counts, per-round figures, conditions, the final phase."""

from __future__ import annotations

import time

from ..spec import (
    ClientCounts,
    ConditionType,
    FederatedJobSpec,
    FederatedJobStatus,
    Phase,
    Reason,
    terminal_conditions,
    upsert_condition,
)
from .events import (
    ClientChanged,
    ClientsCounted,
    EventBus,
    JobStatusChanged,
    Milestone,
    RoundRecord,
)
from .policy import Verdict
from .registry import Client, ClientRegistry


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class StatusBook:
    def __init__(self, *, job: str, spec: FederatedJobSpec, registry: ClientRegistry,
                 events: EventBus) -> None:
        self.job = job
        self.registry = registry
        self.events = events
        self.status = FederatedJobStatus(phase=Phase.pending,
                                         target_epsilon=spec.privacy.target_epsilon)

    def counts(self, *, active: int, dropped: int = 0) -> ClientCounts:
        return ClientCounts(registered=len(self.registry), active=active, dropped=dropped,
                            quarantined=sum(1 for c in self.registry.all() if c.quarantined))

    def running(self, rounds: int) -> None:
        # Ready (the pod serves) is the operator's condition: see spec.CONDITION_OWNERS.
        self.status.phase = Phase.running
        self.status.start_time = self.status.start_time or utc_now()
        self.publish()
        self.milestone("Running", f"coordinator up; {rounds} rounds planned")

    def after_round(self, record: RoundRecord, *, best_accuracy: float | None,
                    spec: FederatedJobSpec) -> None:
        status = self.status
        status.round = record.round
        status.accuracy = round(record.accuracy, 4)
        status.loss = round(record.loss, 4)
        status.best_accuracy = round(best_accuracy or 0.0, 4)
        if record.epsilon is not None:
            status.epsilon = round(record.epsilon, 4)
        if record.compression_ratio is not None:
            status.compression_ratio = round(record.compression_ratio, 4)
        status.clients = self.counts(active=record.clients_in, dropped=record.clients_dropped)
        target = spec.privacy.target_epsilon
        if spec.privacy.mode == "local" and target and len(self.registry) and all(
                c.epsilon >= target * 0.999 for c in self.registry.all()):
            self.condition(ConditionType.BUDGET_EXHAUSTED, "True", Reason.BUDGET_EXHAUSTED,
                           "every client has spent its privacy budget")

    def condition(self, type_: str, status: str, reason: str, message: str) -> None:
        self.status.conditions = upsert_condition(
            self.status.conditions, type=type_, status=status,  # type: ignore[arg-type]
            reason=reason, message=message, now=utc_now())

    def finish(self, verdict: Verdict, *, model_ref: str | None) -> None:
        if verdict.condition is not None:
            self.condition(verdict.condition, "True", verdict.reason,
                           verdict.condition_message or verdict.message)
        self.status.phase = verdict.phase
        self.status.message = verdict.message
        self.status.completion_time = utc_now()
        # Agents that died mid-job count as dropped even if the last round did not miss them.
        gone = len(self.registry) - len(self.registry.live())
        self.status.clients = self.counts(active=0,
                                          dropped=max(self.status.clients.dropped, gone))
        if model_ref is not None:
            self.status.model_ref = model_ref
        for terminal in terminal_conditions(verdict.phase, verdict.reason, verdict.message,
                                            utc_now()):
            self.condition(terminal.type, terminal.status, terminal.reason, terminal.message)
        self.publish()
        self.milestone(verdict.reason, verdict.message, warning=verdict.phase == Phase.failed)

    def milestone(self, reason: str, message: str, *, warning: bool = False) -> None:
        self.events.publish(Milestone(reason, message, warning))

    def publish(self) -> None:
        registered = len(self.registry)
        self.status.clients.registered = registered
        self.status.clients.quarantined = sum(1 for c in self.registry.all() if c.quarantined)
        self.status.clients_summary = f"{self.status.clients.active}/{registered}"
        self.events.publish(ClientsCounted(registered, len(self.registry.live())))
        self.events.publish(JobStatusChanged(self.status.model_copy(deep=True)))

    def publish_client(self, client: Client) -> None:
        self.events.publish(ClientChanged(client.spec, client.status(
            job=self.job, now=time.monotonic(), offline_after=self.registry.offline_after,
            wall_now=time.time())))
