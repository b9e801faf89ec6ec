"""An update refused by its last chunks leaves the global model as it was and carries
nothing into the next update. A real coordinator over gRPC on 127.0.0.1; each upload
travels in many small chunks so that the fault sits far from the first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import torch
from fedkube.runtime import wire
from fedkube.runtime.proto import fedkube_pb2 as pb
from rawclient import RawClient, filled, finish, job, start

pytestmark = pytest.mark.timeout(180)

SMALL_CHUNKS = 512  # bytes of payload per message: dozens of chunks per tensor


def _pieces(client: RawClient, tensors: dict[str, torch.Tensor]) -> list[pb.UpdateChunk]:
    return [pb.UpdateChunk(tensor=chunk) for chunk in wire.to_chunks(
        tensors, model_version=client.plan.model_version, chunk_bytes=SMALL_CHUNKS)]


async def _send(client: RawClient, pieces: list[pb.UpdateChunk], **header: object) -> object:
    async def stream() -> AsyncIterator[pb.UpdateChunk]:
        yield pb.UpdateChunk(header=client.header(**header))
        for piece in pieces:
            yield piece

    try:
        await client.stub.SubmitUpdate(stream(), metadata=client.metadata)
        return "accepted"
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details()


async def _scenario() -> dict[str, object]:
    coordinator = await start(job("late", clientsPerRound=4, simulation={"clients": 4}),
                              registration_timeout=30)
    seen: dict[str, object] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
        nan_tail, bad_tail, understated, honest = [
            await RawClient.join(channel, name, samples=10)
            for name in ("nan-tail", "bad-tail", "understated", "honest")]
        clients = (nan_tail, bad_tail, understated, honest)
        await asyncio.gather(*(c.open().next_task() for c in clients))
        weights = coordinator.initial
        last = next(reversed(weights))
        # Every chunk well-formed; a NaN in the very last element of the last tensor.
        poisoned = filled(weights, 7.0)
        poisoned[last].view(-1)[-1] = float("nan")
        pieces = _pieces(nan_tail, poisoned)
        seen["chunks"] = len(pieces)
        seen["nan"] = await _send(nan_tail, pieces)
        seen["nan:untouched"] = coordinator.untouched()
        # Every chunk in order but the last one that continues a tensor: it claims an
        # offset already filled.
        pieces = _pieces(bad_tail, filled(weights, 9.0))
        late = max(i for i, piece in enumerate(pieces) if piece.tensor.offset > 0)
        seen["late"] = late / len(pieces)
        pieces[late].tensor.offset = 0
        seen["order"] = await _send(bad_tail, pieces)
        seen["order:untouched"] = coordinator.untouched()
        # Its header declares a tenth of what it sends (to share the room compressed
        # uploads get): refused once it passes what it declared.
        pieces = _pieces(understated, filled(weights, 11.0))
        payload = sum(len(piece.tensor.data) for piece in pieces)
        seen["understated"] = await _send(understated, pieces, upload_bytes=payload // 10)
        seen["understated:untouched"] = coordinator.untouched()
        # The honest update, after the refusals, declaring exactly what it sends.
        pieces = _pieces(honest, filled(weights, 0.5))
        seen["honest"] = await _send(honest, pieces, upload_bytes=sum(
            len(piece.tensor.data) for piece in pieces))
        status = await finish(coordinator, *clients)
    seen.update(phase=status.phase.value, moved=coordinator.moved())
    return seen


def test_an_update_refused_by_its_last_chunk_leaves_no_trace() -> None:
    seen = asyncio.run(_scenario())
    assert seen["chunks"] > 20 and seen["late"] > 0.9
    code, details = seen["nan"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in details
    code, details = seen["order"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "out of order" in details
    code, details = seen["understated"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "upload_bytes" in details
    assert seen["nan:untouched"] and seen["order:untouched"] and seen["understated:untouched"]
    assert seen["honest"] == "accepted"
    assert seen["phase"] == "Succeeded"
    # Only the honest update moved the model: by 0.5 everywhere (to float32 rounding of
    # the new weights), nothing of the 7s or 9s written before it.
    for name, moved in seen["moved"].items():
        if moved.is_floating_point():
            assert torch.allclose(moved, torch.full_like(moved, 0.5), rtol=0, atol=1e-6), name
