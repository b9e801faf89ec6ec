"""Compressed updates against a real coordinator over gRPC on 127.0.0.1: well-formed ones
are decoded into the running sum (the model moves by the mean of what was decoded),
malformed ones (sparse indices out of range, a NaN scale, a short payload) get
INVALID_ARGUMENT with their reason and leave the global model bit-identical."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import numpy as np
import pytest
import torch
from fedkube.runtime import wire
from fedkube.runtime.compression import (
    CompressionConfig,
    EncodedTensor,
    compress_update,
    decode_update,
)
from fedkube.runtime.proto import fedkube_pb2 as pb
from rawclient import RawClient, finish, job, start

pytestmark = pytest.mark.timeout(180)


async def _send(client: RawClient, parts) -> object:
    async def stream():
        header = client.header()
        yield pb.UpdateChunk(header=header)
        for part in wire.to_compressed_update_chunks(parts, model_version=header.model_version,
                                                     chunk_bytes=256):
            yield part
    try:
        await client.stub.SubmitUpdate(stream(), metadata=client.metadata)
        return "accepted"
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details()


def _spoil(parts, name, mutate=None, **changes):
    encoded = parts[name]
    assert isinstance(encoded, EncodedTensor)
    payload = bytearray(encoded.payload)
    if mutate is not None:
        mutate(payload)
    return {**parts, name: dataclasses.replace(encoded, payload=bytes(payload), **changes)}


async def _scenario() -> dict[str, object]:
    coordinator = await start(job("compressed", clientsPerRound=2, simulation={"clients": 2},
                                  compression={"topK": 0.1, "quantizeBits": 8}),
                              registration_timeout=30)
    seen: dict[str, object] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
        a, b = [await RawClient.join(channel, name, samples=10) for name in ("a", "b")]
        tasks = await asyncio.gather(a.open().next_task(), b.open().next_task())
        plan = tasks[0].plan.compression
        seen["plan"] = (plan.top_k, plan.quantize_bits, plan.error_feedback)
        weights = coordinator.initial
        big = max((k for k, v in weights.items() if v.is_floating_point()),
                  key=lambda k: weights[k].numel())
        config = CompressionConfig(top_k=0.1, bits=8)
        torch.manual_seed(3)
        updates = [{k: torch.randn_like(v) * 0.01 if v.is_floating_point() else
                    torch.zeros_like(v) for k, v in weights.items()} for _ in range(2)]
        rng = np.random.default_rng(0)
        sent = [compress_update(u, config, generator=rng) for u in updates]
        parts_b = sent[1].parts
        seen["out of range"] = await _send(b, _spoil(
            parts_b, big, lambda p: p.__setitem__(slice(0, 4), np.int32(10**8).tobytes())))
        count = parts_b[big].count
        seen["nan scale"] = await _send(b, _spoil(
            parts_b, big, lambda p: p.__setitem__(slice(4 * count, 4 * count + 4),
                                                  np.float32("nan").tobytes())))
        seen["short"] = await _send(b, _spoil(parts_b, big, lambda p: p.__delitem__(-1)))
        seen["untouched"] = coordinator.untouched()
        seen["a"] = await _send(a, sent[0].parts)
        seen["b"] = await _send(b, parts_b)
        rejections = dict(coordinator.engine.registry.get(b.node_id).rejections)
        status = await finish(coordinator, a, b)
    decoded = [decode_update(s.parts) for s in sent]
    expected = {k: (decoded[0][k].double() + decoded[1][k].double()) / 2 for k in weights}
    seen.update(phase=status.phase.value, moved=coordinator.moved(), expected=expected,
                rejections=rejections, bytes_up=status.bytes_up,
                sent=sum(s.sent_bytes for s in sent), raw=sum(s.raw_bytes for s in sent))
    return seen


def test_compressed_updates_fold_in_and_malformed_ones_are_refused() -> None:
    seen = asyncio.run(_scenario())
    assert seen["plan"] == (pytest.approx(0.1), 8, False)
    for what, fragment in (("out of range", "out of range"), ("nan scale", "NaN"),
                           ("short", "needs")):
        code, details = seen[what]
        assert code == grpc.StatusCode.INVALID_ARGUMENT and fragment in details, what
    assert seen["untouched"]
    assert seen["rejections"] == {"malformed": 2, "non_finite": 1}
    assert seen["a"] == seen["b"] == "accepted" and seen["phase"] == "Succeeded"
    for name, moved in seen["moved"].items():
        if moved.is_floating_point():
            torch.testing.assert_close(moved.double(), seen["expected"][name],
                                       atol=1e-6, rtol=1e-5)
    assert seen["bytes_up"] == seen["sent"] < 0.2 * seen["raw"]
