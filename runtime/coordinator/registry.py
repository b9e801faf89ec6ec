"""Who has joined the job, who is alive, and how each client has behaved."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..messages import Registration, Task
from ..spec import ClientNodeSpec, ClientNodeStatus, ClientPhase, Device, Hardware, PrivacySpent
from .inbox import Inbox


# slots: a thousand clients' records without a __dict__ each (bench/heterogeneity.py (c)).
@dataclass(slots=True)
class Client:
    node_id: str
    spec: ClientNodeSpec
    simulated_index: int | None
    last_seen: float
    tasks: Inbox[Task] = field(default_factory=Inbox)
    streaming: bool = False
    state: str = "idle"
    rounds_participated: int = 0
    dispatched: int = 0
    answered: int = 0
    set_aside: int = 0
    # How unlike the others this client's updates have been: the exponentially weighted
    # mean of its anomaly scores, in [0, 1] (coordinator/anomaly.py). A plain number for
    # anything that ranks clients (selection); `scored` counts the rounds behind it.
    suspicion: float = 0.0
    scored: int = 0
    # Quarantine (coordinator/quarantine.py): excluded from selection until this round
    # has closed, or until a user clears it; None when not quarantined.
    quarantined_until: int | None = None
    quarantine_reason: str | None = None
    epsilon: float = 0.0
    delta: float = 0.0
    rejections: dict[str, int] = field(default_factory=dict)  # by RejectReason label
    departed: bool = False  # no task stream when the job ended: the agent is gone
    bytes_up: int = 0
    last_round_seconds: float | None = None
    local_loss: float | None = None
    local_accuracy: float | None = None
    compression: str | None = None
    uplink_bytes_per_second: float | None = None
    # Adaptive selection and local work: the last choice and why, the steps given, the
    # measured speed, and whether it missed the last task it was given.
    selection_score: float | None = None
    selection: str | None = None
    local_steps: int | None = None
    seconds_per_step: float | None = None
    missed_last: bool = False

    def update_arrived(self, *, nbytes: int, seconds: float,
                       metrics: Mapping[str, float], compression: str = "",
                       uplink_bytes_per_second: float = 0.0) -> None:
        """An update of this client was accepted `seconds` after its round's dispatch."""
        self.bytes_up += nbytes
        # What the agent says it applied: a short label and a finite, positive rate only.
        self.compression = compression[:64] or self.compression
        if math.isfinite(uplink_bytes_per_second) and uplink_bytes_per_second > 0:
            self.uplink_bytes_per_second = round(uplink_bytes_per_second, 1)
        self.last_round_seconds = round(seconds, 4)
        self.missed_last = False
        steps = metrics.get("steps")
        if steps is not None and steps >= 1:
            self.seconds_per_step = round(seconds / steps, 6)
        self.local_loss = metrics.get("loss", self.local_loss)
        accuracy = metrics.get("accuracy")
        # Only a fraction is a status value; anything else is the agent's business.
        if accuracy is not None and 0.0 <= accuracy <= 1.0:
            self.local_accuracy = accuracy

    @property
    def quarantined(self) -> bool:
        return self.quarantined_until is not None

    def reliability(self) -> float | None:
        """Answered over dispatched, as its ClientNode shows it; None before any task."""
        return round(self.answered / self.dispatched, 4) if self.dispatched else None

    def shown_suspicion(self) -> float | None:
        """Its suspicion as its ClientNode shows it; None until a round has scored it."""
        return round(self.suspicion, 4) if self.scored else None

    def phase(self, *, now: float, offline_after: float) -> ClientPhase:
        if self.quarantined and not self.departed:
            return ClientPhase.quarantined
        if self.departed or now - self.last_seen > offline_after:
            return ClientPhase.offline
        return ClientPhase.training if self.state in ("training", "uploading") else ClientPhase.ready

    def status(self, *, job: str, now: float, offline_after: float, wall_now: float
               ) -> ClientNodeStatus:
        heartbeat = wall_now - (now - self.last_seen)
        privacy = {job: PrivacySpent(epsilon=self.epsilon, delta=self.delta)} if self.epsilon else {}
        return ClientNodeStatus(
            phase=self.phase(now=now, offline_after=offline_after),
            last_heartbeat=_iso(heartbeat),
            rounds_participated=self.rounds_participated,
            reliability=self.reliability(),
            suspicion=self.shown_suspicion(),
            quarantine_reason=self.quarantine_reason if self.quarantined else None,
            quarantined_until_round=self.quarantined_until,
            privacy=privacy,
            last_round_seconds=self.last_round_seconds,
            local_loss=self.local_loss,
            local_accuracy=self.local_accuracy,
            bytes_up=self.bytes_up,
            compression=self.compression,
            uplink_bytes_per_second=self.uplink_bytes_per_second,
            selection_score=self.selection_score,
            selection=self.selection,
            local_steps=self.local_steps,
            seconds_per_step=self.seconds_per_step,
            rejections=dict(self.rejections),
        )


def _iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


_NODE_ID = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")


class ClientRegistry:
    """The clients of one job. Node ids are stable across agent and coordinator restarts,
    so a client that comes back resumes its record instead of counting twice."""

    def __init__(self, *, job: str, offline_after: float) -> None:
        self.job = job
        self.offline_after = offline_after
        self._clients: dict[str, Client] = {}
        self._counter = 0
        self.changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._clients)

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._clients

    def get(self, node_id: str) -> Client | None:
        return self._clients.get(node_id)

    def register(self, request: Registration) -> Client:
        node_id = request.node_id.strip().lower()
        if node_id and not _NODE_ID.match(node_id):
            raise ValueError(
                f"node_id {request.node_id!r} must be lowercase letters, digits, '-' or '.', "
                "at most 63 characters")
        if not node_id:
            self._counter += 1
            node_id = f"client-{self._counter:04d}"
            while node_id in self._clients:
                self._counter += 1
                node_id = f"client-{self._counter:04d}"
        facts = request.facts
        device = facts.device if facts.device in Device.__members__ else "cpu"
        spec = ClientNodeSpec(
            node_id=node_id,
            job=self.job,
            device=Device(device),
            hardware=Hardware(
                platform=facts.platform, machine=facts.machine, cpus=facts.cpus,
                memory_bytes=facts.memory_bytes, accelerator=facts.accelerator),
            labels=dict(facts.labels),
            data_size=max(0, facts.num_samples),
        )
        now = time.monotonic()
        client = self._clients.get(node_id)
        if client is None:
            client = Client(
                node_id=node_id, spec=spec,
                simulated_index=request.simulated_index,
                last_seen=now)
            self._clients[node_id] = client
        else:
            client.spec = spec
            client.last_seen = now
            client.state = "idle"
        self.changed.set()
        return client

    def heartbeat(self, node_id: str, state: str, epsilon: float) -> Client:
        client = self._clients[node_id]
        client.last_seen = time.monotonic()
        client.state = state or client.state
        client.epsilon = max(client.epsilon, epsilon)
        return client

    def expire(self, older_than: float) -> list[str]:
        """Forget nodes without a task stream not heard from for `older_than` seconds
        (they free their place under admission.maxClients); their ids."""
        now = time.monotonic()
        gone = [c.node_id for c in self._clients.values()
                if not c.streaming and now - c.last_seen > older_than]
        for node_id in gone:
            del self._clients[node_id]
        if gone:
            self.changed.set()
        return gone

    def live(self, selector: dict[str, str] | None = None) -> list[Client]:
        """Clients seen recently, with a task stream open, matching the label selector."""
        now = time.monotonic()
        return [c for c in self._clients.values() if self._alive(c, now)
                and all(c.spec.labels.get(k) == v for k, v in (selector or {}).items())]

    def is_live(self, node_id: str) -> bool:
        """Whether one node is live (as `live()` counts it): a look-up, not a scan, so
        what runs per update costs the same with ten clients or a thousand."""
        client = self._clients.get(node_id)
        return client is not None and self._alive(client, time.monotonic())

    def _alive(self, client: Client, now: float) -> bool:
        return client.streaming and now - client.last_seen <= self.offline_after

    def all(self) -> list[Client]:
        return list(self._clients.values())

    def max_epsilon(self) -> float:
        return max((c.epsilon for c in self._clients.values()), default=0.0)
