"""Adaptive local work (localWork: adaptive): how many local steps each client of a
round is given, so slow devices finish with the others instead of holding the round up.

A client's speed is measured: seconds per local step, from its last accepted update
(dispatch to arrival, over the steps it reported). The target time is the spec's
`targetSeconds`, or the median full-work time of the measured clients, at most 0.8 of the
round's deadline. A client never measured does the full work (its first round measures
it); one that missed its last round gets half its previous steps. FedNova (aggregation)
then normalises the unequal steps so the objective stays consistent.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ..plan import TrainPlan
from ..spec import FederatedJobSpec

if TYPE_CHECKING:
    from .registry import Client


def full_steps(*, samples: int, batch_size: int, epochs: int) -> int:
    """Local steps of `epochs` full passes over `samples` in batches of `batch_size`."""
    return max(1, epochs * math.ceil(max(1, samples) / max(1, batch_size)))


def target_seconds(*, configured: float | None, full_times: Iterable[float],
                   deadline: float) -> float | None:
    """How long a client's local work should take; None while nothing is measured and
    nothing configured (everyone then does the full work)."""
    if configured is not None:
        return min(configured, 0.8 * deadline)
    measured = [t for t in full_times if t > 0 and math.isfinite(t)]
    if not measured:
        return None
    return min(statistics.median(measured), 0.8 * deadline)


def local_steps(*, full: int, seconds_per_step: float | None, target: float | None,
                min_steps: int, missed_last: bool = False, last_steps: int | None = None
                ) -> int:
    """The steps one client gets: as many as fit in `target` at its measured speed,
    between `min_steps` and `full`; half its last share after a missed round."""
    if missed_last and last_steps is not None:
        return max(min_steps, min(full, last_steps // 2))
    if seconds_per_step is None or target is None or seconds_per_step <= 0:
        return full
    return max(min(min_steps, full), min(full, math.floor(target / seconds_per_step)))


def plan_local_work(spec: FederatedJobSpec, plan: TrainPlan, selected: Sequence[Client]
                    ) -> tuple[dict[str, TrainPlan], dict[str, int]]:
    """Per-client plans where a client's steps differ from the full work, and every
    selected client's planned steps (FedNova caps claims at them); both empty unless
    strategy.name is fednova. Records the steps given on each client."""
    if spec.strategy.name.value != "fednova":
        return {}, {}
    full = {c.node_id: full_steps(samples=c.spec.data_size, batch_size=plan.batch_size,
                                  epochs=plan.local_epochs) for c in selected}
    if spec.local_work.mode != "adaptive":
        return {}, full
    target = target_seconds(
        configured=spec.local_work.target_seconds, deadline=spec.round_timeout_seconds,
        full_times=[c.seconds_per_step * full[c.node_id] for c in selected
                    if c.seconds_per_step])
    plans: dict[str, TrainPlan] = {}
    planned: dict[str, int] = {}
    for client in selected:
        steps = local_steps(full=full[client.node_id], seconds_per_step=client.seconds_per_step,
                            target=target, min_steps=spec.local_work.min_steps,
                            missed_last=client.missed_last, last_steps=client.local_steps)
        client.local_steps = planned[client.node_id] = steps
        if steps < full[client.node_id]:
            plans[client.node_id] = replace(plan, max_local_steps=steps)
    return plans, planned
