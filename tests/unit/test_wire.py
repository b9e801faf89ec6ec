"""The chunked tensor encoding both ends of the protocol use."""

from __future__ import annotations

import pytest
import torch
from fedkube.runtime import wire
from fedkube.runtime.coordinator.server import MAX_MESSAGE_BYTES


def _weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(8, 1, 3, 3, generator=generator),
        "fc.bias": torch.randn(10, generator=generator),
        "half": torch.randn(5, generator=generator).half(),
        "brain": torch.randn(3, generator=generator).bfloat16(),
        "steps": torch.tensor(7),
        "empty": torch.zeros(0, 4),
    }


def test_round_trip_is_exact_for_every_dtype() -> None:
    weights = _weights()
    back = wire.from_chunks(wire.to_chunks(weights, chunk_bytes=16), wire.schema_of(weights))
    assert list(back) == list(weights)
    for name, tensor in weights.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_a_100mb_model_travels_in_messages_under_the_grpc_limit() -> None:
    weights = {"big": torch.ones(25 * 1024 * 1024), "small": torch.ones(3)}  # 100 MiB
    sizes = []
    assembler = wire.TensorAssembler(wire.schema_of(weights))
    for chunk in wire.to_chunks(weights):
        sizes.append(chunk.ByteSize())
        assembler.add(chunk)
    back = assembler.finish()
    assert max(sizes) < MAX_MESSAGE_BYTES < 4 * 1024 * 1024  # gRPC's default stays untouched
    assert len(sizes) >= 100
    assert torch.equal(back["big"], weights["big"])


@pytest.mark.parametrize(("tamper", "message"), [
    (lambda w: {**w, "fc.bias": torch.full((10,), float("nan"))}, "NaN or Inf"),
    (lambda w: {**w, "fc.bias": torch.full((10,), float("-inf"))}, "NaN or Inf"),
    (lambda w: {**w, "fc.bias": torch.zeros(11)}, "shape"),
    (lambda w: {**w, "fc.bias": torch.zeros(10, dtype=torch.float64)}, "dtype"),
    (lambda w: {k: v for k, v in w.items() if k != "fc.bias"}, "missing tensors: fc.bias"),
    (lambda w: {**w, "extra": torch.zeros(1)}, "unexpected tensor 'extra'"),
])
def test_bad_tensors_are_refused_by_name(tamper, message) -> None:
    weights = _weights()
    with pytest.raises(wire.WireError, match=message):
        wire.from_chunks(wire.to_chunks(tamper(weights)), wire.schema_of(weights))


def test_reordered_truncated_and_oversized_streams_are_refused() -> None:
    weights = {"w": torch.arange(64, dtype=torch.float32)}
    schema = wire.schema_of(weights)
    chunks = list(wire.to_chunks(weights, chunk_bytes=64))
    with pytest.raises(wire.WireError, match="out of order"):
        wire.from_chunks(reversed(chunks), schema)
    with pytest.raises(wire.WireError, match="bytes, expected"):
        wire.from_chunks(chunks[:-1], schema)
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.from_chunks(chunks + chunks[-1:], schema)
