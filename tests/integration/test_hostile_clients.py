"""Hostile clients against a real coordinator over gRPC on 127.0.0.1: well-formed
updates that would poison the model, claims of weight they do not hold, calls under
another node's id, registrations beyond the job's cap. After each refusal the global model
is bit-identical, and the honest client's update is the only one that moves it."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from fedkube.runtime.aggregation import weighted_mean
from fedkube.runtime.proto import fedkube_pb2 as pb
from rawclient import RawClient, drain_stream, filled, finish, job, start

pytestmark = pytest.mark.timeout(180)


async def _poison_scenario() -> dict[str, object]:
    coordinator = await start(job("poison", clientsPerRound=3, simulation={"clients": 3}),
                              registration_timeout=30)
    seen: dict[str, object] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
        honest, poisoner, inflater = [await RawClient.join(channel, name, samples=10)
                                      for name in ("honest", "poisoner", "inflater")]
        # All three are live before the round opens, so all three are selected.
        await asyncio.gather(*(c.open().next_task() for c in (honest, poisoner, inflater)))
        weights = coordinator.initial
        seen["honest"] = await honest.submit(filled(weights, 0.5))
        # Huge but finite: passes every well-formedness check.
        seen["poisoned"] = await poisoner.submit(filled(weights, 1e6))
        seen["poisoned:untouched"] = coordinator.untouched()
        # Claims a hundred million examples after registering ten.
        seen["inflated"] = await inflater.submit(filled(weights, 0.25), num_samples=10**8)
        seen["inflated:untouched"] = coordinator.untouched()
        rejections = {c.node_id: dict(coordinator.engine.registry.get(c.node_id).rejections)
                      for c in (honest, poisoner, inflater)}
        status = await finish(coordinator, honest, poisoner, inflater)
    seen.update(phase=status.phase.value, moved=coordinator.moved(), rejections=rejections)
    return seen


def test_poisoned_values_are_refused_and_inflated_samples_capped() -> None:
    seen = asyncio.run(_poison_scenario())
    assert seen["honest"] == "accepted"
    code, details = seen["poisoned"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "norm" in details
    assert seen["poisoned:untouched"] and seen["inflated:untouched"]
    assert seen["inflated"] == "accepted"  # admitted, at the weight it registered
    assert seen["phase"] == "Succeeded"
    assert seen["rejections"] == {"honest": {}, "poisoner": {"norm_bound": 1},
                                  "inflater": {"sample_cap": 1}}
    moved = seen["moved"]
    name = next(k for k, v in moved.items() if v.is_floating_point())
    # Bounded: the honest and the inflater weigh 10 each, the poisoner not at all.
    assert torch.allclose(moved[name], torch.full_like(moved[name], 0.375))
    # Without the bounds FedAvg would be wrecked: the poisoner's values dominate, and the
    # inflater's claim drowns the honest update.
    shape = moved[name].shape
    def update(value: float) -> dict[str, torch.Tensor]:
        return {name: torch.full(shape, value)}

    unbounded = weighted_mean([(update(0.5), 10), (update(1e6), 10), (update(0.25), 10**8)])
    assert float(unbounded[name].abs().min()) > 0.1  # the poisoner's share alone
    poisoned = weighted_mean([(update(0.5), 10), (update(1e6), 10)])
    assert float(poisoned[name].min()) > 1e5
    inflated = weighted_mean([(update(0.5), 10), (update(0.25), 10**8)])
    assert float(inflated[name].mean()) == pytest.approx(0.25, abs=1e-6)


async def _impersonation_scenario() -> dict[str, object]:
    coordinator = await start(job("impostor", clientsPerRound=1,
                                  admission={"maxClients": 3}), registration_timeout=30)
    seen: dict[str, object] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
        victim = await RawClient.join(channel, "victim", samples=10)
        await victim.next_task()
        stub = victim.stub
        wrong = (("fedkube-session", "guessed"),)
        seen["heartbeat"] = await _code(stub.Heartbeat(
            pb.HeartbeatRequest(node_id="victim"), metadata=wrong))
        seen["stream"] = await drain_stream(stub.StreamTasks(
            pb.StreamTasksRequest(node_id="victim")))
        seen["model"] = await drain_stream(stub.GetModel(pb.GetModelRequest(
            node_id="victim", model_version=victim.plan.model_version), metadata=wrong))
        # A node with its own valid session, submitting under the victim's id.
        impostor = await RawClient.join(channel, "impostor", samples=10)
        impostor.plan = victim.plan
        seen["submit"] = await impostor.submit(filled(coordinator.initial, 0.9),
                                               node_id="victim", num_samples=10)
        seen["submit:untouched"] = coordinator.untouched()
        # Re-registering the victim's id without its credential yields another id, and
        # the victim's record (its data size) stays as it was.
        squatter = await RawClient.join(channel, "victim", samples=10**6)
        seen["squatter_id"] = squatter.node_id
        seen["victim_size"] = coordinator.engine.registry.get("victim").spec.data_size
        # The cap: three registered, a fourth is refused.
        seen["fourth"] = await _code(stub.Register(pb.RegisterRequest(node_id="fourth")))
        # The victim, with its own session, is still heard.
        seen["victim"] = await victim.submit(filled(coordinator.initial, 0.5))
        rejections = dict(coordinator.engine.registry.get("victim").rejections)
        status = await finish(coordinator, victim, impostor, squatter)
    victim_phase = coordinator.engine.registry.get("victim").phase(
        now=0.0, offline_after=float("inf"))
    seen.update(phase=status.phase.value, moved=coordinator.moved(), rejections=rejections,
                dropped=status.clients.dropped, victim_phase=victim_phase.value)
    return seen


async def _code(call) -> object:
    try:
        await call
        return "accepted"
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details()


def test_impersonation_and_reregistration_are_refused() -> None:
    seen = asyncio.run(_impersonation_scenario())
    for name in ("heartbeat", "stream", "model", "submit"):
        assert seen[name] != "accepted", name
        assert seen[name][0] == grpc.StatusCode.UNAUTHENTICATED, (name, seen[name])
        assert "session" in seen[name][1]
    assert seen["submit:untouched"]
    assert seen["squatter_id"] != "victim"
    assert seen["victim_size"] == 10
    assert seen["fourth"][0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "maxClients" in seen["fourth"][1]
    assert seen["victim"] == "accepted"
    assert seen["phase"] == "Succeeded"
    assert seen["rejections"] == {"unauthenticated": 4}
    # All three left before the job ended: Offline and dropped, not Ready.
    assert seen["dropped"] == 3 and seen["victim_phase"] == "Offline"
    for name, moved in seen["moved"].items():
        if moved.is_floating_point():
            assert torch.allclose(moved, torch.full_like(moved, 0.5)), name


def test_a_job_whose_clients_never_come_fails_with_a_reason() -> None:
    async def scenario():
        coordinator = await start(job("nobody", minClients=2, roundRetries=1,
                                      roundTimeoutSeconds=0.5), registration_timeout=0.5)
        return await asyncio.wait_for(coordinator.finished, timeout=60)

    status = asyncio.run(scenario())
    assert status.phase.value == "Failed"
    assert "minClients" in (status.message or "")
