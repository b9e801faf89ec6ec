"""Uploads that send a header and then stall cannot starve an honest agent: each is cut
off at the server's idle deadline, a node gets one upload in flight, and the slots they
held go to the next in line. The honest agent is the real one, in this process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from fedkube.runtime.agent.client import Agent, AgentConfig
from fedkube.runtime.coordinator.events import UpdateAccepted
from fedkube.runtime.proto import fedkube_pb2 as pb
from rawclient import RawClient, finish, job, start

pytestmark = pytest.mark.timeout(240)

STALLERS = 5  # more than the coordinator's upload slots (1 by default under fedavg)


async def _stall_once(client: RawClient, release: asyncio.Event, codes: list[str]) -> None:
    """An upload that sends a header and nothing else (until released)."""

    async def header_then_nothing():
        yield pb.UpdateChunk(header=client.header())
        await release.wait()

    try:
        await client.stub.SubmitUpdate(header_then_nothing(), metadata=client.metadata)
    except grpc.aio.AioRpcError as error:
        codes.append(error.code().name)


async def _stall(client: RawClient, release: asyncio.Event, codes: list[str]) -> None:
    """Stalled uploads, one after the other, until released."""
    while not release.is_set():
        await _stall_once(client, release, codes)


async def _scenario(state_dir: Path) -> dict[str, object]:
    total = STALLERS + 1
    coordinator = await start(job(
        "stall", clientsPerRound=total, simulation={"clients": total},
        admission={"uploadIdleSeconds": 2.0}), registration_timeout=60)
    honest_in = coordinator.when(
        lambda event: isinstance(event, UpdateAccepted) and event.node_id == "honest")
    release = asyncio.Event()
    codes: list[str] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
        stallers = [await RawClient.join(channel, f"staller-{i}") for i in range(STALLERS)]
        for staller in stallers:
            staller.open()
        agent = Agent(AgentConfig(coordinator=f"127.0.0.1:{coordinator.port}", node_id="honest",
                                  device="cpu", simulated_index=0, state_dir=state_dir,
                                  give_up_after=120))
        agent_done = asyncio.create_task(agent.run())
        await asyncio.gather(*(s.next_task() for s in stallers))
        # Stallers take every slot; the first also tries a second upload at once.
        stalling = [asyncio.create_task(_stall(s, release, codes)) for s in stallers]
        await asyncio.sleep(0)  # let the first uploads start before the duplicate
        stalling.append(asyncio.create_task(_stall_once(stallers[0], release, codes)))
        await asyncio.wait_for(honest_in.wait(), timeout=150)
        release.set()
        await asyncio.gather(*stalling)
        rejections = {s.node_id: dict(coordinator.engine.registry.get(s.node_id).rejections)
                      for s in stallers}
        status = await finish(coordinator, *stallers)
        exit_code = await asyncio.wait_for(agent_done, timeout=60)
    return {"codes": codes, "rejections": rejections, "phase": status.phase.value,
            "exit_code": exit_code, "rounds": status.round}


def test_an_honest_agent_completes_while_others_stall(tmp_path: Path) -> None:
    seen = asyncio.run(_scenario(tmp_path))
    assert seen["exit_code"] == 0
    assert seen["phase"] == "Succeeded" and seen["rounds"] == 1
    assert "DEADLINE_EXCEEDED" in seen["codes"]  # stalled uploads are cut off
    assert "ALREADY_EXISTS" in seen["codes"]  # one upload in flight per node
    # The honest upload got a slot only once a staller's was cut off and freed.
    assert sum(r.get("upload_stalled", 0) for r in seen["rejections"].values()) >= 1, \
        seen["rejections"]
