"""Deltas that reach the open round together are folded together (`Round.fold`): each one
still gets its own answer (accepted, or refused for its own reason), a refused one leaves
the sum alone, and the mean is bit for bit the one of folding them one at a time."""

from __future__ import annotations

import asyncio

import torch
from fedkube.runtime.coordinator.async_rounds import engine_for
from fedkube.runtime.coordinator.engine import RoundEngine
from fedkube.runtime.coordinator.round import FOLD_TOGETHER, Round
from fedkube.runtime.messages import (
    NodeFacts,
    Payload,
    Registration,
    Rejected,
    RejectReason,
    UpdateHeader,
)
from fedkube.runtime.spec import FederatedJob

CLIENTS = FOLD_TOGETHER + 3  # more than one batch


def _engine() -> RoundEngine:
    job = FederatedJob.model_validate({
        "apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
        "metadata": {"name": "batches"},
        "spec": {"model": "mlp", "data": {"dataset": "digits", "limit": 200}, "rounds": 1,
                 "minClients": 1, "clientsPerRound": CLIENTS,
                 "admission": {"maxUpdateNorm": 100.0, "normBoundFactor": None}}})
    engine = engine_for(job)
    assert isinstance(engine, RoundEngine)
    for i in range(CLIENTS):
        admission = engine.register(Registration(
            node_id=f"node-{i:02d}", join_token="", facts=NodeFacts(num_samples=100),
            simulated_index=None))
        engine.open_stream(admission.node_id)
    return engine


def _deltas(engine: RoundEngine) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return {f"node-{i:02d}": {k: 1e-3 * torch.randn(v.shape, generator=generator)
                              for k, v in engine.weights.items()} for i in range(CLIENTS)}


def _header(opened: Round, node_id: str, samples: int) -> UpdateHeader:
    return UpdateHeader(node_id=node_id, round=opened.number, payload=Payload.DELTA,
                        model_version=opened.plan.model_version, num_samples=samples,
                        metrics={"loss": 1.0})


def _samples(node_id: str) -> int:
    return 50 + int(node_id[-2:])


def _nobody_live(node_id: str) -> bool:
    return False


def test_waiting_deltas_get_their_own_answers_and_the_sequential_mean() -> None:
    async def together() -> tuple[Round, list[object]]:
        engine = _engine()
        opened = engine._open_round(1)
        assert isinstance(opened, Round)
        deltas = _deltas(engine)
        poisoned = {k: v.clone() for k, v in deltas["node-01"].items()}
        next(iter(poisoned.values())).view(-1)[3] = float("nan")
        huge = {k: v * 1e6 for k, v in deltas["node-02"].items()}
        live = set(deltas).__contains__
        calls = [opened.fold(_header(opened, node, _samples(node)), delta, live)
                 for node, delta in deltas.items() if node not in ("node-01", "node-02")]
        calls += [opened.fold(_header(opened, "node-01", 51), poisoned, live),
                  opened.fold(_header(opened, "node-02", 52), huge, live),
                  opened.fold(_header(opened, "node-03", 53), deltas["node-03"], live)]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        return opened, answers

    async def one_at_a_time() -> Round:
        engine = _engine()
        opened = engine._open_round(1)
        assert isinstance(opened, Round)
        for node, delta in _deltas(engine).items():
            if node not in ("node-01", "node-02"):
                await opened.fold(_header(opened, node, _samples(node)), delta, _nobody_live)
        return opened

    opened, answers = asyncio.run(together())
    *accepted, poisoned, huge, repeated = answers
    assert all(not isinstance(answer, BaseException) for answer in accepted), accepted
    assert isinstance(poisoned, Rejected) and poisoned.reason is RejectReason.MALFORMED
    assert "NaN or Inf" in str(poisoned)
    assert isinstance(huge, Rejected) and huge.reason is RejectReason.NORM_BOUND
    assert isinstance(repeated, Rejected) and repeated.reason is RejectReason.DUPLICATE
    expected = [f"node-{i:02d}" for i in range(CLIENTS) if i not in (1, 2)]
    assert opened.accepted == expected
    reference = asyncio.run(one_at_a_time())
    assert reference.accepted == expected

    async def close(round_: Round) -> dict[str, torch.Tensor]:
        result = await round_.close()
        assert result.aggregate is not None
        return result.aggregate.mean_delta

    mean, sequential = asyncio.run(close(opened)), asyncio.run(close(reference))
    assert all(torch.equal(mean[k], sequential[k]) for k in sequential)


def test_a_delta_waiting_when_the_round_closes_is_refused_as_late() -> None:
    async def scenario() -> tuple[object, object]:
        engine = _engine()
        opened = engine._open_round(1)
        assert isinstance(opened, Round)
        deltas = _deltas(engine)
        first = asyncio.ensure_future(opened.fold(
            _header(opened, "node-00", 50), deltas["node-00"], set(deltas).__contains__))
        await asyncio.sleep(0)  # it takes the fold lock
        closing = asyncio.ensure_future(opened.close())
        await asyncio.sleep(0)  # the close waits for the lock next
        late = asyncio.ensure_future(opened.fold(
            _header(opened, "node-04", 54), deltas["node-04"], set(deltas).__contains__))
        answers = await asyncio.gather(first, late, return_exceptions=True)
        result = await closing
        assert result.accepted == ("node-00",)
        return answers[0], answers[1]

    first, late = asyncio.run(scenario())
    assert not isinstance(first, BaseException)
    assert isinstance(late, Rejected) and late.reason is RejectReason.WRONG_ROUND


def test_the_engine_lets_a_batch_wait_in_the_sum() -> None:
    hold = FOLD_TOGETHER - 1
    engine = _engine()
    opened = engine._open_round(1)
    assert isinstance(opened, Round)
    deltas = list(_deltas(engine).values())
    for index, delta in enumerate(deltas[:hold]):
        opened.aggregator.add(f"node-{index:02d}", delta, 10)
    assert opened.aggregator.held == hold  # none folded yet: one pass folds them all
    opened.aggregator.flush()
    assert opened.aggregator.held == 0
