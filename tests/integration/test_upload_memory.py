"""The coordinator's memory is bounded however many clients upload at once: with the
job's defaults (fedavg, `admission.concurrentUploads` unset) uploads are assembled one at
a time (runtime/coordinator/uploads.py), so the running sum and one upload are its peak:
3x the model. Eight real uploads over gRPC arrive together; the upload guard counts how
many it ever held at once."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from fedkube.runtime import wire
from fedkube.runtime.proto import fedkube_pb2 as pb
from rawclient import RawClient, filled, finish, job, start

pytestmark = pytest.mark.timeout(180)

UPLOADS = 8


async def _until(predicate, timeout: float = 60) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout=timeout)


async def _scenario() -> dict[str, object]:
    coordinator = await start(job("memory", clientsPerRound=UPLOADS, minClients=UPLOADS,
                                  simulation={"clients": UPLOADS}), registration_timeout=60)
    guard = coordinator.engine.uploads
    delta = filled(coordinator.initial, 0.5)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
        clients = [await RawClient.join(channel, f"node-{i}") for i in range(UPLOADS)]
        await asyncio.gather(*(c.next_task() for c in clients))
        everyone_waits = asyncio.Event()

        async def held_open(client: RawClient):
            """The first upload: half its tensors, then the rest once all eight are in."""
            yield pb.UpdateChunk(header=client.header())
            pieces = list(wire.to_chunks(delta, model_version=client.plan.model_version))
            half = len(pieces) // 2
            for chunk in pieces[:half]:
                yield pb.UpdateChunk(tensor=chunk)
            await everyone_waits.wait()
            for chunk in pieces[half:]:
                yield pb.UpdateChunk(tensor=chunk)

        async def submit_first():
            return await clients[0].stub.SubmitUpdate(held_open(clients[0]),
                                                      metadata=clients[0].metadata)

        first = asyncio.create_task(submit_first())
        await _until(lambda: guard.held == 1)
        others = [asyncio.create_task(c.submit(delta)) for c in clients[1:]]
        await _until(lambda: len(guard.in_flight()) == UPLOADS)  # all eight at once
        waiting_while_held = len(guard.in_flight()) - guard.held
        everyone_waits.set()
        reply = await first
        outcomes = [reply.accepted] + list(await asyncio.gather(*others))
        status = await finish(coordinator, *clients)
    return {"peak": guard.peak_held, "waiting": waiting_while_held, "outcomes": outcomes,
            "phase": status.phase.value, "moved": coordinator.moved()}


def test_concurrent_uploads_are_assembled_one_at_a_time() -> None:
    seen = asyncio.run(_scenario())
    assert seen["waiting"] == UPLOADS - 1  # the other seven queued behind the first
    assert seen["peak"] == 1
    assert seen["outcomes"] == [True] + ["accepted"] * (UPLOADS - 1)
    assert seen["phase"] == "Succeeded"
    # every upload was folded: the model moved by the common delta
    moved = seen["moved"]
    assert any(float(torch.abs(v).max()) > 0 for v in moved.values())
