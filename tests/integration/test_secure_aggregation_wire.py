"""Secure aggregation over real gRPC against a real coordinator on 127.0.0.1, clients
driven by hand with the real `SecAggClient`: the model moves by exactly the mean of the
(fixed-point) updates, a plain update and hostile protocol messages are refused with a
reason and leave the model untouched, and under central DP each client is told its
share of the noise."""

from __future__ import annotations

import asyncio
import math

import grpc
import numpy as np
import pytest
import torch
from fedkube.runtime.proto import fedkube_pb2 as pb
from fedkube.runtime.secagg import FixedPoint, SecAggClient, to_wire
from fedkube.runtime.wire import convert
from rawclient import RawClient, chunks, filled, finish, job, start

pytestmark = pytest.mark.timeout(180)


async def _code(call) -> tuple[grpc.StatusCode, str] | str:
    try:
        await call
        return "ok"
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details()


def _flat(weights) -> np.ndarray:
    return torch.cat([t.reshape(-1).to(torch.float64) for t in weights.values()]).numpy()


async def _secure_scenario() -> dict[str, object]:
    coordinator = await start(job("secure", clientsPerRound=3, minClients=3,
                                  simulation={"clients": 3},
                                  secureAggregation={"enabled": True, "threshold": 0.6}),
                              registration_timeout=30)
    seen: dict[str, object] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
        nodes = [await RawClient.join(channel, f"node-{i}") for i in range(3)]
        await asyncio.gather(*(n.open().next_task() for n in nodes))
        plan = nodes[0].plan
        seen["plan_secure"] = plan.secure_aggregation.enabled
        initial = coordinator.initial
        # A plain update in a secure job never reaches the model.
        seen["plain"] = await nodes[0].submit(filled(initial, 0.5))
        clients = {n.node_id: SecAggClient(n.node_id, plan.round) for n in nodes}

        async def advertise(node: RawClient):
            return convert.roster_from_pb(await node.stub.SecAggAdvertise(
                convert.advert_to_pb(clients[node.node_id].advertise()),
                metadata=node.metadata))

        rosters = await asyncio.gather(*(advertise(n) for n in nodes))
        seen["replayed_advert"] = await _code(nodes[1].stub.SecAggAdvertise(
            pb.SecAggAdvert(node_id="node-1", round=plan.round, cipher_public=b"x" * 32,
                            mask_public=b"y" * 32), metadata=nodes[1].metadata))
        deliveries = await asyncio.gather(*(
            n.stub.SecAggShare(convert.bundle_to_pb(clients[n.node_id].share(r)),
                               metadata=n.metadata) for n, r in zip(nodes, rosters, strict=True)))
        length = sum(t.numel() for t in initial.values())
        updates = {n.node_id: np.full(length, 0.1 * (i + 1)) for i, n in enumerate(nodes)}
        masked = {n.node_id: clients[n.node_id].mask(convert.delivery_from_pb(d),
                                                     updates[n.node_id])
                  for n, d in zip(nodes, deliveries, strict=True)}

        def stream(node: RawClient, vector: np.ndarray):
            header = node.header(payload="masked")
            return node.stub.SecAggMaskedInput(
                chunks(header, {"masked": torch.from_numpy(to_wire(vector, 4))}),
                metadata=node.metadata)

        seen["short"] = await _code(stream(nodes[2], masked["node-2"].vector[:-1]))
        seen["short:untouched"] = coordinator.untouched()
        requests = await asyncio.gather(*(stream(n, masked[n.node_id].vector) for n in nodes))
        await asyncio.gather(*(
            n.stub.SecAggUnmask(convert.unmask_response_to_pb(
                clients[n.node_id].unmask(convert.unmask_request_from_pb(r))),
                metadata=n.metadata) for n, r in zip(nodes, requests, strict=True)))
        status = await finish(coordinator, *nodes)
    seen.update(phase=status.phase.value, moved=_flat(coordinator.moved()),
                expected=np.mean([np.full(length, 0.1 * (i + 1)) for i in range(3)], axis=0),
                resolution=FixedPoint(4.0, 3).resolution)
    return seen


def test_a_secure_round_over_grpc_moves_the_model_by_the_mean_and_refuses_hostile_input() -> None:
    seen = asyncio.run(_secure_scenario())
    assert seen["plan_secure"] is True
    code, details = seen["plain"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "masked input" in details
    code, details = seen["replayed_advert"]
    # The phase closed when all three had advertised: a replay is late, and says so.
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "replayed" in details
    code, details = seen["short"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "tensor 'masked'" in details
    assert seen["short:untouched"]
    assert seen["phase"] == "Succeeded"
    # fedavg with server learning rate 1: the model moved by the mean of the three
    # updates, exactly up to the fixed-point rounding and float32 storage.
    assert np.abs(seen["moved"] - seen["expected"]).max() <= seen["resolution"] + 1e-6


def test_central_dp_under_secure_aggregation_becomes_each_clients_noise_share() -> None:
    async def plan_of_first_task() -> tuple[pb.TrainPlan, float]:
        coordinator = await start(job(
            "secure-dp", clientsPerRound=4, minClients=4, simulation={"clients": 4},
            privacy={"mode": "central", "targetEpsilon": 5.0, "maxGradNorm": 0.5},
            secureAggregation={"enabled": True}), registration_timeout=30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
            nodes = [await RawClient.join(channel, f"node-{i}") for i in range(4)]
            await asyncio.gather(*(n.open().next_task() for n in nodes))
            plan = nodes[0].plan
            noise = coordinator.engine.central.noise_multiplier
            coordinator.finished.cancel()
            for node in nodes:
                node.leave()
        return plan, noise

    plan, noise = asyncio.run(plan_of_first_task())
    secure = plan.secure_aggregation
    assert secure.enabled and secure.clip_norm == 0.5
    # Four guaranteed survivors: their noise sums to std noise * clip, central DP's.
    assert secure.noise_std == pytest.approx(noise * 0.5 / math.sqrt(4))
