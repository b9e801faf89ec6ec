"""The protocol's vocabulary as plain Python: what the coordinator and the agent say to
each other, and why a request is refused.

`wire.convert` is the only place that turns these into protobuf messages and back; the
round engine, the registry and the agent's trainer work with these types alone.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from .plan import TrainPlan
from .spec import DataSpec


class RejectReason(enum.Enum):
    """Why a request was refused: one name per cause, each with the gRPC status code the
    client gets and the `reason` label of fedkube_updates_rejected_total (its value)."""

    UNKNOWN_NODE = ("unknown_node", "NOT_FOUND")
    UNAUTHENTICATED = ("unauthenticated", "UNAUTHENTICATED")
    WRONG_IDENTITY = ("wrong_identity", "PERMISSION_DENIED")  # mTLS: cert of another node
    INVALID_REGISTRATION = ("invalid_registration", "INVALID_ARGUMENT")
    WRONG_ROUND = ("wrong_round", "FAILED_PRECONDITION")
    WRONG_VERSION = ("wrong_version", "FAILED_PRECONDITION")
    NOT_SELECTED = ("not_selected", "FAILED_PRECONDITION")
    DUPLICATE = ("duplicate", "ALREADY_EXISTS")
    BUDGET = ("budget", "PERMISSION_DENIED")
    MALFORMED = ("malformed", "INVALID_ARGUMENT")
    BAD_SHAPE = ("bad_shape", "INVALID_ARGUMENT")
    NON_FINITE = ("non_finite", "INVALID_ARGUMENT")
    OVERSIZE = ("oversize", "INVALID_ARGUMENT")
    NORM_BOUND = ("norm_bound", "INVALID_ARGUMENT")
    SAMPLE_CAP = ("sample_cap", "INVALID_ARGUMENT")
    TOO_MANY_CLIENTS = ("too_many_clients", "RESOURCE_EXHAUSTED")
    RATE_LIMITED = ("rate_limited", "RESOURCE_EXHAUSTED")
    UPLOAD_BUSY = ("upload_busy", "RESOURCE_EXHAUSTED")
    UPLOAD_STALLED = ("upload_stalled", "DEADLINE_EXCEEDED")
    UPLOAD_IN_FLIGHT = ("upload_in_flight", "ALREADY_EXISTS")
    STALE = ("stale", "FAILED_PRECONDITION")  # async: built on too old a model
    # Secure aggregation: a protocol message in the wrong phase, forged, or naming what it
    # must not; and a round whose secure sum could not be released.
    SECAGG_PHASE = ("secagg_phase", "FAILED_PRECONDITION")
    SECAGG_FORGED = ("secagg_forged", "INVALID_ARGUMENT")
    SECAGG_FAILED = ("secagg_failed", "ABORTED")

    def __init__(self, label: str, code: str) -> None:
        self.label = label
        self.code = code  # a grpc.StatusCode name; the servicer maps it


# The gRPC metadata key carrying a node's session credential on every call after Register.
SESSION_METADATA = "fedkube-session"


class Rejected(Exception):
    """A request the coordinator refuses; the text is for the client."""

    def __init__(self, reason: RejectReason, message: str, *, late: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        # An answer to a round that has closed: expected wherever a round closes at its
        # quota or its deadline (adaptive selection over-commits), so not worth a warning.
        self.late = late


@dataclass(frozen=True)
class NodeFacts:
    """What an agent says about its device."""

    device: str = "cpu"
    platform: str = ""
    machine: str = ""
    cpus: int = 0
    memory_bytes: int = 0
    accelerator: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    num_samples: int = 0
    hostname: str = ""


@dataclass(frozen=True)
class Registration:
    """An agent asking to join. An empty node_id lets the coordinator pick one."""

    node_id: str
    join_token: str
    facts: NodeFacts
    simulated_index: int | None = None
    session: str = ""  # the credential of node_id, when re-registering it


@dataclass(frozen=True)
class JobIdentity:
    """What an agent builds its model and local data from. Hyper-parameters are not here:
    they come with each task's TrainPlan."""

    job_name: str
    model: str
    data: DataSpec
    seed: int
    num_simulated_clients: int
    input_shape: tuple[int, ...]
    num_classes: int


@dataclass(frozen=True)
class Admission:
    """The coordinator's answer to a Registration."""

    node_id: str
    heartbeat_interval_seconds: float
    job: JobIdentity
    session: str = ""  # present it as SESSION_METADATA on every later call


@dataclass(frozen=True)
class Heartbeat:
    node_id: str
    state: str  # idle | training | uploading
    epsilon_spent: float


@dataclass(frozen=True)
class HeartbeatAck:
    job_running: bool
    round: int


class TaskKind(enum.Enum):
    TRAIN = "train"
    STOP = "stop"


@dataclass(frozen=True)
class Task:
    """One item of a node's task stream: train for a round (with its plan), or stop."""

    kind: TaskKind
    plan: TrainPlan | None = None
    reason: str = ""

    @classmethod
    def train(cls, plan: TrainPlan) -> Task:
        return cls(TaskKind.TRAIN, plan=plan)

    @classmethod
    def stop(cls, reason: str) -> Task:
        return cls(TaskKind.STOP, reason=reason)


class Payload(enum.Enum):
    DELTA = "delta"  # new minus global weights follow as tensor chunks
    REFUSAL = "refusal"  # no tensors: the agent declines the task
    MASKED = "masked"  # secure aggregation: one uint8 tensor "masked" (ring bytes) follows


@dataclass(frozen=True)
class UpdateHeader:
    node_id: str
    round: int
    model_version: int
    payload: Payload
    num_samples: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    epsilon_spent: float = 0.0  # cumulative for this device and job (local DP)
    delta: float = 0.0
    refusal_reason: str = ""
    compression: str = ""  # the setting the client applied, e.g. "top1%+q8"
    uplink_bytes_per_second: float = 0.0  # its last measured upload throughput
    upload_bytes: int = 0  # tensor payload bytes that follow (0: not said)
