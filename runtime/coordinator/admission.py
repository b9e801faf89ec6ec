"""Admission beyond well-formedness: how many nodes may join and how fast
(`RegistrationGate`), and what one update may weigh and how far it may move the model
(`UpdateBounds`). The arithmetic is in `aggregation.bounds`; this module decides, from the
job's `spec.admission`, whether to refuse, clip or cap, and says why."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..aggregation.bounds import capped_samples, clip_to_norm, norm_limit, update_norm
from ..messages import Rejected, RejectReason
from ..spec import AdmissionSpec

log = logging.getLogger("fedkube.coordinator.admission")


class RegistrationGate:
    """A cap on registered nodes and a token bucket on new registrations: beyond either,
    RESOURCE_EXHAUSTED, so a flood of fake nodes cannot fill the job's records."""

    def __init__(self, spec: AdmissionSpec, *, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.max_clients = spec.max_clients
        self.rate = spec.registrations_per_second
        self.burst = float(spec.registration_burst)
        self._clock = clock
        self._tokens = self.burst
        self._refilled = clock()

    def admit_new(self, registered: int) -> None:
        """Raises Rejected unless one more node may join a job that has `registered`."""
        if registered >= self.max_clients:
            raise Rejected(RejectReason.TOO_MANY_CLIENTS,
                           f"the job already has {registered} registered clients "
                           f"(admission.maxClients {self.max_clients})")
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1.0:
            raise Rejected(RejectReason.RATE_LIMITED,
                           f"too many registrations (admission.registrationsPerSecond "
                           f"{self.rate:g}); retry later")
        self._tokens -= 1.0


@dataclass(frozen=True)
class Bounded:
    """An update as admitted: possibly clipped, weighed by a possibly capped count."""

    delta: Mapping[str, torch.Tensor]  # may decode each tensor when read: do not dict() it
    weight: int
    norm: float  # of the update as sent
    limit: float | None  # the bound it was held to
    clipped: bool
    capped: bool


class UpdateBounds:
    """The norm bound and the sample cap of one job, with the norms of the updates accepted
    in the open round that the relative bound compares with. Only the same round's: update
    norms change a lot from round to round (a noised model under central DP gives honest
    updates many times the last round's norm), never among updates of the same model.
    Called under the round's fold lock, so arrivals are seen one at a time."""

    def __init__(self, spec: AdmissionSpec) -> None:
        self.spec = spec
        self._this_round: list[float] = []

    def next_round(self) -> None:
        self._this_round = []

    def limit(self) -> float | None:
        return norm_limit(self._this_round,
                          factor=self.spec.norm_bound_factor, absolute=self.spec.max_update_norm)

    def apply(self, node_id: str, delta: Mapping[str, torch.Tensor], *, claimed: int,
              registered: int) -> Bounded:
        """The update as it may be folded; Rejected(NORM_BOUND | SAMPLE_CAP) if it may not."""
        weight = capped_samples(claimed, registered=registered,
                                cap=self.spec.max_samples_per_client)
        if weight <= 0:
            raise Rejected(RejectReason.SAMPLE_CAP,
                           f"node {node_id!r} registered no training examples; register "
                           "num_samples before sending updates")
        norm = update_norm(delta)
        limit = self.limit()
        clipped = False
        if limit is not None and norm > limit:
            if self.spec.norm_action == "reject":
                raise Rejected(RejectReason.NORM_BOUND,
                               f"update norm {norm:.4g} exceeds the bound {limit:.4g} "
                               "(admission.maxUpdateNorm / normBoundFactor)")
            delta, clipped = clip_to_norm(delta, norm=norm, limit=limit), True
        if weight < claimed:
            log.warning("node %s claimed %d examples, weighed as %d", node_id, claimed, weight)
        return Bounded(delta=delta, weight=weight, norm=norm, limit=limit,
                       clipped=clipped, capped=weight < claimed)

    def record(self, bounded: Bounded) -> None:
        """Remember an accepted update's norm (at most the limit it was clipped to)."""
        limit = bounded.limit
        norm = min(bounded.norm, limit) if bounded.clipped and limit is not None else bounded.norm
        self._this_round.append(norm)
