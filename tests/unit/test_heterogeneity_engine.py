"""The engines' heterogeneity paths in-process (no network: the servicer's calls made
directly on the real engines): adaptive selection and local work in a synchronous round,
and FedBuff's admission, staleness and server steps in the asynchronous engine."""

from __future__ import annotations

import asyncio

import pytest
import torch
from fedkube.runtime.coordinator.async_rounds import AsyncEngine, engine_for
from fedkube.runtime.coordinator.engine import RoundEngine
from fedkube.runtime.coordinator.round import Round
from fedkube.runtime.messages import (
    NodeFacts,
    Payload,
    Registration,
    Rejected,
    RejectReason,
    UpdateHeader,
)
from fedkube.runtime.spec import FederatedJob


def _job(**spec: object) -> FederatedJob:
    return FederatedJob.model_validate({
        "apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
        "metadata": {"name": "hetero"},
        "spec": {"model": "mlp", "data": {"dataset": "digits", "limit": 200}, "rounds": 5,
                 "minClients": 1, "batchSize": 10, "localEpochs": 2, **spec}})


def _register(engine: RoundEngine, count: int) -> list[str]:
    ids = []
    for i in range(count):
        admission = engine.register(Registration(
            node_id=f"node-{i}", join_token="", facts=NodeFacts(num_samples=100),
            simulated_index=None))
        engine.open_stream(admission.node_id)
        ids.append(admission.node_id)
    return ids


def _delta(engine: RoundEngine, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, scale) for k, v in engine.weights.items()}


def test_adaptive_round_skips_slow_clients_and_gives_them_fewer_steps() -> None:
    async def scenario() -> tuple[Round, RoundEngine]:
        engine = engine_for(_job(clientsPerRound=3, strategy={"name": "fednova"},
                                 selection={"mode": "adaptive", "exploration": 0},
                                 localWork={"mode": "adaptive"}))
        ids = _register(engine, 6)
        for i, node in enumerate(ids):  # two slow clients: 10x the time per step
            client = engine.registry.get(node)
            client.dispatched = client.answered = 4
            seconds = 20.0 if i < 2 else 2.0
            client.update_arrived(nbytes=0, seconds=seconds, metrics={"loss": 1.0, "steps": 20})
        opened = engine._open_round(1)
        assert isinstance(opened, Round)
        return opened, engine

    opened, engine = asyncio.run(scenario())
    assert not {"node-0", "node-1"} & set(opened.selected)
    slow = engine.registry.get("node-0")
    assert slow.selection == "not picked" and slow.selection_score == pytest.approx(1.0)
    assert engine.registry.get("node-2").selection in ("utility", "not picked")
    # Everyone picked is fast: full work (2 epochs x 10 batches), FedNova caps at it.
    assert all(opened.planned_steps[n] == 20 for n in opened.selected)
    status = slow.status(job="hetero", now=0.0, offline_after=1e9, wall_now=0.0)
    assert status.selection == "not picked" and status.seconds_per_step == pytest.approx(1.0)

    # A slow client that is picked gets the steps that fit the fast clients' time.
    from fedkube.runtime.coordinator.local_work import plan_local_work
    plans, planned = plan_local_work(engine.spec, opened.plan, [
        engine.registry.get(n) for n in ("node-0", "node-2", "node-3")])
    assert planned == {"node-0": 2, "node-2": 20, "node-3": 20}
    assert plans["node-0"].max_local_steps == 2 and "node-2" not in plans


def test_async_engine_weights_by_staleness_refuses_stale_updates_and_steps_per_buffer() -> None:
    async def scenario() -> tuple[AsyncEngine, list]:
        engine = engine_for(_job(clientsPerRound=3, strategy={
            "name": "fedavg", "mode": "async", "bufferSize": 2, "maxStaleness": 1}))
        assert isinstance(engine, AsyncEngine)
        _register(engine, 3)
        engine._fill()
        assert set(engine.in_flight) == {"node-0", "node-1", "node-2"}
        refusals = []

        def header(node: str, version: int) -> UpdateHeader:
            return UpdateHeader(node_id=node, round=engine.in_flight[node].number,
                                model_version=version, payload=Payload.DELTA, num_samples=50,
                                metrics={"loss": 1.0, "steps": 20})

        before = {k: v.clone() for k, v in engine.weights.items()}
        await engine.accept_update(header("node-0", 0), _delta(engine), 10)
        await engine.accept_update(header("node-1", 0), _delta(engine), 10)
        verdict = await engine._next_round()  # the full buffer: one server step
        assert verdict is None and engine.round == 1 and engine.version == 1
        for name, old in before.items():  # both fresh: the step is their plain mean
            moved = engine.weights[name] - old
            assert torch.allclose(moved, torch.full_like(moved, 1e-3), atol=1e-6)
        # node-2 trained on version 0: one step stale, accepted at 1/sqrt(2).
        await engine.accept_update(header("node-2", 0), _delta(engine), 10)
        assert engine.buffer.count == 1
        engine._fill()  # node-0 and node-1 get new tasks on version 1
        engine.version = 3  # as if two more steps had happened meanwhile
        try:
            await engine.accept_update(header("node-0", 1), _delta(engine), 10)
        except Rejected as rejection:
            refusals.append(rejection.reason)
        try:
            await engine.accept_update(header("node-1", 0), _delta(engine), 10)
        except Rejected as rejection:
            refusals.append(rejection.reason)
        return engine, refusals

    engine, refusals = asyncio.run(scenario())
    # Two steps stale (maxStaleness 1), then built on a model older than its task's.
    assert refusals == [RejectReason.STALE, RejectReason.WRONG_VERSION]
    assert engine.buffer.count == 1
    assert engine.history[-1].mean_staleness == 0.0
    assert engine.status.server_steps == 1


def test_a_partly_filled_fedbuff_buffer_survives_a_coordinator_restart(tmp_path) -> None:
    job = _job(clientsPerRound=2, strategy={"name": "fedavg", "mode": "async", "bufferSize": 2})

    def header(engine: AsyncEngine, node: str) -> UpdateHeader:
        return UpdateHeader(node_id=node, round=engine.in_flight[node].number,
                            model_version=engine.version, payload=Payload.DELTA,
                            num_samples=50, metrics={"loss": 1.0, "steps": 20})

    async def scenario() -> tuple[AsyncEngine, AsyncEngine]:
        first = engine_for(job, output_dir=tmp_path)
        _register(first, 2)
        first._fill()
        await first.accept_update(header(first, "node-0"), _delta(first), 10)
        await first.accept_update(header(first, "node-1"), _delta(first), 10)
        await first._next_round()  # step 1: checkpointed
        first._fill()
        await first.accept_update(header(first, "node-0"), _delta(first, 2e-3), 10)
        assert first.buffer.count == 1
        # The coordinator restarts: a new engine on the same folder.
        second = engine_for(job, output_dir=tmp_path)
        assert second.round == 1 and second.buffer.count == 1 and second.losses == [1.0]
        _register(second, 2)
        second._fill()
        for engine in (first, second):  # the same last update completes both buffers
            await engine.accept_update(header(engine, "node-1"), _delta(engine, 4e-3), 10)
            await engine._next_round()
        return first, second

    first, second = asyncio.run(scenario())
    assert first.round == second.round == 2
    for name, value in first.weights.items():  # the restart lost nothing of step 2
        torch.testing.assert_close(second.weights[name], value, rtol=0, atol=0)
    # After the step the saved buffer belongs to an older version: a third engine starts
    # with an empty buffer.
    third = engine_for(job, output_dir=tmp_path)
    assert third.round == 2 and third.buffer.count == 0

    # Restarted with a smaller bufferSize than the saved buffer holds: it steps on it.
    async def lowered() -> AsyncEngine:
        wide = _job(clientsPerRound=2, strategy={"name": "fedavg", "mode": "async",
                                                 "bufferSize": 3})
        engine = engine_for(wide, output_dir=tmp_path)
        _register(engine, 2)
        engine._fill()
        for node in ("node-0", "node-1"):
            await engine.accept_update(header(engine, node), _delta(engine), 10)
        narrow = engine_for(_job(clientsPerRound=2, strategy={
            "name": "fedavg", "mode": "async", "bufferSize": 2}), output_dir=tmp_path)
        assert narrow.buffer.count == 0 and narrow.flushes.qsize() == 1
        await narrow._next_round()
        return narrow

    assert asyncio.run(lowered()).round == 3


def test_fednova_counts_the_planned_steps_whatever_a_client_claims() -> None:
    """FedNova divides a delta's weight by its local steps, so a client that claimed one
    step for the twenty it was asked to take would weigh twenty times its share."""
    async def scenario() -> torch.Tensor:
        engine = engine_for(_job(clientsPerRound=2, strategy={"name": "fednova"}))
        _register(engine, 2)
        opened = engine._open_round(1)
        assert isinstance(opened, Round)
        assert opened.planned_steps == {"node-0": 20, "node-1": 20}
        engine.open_round = opened  # as _run_round does, without dispatching tasks
        for node, claim, scale in (("node-0", 1, 1.0), ("node-1", 20, 3.0)):
            header = UpdateHeader(node_id=node, round=1, model_version=engine.version,
                                  payload=Payload.DELTA, num_samples=100,
                                  metrics={"loss": 1.0, "steps": claim})
            assert opened.counted_steps(header) == 20
            await engine.accept_update(header, _delta(engine, scale), 10)
        result = await opened.close()
        assert result.aggregate is not None
        return next(iter(result.aggregate.mean_delta.values()))

    mean = asyncio.run(scenario())
    # Equal samples, equal counted steps: the plain mean (1 + 3) / 2. Counting the claim
    # of one step would give tau_eff * (0.5 * 1/1 + 0.5 * 3/20) = 10.5 * 0.575 ~ 6.04.
    assert torch.allclose(mean, torch.full_like(mean, 2.0), rtol=1e-5)


def test_an_answer_to_a_closed_round_is_refused_as_late_and_a_future_round_is_not() -> None:
    """Adaptive selection over-commits, so late answers are routine: they are refused
    (never folded) and logged at info; an update for a round that never opened is not late."""
    async def scenario() -> list[Rejected]:
        engine = engine_for(_job(clientsPerRound=2))
        _register(engine, 2)
        opened = engine._open_round(1)
        assert isinstance(opened, Round)
        engine.open_round = opened
        await opened.close()
        refusals = []
        for round_number in (1, 2):
            engine.round = 1  # round 1 has closed; round 2 is not open yet
            header = UpdateHeader(node_id="node-0", round=round_number,
                                  model_version=engine.version, payload=Payload.DELTA,
                                  num_samples=100, metrics={"loss": 1.0})
            for open_round in (opened, None):
                engine.open_round = open_round
                with pytest.raises(Rejected) as caught:
                    await engine.accept_update(header, _delta(engine), 10)
                refusals.append(caught.value)
        return refusals

    late_closed, late_none, future_closed, future_none = asyncio.run(scenario())
    assert all(r.reason is RejectReason.WRONG_ROUND
               for r in (late_closed, late_none, future_closed, future_none))
    assert late_closed.late and late_none.late
    assert not future_closed.late and not future_none.late and "not open" in str(future_none)
    assert "late update does not count" in str(late_closed)
