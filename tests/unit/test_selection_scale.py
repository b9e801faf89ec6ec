"""What a round asks of the registry at scale: selection reads each client's record the
way its ClientNode shows it (without building the status), and an arriving update asks
only whether the round's own waiting clients are live."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from fedkube.runtime.coordinator.engine import RoundEngine
from fedkube.runtime.coordinator.registry import ClientRegistry
from fedkube.runtime.coordinator.round import Round
from fedkube.runtime.coordinator.selection import candidate_of
from fedkube.runtime.messages import NodeFacts, Payload, Registration, UpdateHeader
from fedkube.runtime.spec import ClientPhase, FederatedJob


def _registration(node_id: str, samples: int = 40) -> Registration:
    return Registration(node_id=node_id, join_token="", facts=NodeFacts(num_samples=samples),
                        simulated_index=None)


def test_a_candidate_carries_what_the_clientnode_status_shows() -> None:
    registry = ClientRegistry(job="j", offline_after=30.0)
    fresh = registry.register(_registration("fresh"))
    measured = registry.register(_registration("measured", samples=77))
    measured.dispatched, measured.answered = 3, 2
    measured.suspicion, measured.scored = 0.123456, 2
    measured.update_arrived(nbytes=10, seconds=1.5, metrics={"loss": 0.75})
    jailed = registry.register(_registration("jailed"))
    jailed.quarantined_until, jailed.quarantine_reason = 4, "norm bound"
    gone = registry.register(_registration("gone"))  # quarantined, but its agent left
    gone.quarantined_until, gone.departed = 4, True

    for client in (fresh, measured, jailed, gone):
        status = client.status(job="j", now=time.monotonic(), offline_after=30.0,
                               wall_now=time.time())
        candidate = candidate_of(client)
        assert candidate.reliability == status.reliability
        assert candidate.suspicion == status.suspicion
        assert candidate.quarantined == (status.phase is ClientPhase.quarantined)
        assert candidate.samples == client.spec.data_size
    assert candidate_of(fresh).reliability is None and candidate_of(fresh).suspicion is None
    assert candidate_of(measured).reliability == pytest.approx(0.6667)
    assert candidate_of(measured).suspicion == pytest.approx(0.1235)
    assert (candidate_of(measured).loss, candidate_of(measured).seconds) == (0.75, 1.5)
    assert candidate_of(jailed).quarantined and not candidate_of(gone).quarantined


def test_is_live_agrees_with_the_live_list() -> None:
    registry = ClientRegistry(job="j", offline_after=30.0)
    streaming = registry.register(_registration("streaming"))
    streaming.streaming = True
    registry.register(_registration("no-stream"))
    silent = registry.register(_registration("silent"))
    silent.streaming, silent.last_seen = True, time.monotonic() - 31.0

    live = {c.node_id for c in registry.live()}
    assert live == {"streaming"}
    for node_id in ("streaming", "no-stream", "silent", "never-registered"):
        assert registry.is_live(node_id) == (node_id in live)


def test_a_round_completes_when_its_last_waiting_client_goes_away() -> None:
    """The completion check after an update asks about the selected clients only: the
    one still waiting closing its stream completes the round, however many others are
    registered and live."""
    job = FederatedJob.model_validate({
        "apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
        "metadata": {"name": "scale"},
        "spec": {"model": "mlp", "data": {"dataset": "digits", "limit": 200}, "rounds": 3,
                 "clientsPerRound": 2, "minClients": 1}})

    async def scenario() -> tuple[bool, bool]:
        engine = RoundEngine(job, registration_timeout=1)
        queues = {}
        for i in range(30):
            admission = engine.register(_registration(f"node-{i:02d}"))
            queues[admission.node_id] = engine.open_stream(admission.node_id)
        opened = engine._open_round(1)
        assert isinstance(opened, Round)
        engine.open_round = opened
        opened.dispatch()
        first, second = sorted(opened.selected)
        delta = {k: torch.full_like(v, 1e-3) for k, v in engine.weights.items()}
        await engine.accept_update(UpdateHeader(
            node_id=first, round=1, payload=Payload.DELTA, model_version=engine.version,
            num_samples=40, metrics={"loss": 1.0}), delta, nbytes=0)
        waiting_on_second = not opened.complete.is_set()
        engine.close_stream(second, queues[second])
        return waiting_on_second, opened.complete.is_set()

    waiting_on_second, complete = asyncio.run(scenario())
    assert waiting_on_second  # 28 live clients not selected do not hold it open or close it
    assert complete
