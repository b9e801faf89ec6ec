"""Adaptive local work (localWork: adaptive): how many local steps each client of a
round is given, so slow devices finish with the others instead of holding the round up.

A client's speed is measured: seconds per local step, from its last accepted update
(dispatch to arrival, over the steps it reported). The target time is the spec's
`targetSeconds`, or the median full-work time of the measured clients, at most 0.8 of the
round's deadline. A client not yet measured is judged by the device facts it reported
at registration (agent/facts.py: device kind, cores, memory) through `capability`, a
relative compute score: where other selected clients are measured, its seconds per step
are estimated from theirs scaled by the capability ratio; in a round where no one is
measured yet, clients below the round's median capability get that share of the full
work (the others full work), and their first update measures them. A client whose facts
say nothing (no cores reported) does the full work. One that missed its last round gets
half its previous steps. FedNova (aggregation) then normalises the unequal steps so the
objective stays consistent.
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


# A prior, replaced by the measured speed after a client's first update: an accelerator
# is worth this many CPU cores for the small models a round trains, and a device with
# less memory than LOW_MEMORY_BYTES (a phone, a board) computes at half its cores.
DEVICE_CORES = {"cuda": 16.0, "mps": 4.0, "cpu": 0.0}
LOW_MEMORY_BYTES = 2 * 2**30


def capability(*, device: str, cpus: int, memory_bytes: int) -> float | None:
    """Relative compute of a device from its reported facts, in CPU-core units; None
    when the facts say nothing (no cores and no accelerator)."""
    cores = float(max(0, cpus)) + DEVICE_CORES.get(device, 0.0)
    if cores <= 0:
        return None
    if 0 < memory_bytes < LOW_MEMORY_BYTES:
        cores /= 2
    return cores


def estimated_seconds_per_step(capability_: float | None,
                               measured: Iterable[tuple[float, float]]) -> float | None:
    """A not-yet-measured client's seconds per step: the median of the measured
    clients' (seconds per step x capability), divided by its capability. `measured`:
    (seconds per step, capability) pairs. None without a capability or a measurement."""
    work = [sps * cap for sps, cap in measured if sps > 0 and cap > 0 and math.isfinite(sps)]
    if capability_ is None or capability_ <= 0 or not work:
        return None
    return statistics.median(work) / capability_


def first_steps(*, full: int, capability_: float | None, reference: float | None,
                min_steps: int) -> int:
    """Steps in a round where no client is measured yet: `full` times the client's
    capability over the round's `reference` (median) capability, at most `full`."""
    if capability_ is None or reference is None or reference <= 0:
        return full
    share = min(1.0, capability_ / reference)
    return max(min(min_steps, full), min(full, math.floor(full * share)))


def capability_of(client: Client) -> float | None:
    hardware = client.spec.hardware
    return capability(device=client.spec.device.value, cpus=hardware.cpus,
                      memory_bytes=hardware.memory_bytes)


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
    caps = {c.node_id: capability_of(c) for c in selected}
    measured = [(c.seconds_per_step, cap) for c in selected
                if c.seconds_per_step and (cap := caps[c.node_id]) is not None]
    known = [cap for cap in caps.values() if cap is not None]
    reference = statistics.median(known) if known else None
    plans: dict[str, TrainPlan] = {}
    planned: dict[str, int] = {}
    for client in selected:
        speed = client.seconds_per_step
        if speed is None:
            speed = estimated_seconds_per_step(caps[client.node_id], measured)
        if target is None and not client.missed_last:
            steps = first_steps(full=full[client.node_id], capability_=caps[client.node_id],
                                reference=reference, min_steps=spec.local_work.min_steps)
        else:
            steps = local_steps(full=full[client.node_id], seconds_per_step=speed,
                                target=target, min_steps=spec.local_work.min_steps,
                                missed_last=client.missed_last, last_steps=client.local_steps)
        client.local_steps = planned[client.node_id] = steps
        if steps < full[client.node_id]:
            plans[client.node_id] = replace(plan, max_local_steps=steps)
    return plans, planned
