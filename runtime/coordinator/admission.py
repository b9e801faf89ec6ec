"""Admission beyond well-formedness: how many nodes may join and how fast
(`RegistrationGate`), and what one update may weigh and how far it may move the model
(`UpdateBounds`). The arithmetic is in `aggregation.bounds`; this module decides, from the
job's `spec.admission`, whether to refuse, clip or cap, and says why."""

from __future__ import annotations

import bisect
import logging
import math
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
    """How an update is admitted: weighed by a possibly capped count, taken as sent or
    clipped (scaled by `scale`) to the bound it was held to."""

    weight: int
    norm: float  # of the update as sent
    limit: float | None  # the bound it was held to
    clipped: bool
    capped: bool

    @property
    def scale(self) -> float:
        """The factor the update is folded with: limit / norm when clipped, else 1."""
        if self.clipped and self.limit is not None:
            return self.limit / self.norm
        return 1.0


class UpdateBounds:
    """The norm bound and the sample cap of one job, with the norms of the updates accepted
    in the open round that the relative bound compares with. Only the same round's: update
    norms change a lot from round to round (a noised model under central DP gives honest
    updates many times the last round's norm), never among updates of the same model.
    Called under the round's fold lock, so arrivals are seen one at a time.

    The round asks in two steps, so that no stage reads an update the fold does not:
    `weigh` before any tensor is read, `judge` with the norm the fold's own check
    measured (`RoundAggregator.add(..., bound=...)`)."""

    def __init__(self, spec: AdmissionSpec) -> None:
        self.spec = spec
        self._factor, self._absolute = spec.norm_bound_factor, spec.max_update_norm
        self._this_round: list[float] = []  # finite norms, kept sorted

    def next_round(self) -> None:
        self._this_round = []

    def limit(self) -> float | None:
        # The median of a sorted list by index: per update this stage costs a few
        # microseconds, not a sort (bench/admission.py).
        norms, middle = self._this_round, len(self._this_round) // 2
        median = [] if not norms else [
            norms[middle] if len(norms) % 2 else (norms[middle - 1] + norms[middle]) / 2]
        return norm_limit(median, factor=self._factor, absolute=self._absolute)

    def weigh(self, node_id: str, *, claimed: int, registered: int) -> int:
        """The weight a claim of `claimed` examples carries; Rejected(SAMPLE_CAP) if none."""
        weight = capped_samples(claimed, registered=registered,
                                cap=self.spec.max_samples_per_client)
        if weight <= 0:
            raise Rejected(RejectReason.SAMPLE_CAP,
                           f"node {node_id!r} registered no training examples; register "
                           "num_samples before sending updates")
        return weight

    def judge(self, node_id: str, norm: float, *, weight: int, claimed: int) -> Bounded:
        """How an update of `norm` weighed `weight` is taken; Rejected(NORM_BOUND) if not."""
        limit = self.limit()
        clipped = False
        if limit is not None and norm > limit:
            if self.spec.norm_action == "reject":
                raise Rejected(RejectReason.NORM_BOUND,
                               f"update norm {norm:.4g} exceeds the bound {limit:.4g} "
                               "(admission.maxUpdateNorm / normBoundFactor)")
            clipped = True
        if weight < claimed:
            log.warning("node %s claimed %d examples, weighed as %d", node_id, claimed, weight)
        return Bounded(weight=weight, norm=norm, limit=limit, clipped=clipped,
                       capped=weight < claimed)

    def apply(self, node_id: str, delta: Mapping[str, torch.Tensor], *, claimed: int,
              registered: int) -> tuple[dict[str, torch.Tensor], Bounded]:
        """`weigh` and `judge` for a caller that holds a delta outside a fold: the delta
        as it may be folded (clipped if need be) and how; Rejected if it may not."""
        weight = self.weigh(node_id, claimed=claimed, registered=registered)
        bounded = self.judge(node_id, update_norm(delta), weight=weight, claimed=claimed)
        if bounded.clipped and bounded.limit is not None:
            delta = clip_to_norm(delta, norm=bounded.norm, limit=bounded.limit)
        return dict(delta), bounded

    def record(self, bounded: Bounded) -> None:
        """Remember an accepted update's norm (at most the limit it was clipped to)."""
        limit = bounded.limit
        norm = min(bounded.norm, limit) if bounded.clipped and limit is not None else bounded.norm
        if math.isfinite(norm):
            bisect.insort(self._this_round, norm)
