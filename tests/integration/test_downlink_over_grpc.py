"""The global model as exact deltas (spec.compression.downlink delta) against a real
coordinator over gRPC on 127.0.0.1: the real agent reproduces every version bit for
bit, and pays far less than the whole model after the first round; a delta that does not
apply to what it holds is refused and the whole model asked for instead; a client naming
a version the coordinator no longer keeps gets the whole model."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest
import torch
from fedkube.runtime import wire
from fedkube.runtime.agent.client import Agent, AgentConfig
from fedkube.runtime.coordinator.events import RoundClosed
from fedkube.runtime.proto import fedkube_pb2 as pb
from rawclient import RawClient, filled, finish, job, start

pytestmark = pytest.mark.timeout(240)

Weights = dict[str, torch.Tensor]


def _same_bits(a: Weights, b: Weights) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and a[k].reshape(-1).view(torch.uint8).tolist() == b[k].reshape(-1).view(torch.uint8).tolist()
        for k in a)


async def _agent_scenario(state_dir: Path) -> dict[str, object]:
    coordinator = await start(job("downlink", rounds=4, clientsPerRound=1,
                                  simulation={"clients": 1}, learningRate=0.1,
                                  compression={"downlink": "delta"}),
                              registration_timeout=60)
    agent = Agent(AgentConfig(coordinator=f"127.0.0.1:{coordinator.port}", node_id="edge",
                              device="cpu", simulated_index=0, state_dir=state_dir,
                              give_up_after=120))
    versions = {0: {k: v.clone() for k, v in coordinator.initial.items()}}
    exact: dict[int, bool] = {}

    def on_event(event: object) -> None:
        if not isinstance(event, RoundClosed):
            return
        held_version, held = agent.held_model  # what the agent trained this round on
        exact[event.record.round] = held_version == event.record.round - 1 and _same_bits(
            held, versions[held_version])
        versions[event.record.model_version] = {
            k: v.clone() for k, v in coordinator.engine.weights.items()}
        if event.record.round == 2:
            # The agent's copy of version 1 goes wrong between rounds (a bit flip in
            # memory): the delta to version 2 no longer leads there from it.
            held["fc1.weight" if "fc1.weight" in held else next(iter(held))].view(
                torch.int32).reshape(-1)[0] ^= 1

    coordinator.engine.events.subscribe(on_event)
    code = await asyncio.wait_for(agent.run(), timeout=200)
    status = await finish(coordinator)
    return {"code": code, "phase": status.phase.value, "exact": exact,
            "down": [r.round_bytes_down for r in coordinator.engine.history],
            "model_bytes": coordinator.engine.model_bytes, "bytes_down": status.bytes_down}


def test_an_agent_reproduces_each_version_from_deltas(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="fedkube.agent")
    seen = asyncio.run(_agent_scenario(tmp_path))
    assert seen["code"] == 0 and seen["phase"] == "Succeeded"
    assert seen["exact"] == {1: True, 2: True, 3: True, 4: True}
    model, down = seen["model_bytes"], seen["down"]
    assert down[0] == model  # the first round: nothing held, the whole model
    assert down[1] < 0.9 * model and down[3] < 0.9 * model
    # Round 3: the delta was refused (the held copy was spoiled) and the whole model
    # fetched after it, so both count.
    assert model < down[2] < 2 * model
    assert any("refusing the model delta from version 1" in r.getMessage()
               for r in caplog.records)
    assert sum(down) == seen["bytes_down"]


async def _download(client: RawClient, version: int, held: int | None
                    ) -> list[pb.TensorChunk]:
    request = pb.GetModelRequest(node_id=client.node_id, model_version=version)
    if held is not None:
        request.held_version = held
    return [c async for c in client.stub.GetModel(request, metadata=client.metadata)]


async def _raw_scenario() -> dict[str, object]:
    coordinator = await start(job("downlink-raw", rounds=4, clientsPerRound=1,
                                  compression={"downlink": "delta"}),
                              registration_timeout=30)
    seen: dict[str, object] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
        client = await RawClient.join(channel, "raw", samples=10)
        schema = wire.schema_of(coordinator.initial)
        held: tuple[int, Weights] | None = None
        for number in range(1, 5):
            task = await client.next_task()
            version = task.plan.model_version
            seen["plan downlink"] = task.plan.compression.downlink
            if number == 4:
                # Version 0 was three steps ago: no longer kept, so the whole model.
                stale = await _download(client, version, held=0)
                seen["stale deltas"] = sum(c.HasField("delta") for c in stale)
                seen["stale model"] = _same_bits(wire.from_chunks(stale, schema),
                                                 coordinator.engine.weights)
            chunks = await _download(client, version, held[0] if held else None)
            assembler = wire.ModelAssembler(schema, held=held[1] if held else None,
                                            held_version=held[0] if held else None)
            for chunk in chunks:
                assembler.add(chunk)
            held = (version, assembler.finish())
            seen[f"round {number} deltas"] = sum(c.HasField("delta") for c in chunks)
            seen[f"round {number} exact"] = _same_bits(held[1], coordinator.engine.weights)
            assert await client.submit(filled(coordinator.initial, 0.01 * number)) == "accepted"
        await finish(coordinator, client)
    return seen


def test_a_client_holding_a_dropped_version_gets_the_whole_model() -> None:
    seen = asyncio.run(_raw_scenario())
    assert seen["plan downlink"] == "delta"
    assert seen["round 1 deltas"] == 0  # nothing held yet
    for number in range(2, 5):
        assert seen[f"round {number} deltas"] > 0, number
    assert all(seen[f"round {n} exact"] for n in range(1, 5))
    assert seen["stale deltas"] == 0 and seen["stale model"]
