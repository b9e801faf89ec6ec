"""TrainPlan: everything a client needs for one round, built by one pure function from
the job's spec and the round, and sent whole in every task.

Hyper-parameters travel one way, spec -> `plan_for` -> TrainPlan -> agent: the agent
trains and calibrates its privacy from the plan alone, so an edit of the spec between
rounds (say of `rounds`) reaches every agent with its next task.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .spec import FederatedJobSpec, attacker_count

PrivacyMode = Literal["none", "local", "central"]


@dataclass(frozen=True)
class PrivacyPlan:
    """The job's DP settings as a client applies them. Under local DP the client
    calibrates its noise for `planned_rounds` participations (the most it can be asked
    for); under central DP the coordinator clips and noises, and the client trains as is."""

    mode: PrivacyMode = "none"
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # None: calibrate from target_epsilon
    accountant: str = "rdp"
    planned_rounds: int = 1


@dataclass(frozen=True)
class CompressionPlan:
    """How the client encodes its update (spec.compression as the client applies it)."""

    top_k: float | None = None
    quantize_bits: int = 32
    error_feedback: bool = False
    lossless: str = "none"
    # Adaptive: the client picks between fp32 and the setting above to meet this target.
    target_upload_seconds: float | None = None
    # "delta": keep the downloaded model and ask for the change from it next time.
    downlink: str = "none"


@dataclass(frozen=True)
class Drills:
    """The heterogeneity drills of spec.simulation, as each simulated client applies them
    to itself (which clients are slow, and when each is online, follow from its index)."""

    slow_fraction: float = 0.0
    slowdown: float = 1.0
    availability_period_seconds: float = 0.0  # 0: always online
    availability_online_fraction: float = 1.0

    def slowdown_of(self, index: int | None, *, clients: int, seed: int) -> float:
        """How many times longer simulated client `index` of `clients` trains: the first
        round(slow_fraction x clients) of a permutation seeded by `seed` are slow."""
        if index is None or self.slow_fraction <= 0 or self.slowdown <= 1 or clients < 1:
            return 1.0
        order = list(range(clients))
        random.Random(seed * 7919 + 17).shuffle(order)
        slow = set(order[:round(self.slow_fraction * clients)])
        return self.slowdown if index in slow else 1.0

    def online(self, index: int | None, *, now: float, seed: int) -> bool:
        """Whether simulated client `index` is online at unix time `now`: for
        availability_online_fraction of every period, from its own seeded offset."""
        period = self.availability_period_seconds
        if index is None or period <= 0 or self.availability_online_fraction >= 1:
            return True
        offset = random.Random(seed * 104729 + index).random() * period
        return ((now + offset) % period) < self.availability_online_fraction * period


@dataclass(frozen=True)
class AttackPlan:
    """The attack drill of spec.simulation.attackers, as simulated clients apply it: the
    simulated indices in `attackers` send `kind` updates (the colluding kinds, lie and
    ipm, are computed from all of the attackers' honest updates). strength None: the
    kind's default (agent/attacks.py)."""

    kind: str
    strength: float | None
    attackers: tuple[int, ...]


@dataclass(frozen=True)
class SecurePlan:
    """Secure aggregation of this round: the update goes through the four SecAgg phases
    instead of SubmitUpdate. Under central DP it becomes distributed noise: the client
    clips its update to `clip_norm` and adds N(0, noise_std^2) per coordinate before
    masking (0: neither)."""

    clip_norm: float = 0.0
    noise_std: float = 0.0


@dataclass(frozen=True)
class TrainPlan:
    round: int
    model_version: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    privacy: PrivacyPlan
    deadline_unix: float
    # Parameters the aggregation rule asks of clients, e.g. FedProx's proximal_mu.
    client_parameters: Mapping[str, float]
    # The fault drill of spec.simulation.dropout: simulated clients skip a round at this rate.
    dropout: float = 0.0
    compression: CompressionPlan = CompressionPlan()
    drills: Drills = Drills()
    # The most local steps this client takes (0: localEpochs in full); set per client by
    # localWork: adaptive.
    max_local_steps: int = 0
    # The attack drill of spec.simulation.attackers (None: no one attacks).
    attack: AttackPlan | None = None
    secure: SecurePlan | None = None

    @property
    def proximal_mu(self) -> float:
        return float(self.client_parameters.get("proximal_mu", 0.0))


def plan_for(spec: FederatedJobSpec, *, round: int, model_version: int, now: float,
             client_parameters: Mapping[str, float],
             distributed_noise_std: float = 0.0) -> TrainPlan:
    """The plan of round `round` on global model `model_version`, dispatched at `now`
    (unix seconds). `client_parameters` come from the strategy's registry entry;
    `distributed_noise_std` is each client's share of central DP noise under secure
    aggregation (the coordinator calibrates it)."""
    privacy = spec.privacy
    secure = None
    if spec.secure_aggregation.enabled:
        secure = SecurePlan(
            clip_norm=privacy.max_grad_norm if privacy.mode == "central" else 0.0,
            noise_std=distributed_noise_std if privacy.mode == "central" else 0.0)
    return TrainPlan(
        round=round,
        model_version=model_version,
        local_epochs=spec.local_epochs,
        batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        optimizer=spec.optimizer,
        privacy=PrivacyPlan(
            mode=privacy.mode, target_epsilon=privacy.target_epsilon, delta=privacy.delta,
            max_grad_norm=privacy.max_grad_norm, noise_multiplier=privacy.noise_multiplier,
            accountant=privacy.accountant, planned_rounds=spec.rounds),
        deadline_unix=now + spec.round_timeout_seconds,
        client_parameters=dict(client_parameters),
        dropout=spec.simulation.dropout,
        compression=CompressionPlan(
            top_k=spec.compression.top_k, quantize_bits=spec.compression.quantize_bits,
            error_feedback=spec.compression.error_feedback,
            lossless=spec.compression.lossless,
            target_upload_seconds=(spec.compression.adaptive.target_upload_seconds
                                   if spec.compression.adaptive else None),
            downlink=spec.compression.downlink),
        drills=drills_of(spec),
        attack=attack_plan(spec),
        secure=secure,
    )


def drills_of(spec: FederatedJobSpec) -> Drills:
    speed, availability = spec.simulation.speed, spec.simulation.availability
    return Drills(
        slow_fraction=speed.slow_fraction if speed else 0.0,
        slowdown=speed.slowdown if speed else 1.0,
        availability_period_seconds=availability.period_seconds if availability else 0.0,
        availability_online_fraction=availability.online_fraction if availability else 1.0)


def attack_plan(spec: FederatedJobSpec) -> AttackPlan | None:
    """Which simulated clients attack: `attacker_count` of them, drawn by the job's seed
    (the same in every round, so quarantine can be measured against them)."""
    attack = spec.simulation.attackers
    if attack is None:
        return None
    clients = spec.simulation.clients
    chosen = random.Random(spec.seed * 7919 + 14).sample(
        range(clients), attacker_count(clients, attack.fraction))
    return AttackPlan(kind=attack.kind, strength=attack.strength, attackers=tuple(sorted(chosen)))
