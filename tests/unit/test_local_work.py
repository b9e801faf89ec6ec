"""Adaptive local work before a client is measured: its first budget comes from the
device facts it reported (coordinator/local_work.py), then from its measured speed."""

from __future__ import annotations

import pytest
from fedkube.runtime.coordinator.local_work import (
    capability,
    estimated_seconds_per_step,
    first_steps,
    plan_local_work,
)
from fedkube.runtime.coordinator.registry import ClientRegistry
from fedkube.runtime.messages import NodeFacts, Registration
from fedkube.runtime.plan import plan_for
from fedkube.runtime.spec import parse_job_spec

GIB = 2**30


def test_capability_counts_cores_accelerators_and_low_memory() -> None:
    assert capability(device="cpu", cpus=8, memory_bytes=16 * GIB) == 8
    assert capability(device="cpu", cpus=2, memory_bytes=1 * GIB) == 1  # a small board
    assert capability(device="cuda", cpus=8, memory_bytes=64 * GIB) == 24
    assert capability(device="cpu", cpus=0, memory_bytes=0) is None  # facts say nothing
    # Seconds per step scale inversely with capability, from the measured median.
    assert estimated_seconds_per_step(2.0, [(0.1, 8.0), (0.2, 8.0), (0.5, 2.0)]) \
        == pytest.approx(0.5)  # works 0.8, 1.6, 1.0: median 1.0 core-second / 2 cores
    assert estimated_seconds_per_step(None, [(0.1, 8.0)]) is None
    assert estimated_seconds_per_step(4.0, []) is None
    assert first_steps(full=20, capability_=2.0, reference=8.0, min_steps=1) == 5
    assert first_steps(full=20, capability_=16.0, reference=8.0, min_steps=1) == 20
    assert first_steps(full=20, capability_=0.1, reference=8.0, min_steps=3) == 3
    assert first_steps(full=20, capability_=None, reference=8.0, min_steps=1) == 20


def _clients(facts: dict[str, tuple[str, int, int]]):
    registry = ClientRegistry(job="lw", offline_after=60)
    return [registry.register(Registration(
        node_id=name, join_token="", simulated_index=None,
        facts=NodeFacts(device=device, cpus=cpus, memory_bytes=memory, num_samples=100)))
        for name, (device, cpus, memory) in facts.items()]


def test_first_budget_comes_from_device_facts_then_from_measured_speed() -> None:
    spec = parse_job_spec({"model": "mlp", "batchSize": 10, "localEpochs": 2,
                           "strategy": {"name": "fednova"}, "localWork": {"mode": "adaptive"}})
    plan = plan_for(spec, round=1, model_version=0, now=0.0, client_parameters={})
    clients = _clients({"laptop": ("cpu", 8, 16 * GIB), "desktop": ("cpu", 8, 32 * GIB),
                        "board": ("cpu", 2, 1 * GIB), "unknown": ("cpu", 0, 0)})

    # Round 1, no one measured: the board (1 core-equivalent against a median of 8) gets
    # an eighth of the 20 full steps; a device without facts does the full work.
    plans, planned = plan_local_work(spec, plan, clients)
    assert planned == {"laptop": 20, "desktop": 20, "board": 2, "unknown": 20}
    assert plans["board"].max_local_steps == 2 and set(plans) == {"board"}
    assert clients[2].local_steps == 2

    # The laptop and desktop are measured (0.1 s/step: 2 s of full work, the target);
    # a newcomer board is estimated at 0.1 x 8 / 1 = 0.8 s/step: 2 s fit 2 steps.
    laptop, desktop, _, unknown = clients
    for client in (laptop, desktop):
        client.update_arrived(nbytes=0, seconds=2.0, metrics={"steps": 20})
    newcomer = _clients({"board-2": ("cpu", 2, 1 * GIB)})[0]
    _, planned = plan_local_work(spec, plan, [laptop, desktop, newcomer, unknown])
    assert planned == {"laptop": 20, "desktop": 20, "board-2": 2, "unknown": 20}

    # Once measured, the measurement wins over the facts: a board that turned out fast.
    newcomer.update_arrived(nbytes=0, seconds=1.0, metrics={"steps": 20})
    _, planned = plan_local_work(spec, plan, [laptop, desktop, newcomer])
    assert planned["board-2"] == 20
