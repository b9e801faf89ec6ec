"""Central DP keeps honest books when fewer clients are live than the job planned for:
every round is accounted at the sampling rate really used (selected / eligible), the job
stops before a round would push the true epsilon past the target, and the epsilon it
reports is the one Opacus' own accountant gives for the rounds that ran."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from fedkube.runtime.proto import fedkube_pb2 as pb
from opacus.accountants import RDPAccountant
from rawclient import RawClient, filled, job, start

pytestmark = pytest.mark.timeout(240)

DELTA = 1e-5
PLANNED_POPULATION = 10
LIVE = 2


async def _answer_every_task(client: RawClient, initial) -> int:
    rounds = 0
    while (await client.next_task()).kind == pb.Task.TRAIN:
        assert await client.submit(filled(initial, 0.01)) == "accepted"
        rounds += 1
    return rounds


async def _run(**privacy) -> dict[str, object]:
    spec = job("books", rounds=30, clientsPerRound=2, minClients=2,
               simulation={"clients": PLANNED_POPULATION},
               privacy={"mode": "central", "delta": DELTA, "maxGradNorm": 1.0, **privacy})
    # Only LIVE of the planned clients ever come: the coordinator starts without the rest.
    coordinator = await start(spec, registration_timeout=1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
        clients = [await RawClient.join(channel, f"node-{i}") for i in range(LIVE)]
        answered = await asyncio.gather(*(_answer_every_task(c, coordinator.initial)
                                          for c in clients))
        status = await asyncio.wait_for(coordinator.finished, timeout=120)
    central = coordinator.engine.central
    assert central is not None
    return {"status": status, "answered": answered, "noise": central.noise_multiplier}


def _opacus_epsilon(noise: float, rate: float, rounds: int) -> float:
    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=noise, sample_rate=rate)
    return accountant.get_epsilon(DELTA) if rounds else 0.0


def test_reported_epsilon_matches_opacus_for_a_smaller_population() -> None:
    target = 8.0
    seen = asyncio.run(_run(targetEpsilon=target))
    status, noise = seen["status"], seen["noise"]
    rounds = status.round
    assert status.phase.value == "Succeeded"
    assert any(c.reason == "BudgetExhausted" for c in status.conditions)
    assert 0 < rounds < 30 and seen["answered"] == [rounds, rounds]
    # Every live client was picked every round: the rate used is 1, not 2 / 10.
    used = _opacus_epsilon(noise, 1.0, rounds)
    assert status.epsilon == pytest.approx(used, abs=1e-3)
    assert used <= target < _opacus_epsilon(noise, 1.0, rounds + 1)
    # The planned rate would have reported far less than was really spent.
    assert _opacus_epsilon(noise, LIVE / PLANNED_POPULATION, rounds) < used / 2


def test_a_job_whose_first_round_cannot_fit_is_refused_before_it_starts() -> None:
    seen = asyncio.run(_run(targetEpsilon=0.05, noiseMultiplier=0.5))
    status = seen["status"]
    assert status.phase.value == "Failed"
    assert status.round == 0 and seen["answered"] == [0, 0]
    assert "first round" in (status.message or "")
