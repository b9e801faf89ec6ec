"""The chunked tensor encoding both ends of the protocol use."""

from __future__ import annotations

import platform
import sys

import pytest
import torch
from fedkube.runtime import wire
from fedkube.runtime.agent.client import GRPC_OPTIONS as AGENT_OPTIONS
from fedkube.runtime.coordinator.server import GRPC_OPTIONS as SERVER_OPTIONS
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


def test_a_100mb_model_travels_in_messages_under_both_ends_limits() -> None:
    weights = {"big": torch.ones(25 * 1024 * 1024), "small": torch.ones(3)}  # 100 MiB
    sizes = []
    assembler = wire.TensorAssembler(wire.schema_of(weights))
    for chunk in wire.to_chunks(weights):
        sizes.append(chunk.ByteSize())
        assembler.add(chunk)
    back = assembler.finish()
    limits = {dict(options)[key] for options in (SERVER_OPTIONS, AGENT_OPTIONS)
              for key in ("grpc.max_receive_message_length", "grpc.max_send_message_length")}
    assert limits == {MAX_MESSAGE_BYTES}  # both ends agree on one bound
    # An UpdateChunk wraps a TensorChunk with a few bytes of framing: well under the bound.
    assert max(sizes) + 64 < MAX_MESSAGE_BYTES
    assert len(sizes) >= 100 * (1 << 20) // wire.CHUNK_BYTES
    assert torch.equal(back["big"], weights["big"])


def test_assembled_tensors_are_writable_and_own_their_memory() -> None:
    weights = {"a": torch.arange(10, dtype=torch.float32), "b": torch.ones(2, 3)}
    back = wire.from_chunks(wire.to_chunks(weights, chunk_bytes=8), wire.schema_of(weights))
    back["a"].add_(1)  # the receiver may fold into what it got
    assert torch.equal(back["a"], weights["a"] + 1) and torch.equal(back["b"], weights["b"])
    assert back["a"].untyped_storage().data_ptr() != back["b"].untyped_storage().data_ptr()


def test_a_large_finite_update_is_not_mistaken_for_an_overflow() -> None:
    # The finite check sums first; a sum that overflows must not refuse finite values.
    weights = {"w": torch.full((1000,), 3e38), "h": torch.full((100,), 60000.0).half()}
    back = wire.from_chunks(wire.to_chunks(weights), wire.schema_of(weights))
    assert torch.equal(back["w"], weights["w"]) and torch.equal(back["h"], weights["h"])


def test_a_bool_tensor_with_other_bytes_is_refused() -> None:
    schema = {"mask": wire.TensorSpec((2,), "bool")}
    chunk = next(wire.to_chunks({"mask": torch.tensor([True, False])}))
    chunk.data = b"\x01\x07"
    with pytest.raises(wire.WireError, match="'mask': bool values other than 0 and 1"):
        wire.from_chunks([chunk], schema)


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
    # A chunk that would run past its tensor is refused before it is written anywhere.
    long = next(wire.to_chunks(weights))
    long.data = bytes(320)
    assembler = wire.TensorAssembler(schema, max_bytes=1000)
    with pytest.raises(wire.WireError, match="'w': 320 bytes, expected 256"):
        assembler.add(long)


def test_update_chunks_carry_exactly_the_model_chunks() -> None:
    weights = _weights()
    plain = list(wire.to_chunks(weights, model_version=3, chunk_bytes=16))
    wrapped = list(wire.to_update_chunks(weights, model_version=3, chunk_bytes=16))
    assert [part.WhichOneof("part") for part in wrapped] == ["tensor"] * len(plain)
    assert [part.tensor for part in wrapped] == plain
    back = wire.from_chunks((part.tensor for part in wrapped), wire.schema_of(weights))
    assert all(torch.equal(back[name], tensor) for name, tensor in weights.items())


def test_preserialised_chunks_parse_to_exactly_the_messages() -> None:
    from fedkube.runtime.proto import fedkube_pb2 as pb

    weights = _weights()
    for chunk_bytes in (16, 1 << 20):
        plain = list(wire.to_chunks(weights, model_version=3, chunk_bytes=chunk_bytes))
        encoded = list(wire.serialized_chunks(weights, model_version=3,
                                              chunk_bytes=chunk_bytes))
        assert [pb.TensorChunk.FromString(data) for data in encoded] == plain
        wrapped = list(wire.to_update_chunks(weights, model_version=3,
                                             chunk_bytes=chunk_bytes))
        updates = list(wire.serialized_update_chunks(weights, model_version=3,
                                                     chunk_bytes=chunk_bytes))
        assert [pb.UpdateChunk.FromString(data) for data in updates] == wrapped
        assert wire.serialize(updates[0]) is updates[0]
        assert wire.serialize(wrapped[0]) == wrapped[0].SerializeToString()


def test_received_chunks_assemble_without_copying_the_message_first() -> None:
    from fedkube.runtime.proto import fedkube_pb2 as pb

    weights = _weights()
    schema = wire.schema_of(weights)
    for encoded in (list(wire.serialized_update_chunks(weights, chunk_bytes=16)),
                    [m.SerializeToString() for m in wire.to_update_chunks(weights)]):
        assembler = wire.TensorAssembler(schema)
        for data in encoded:
            part = wire.parse_update_chunk(data)
            assert part.HasField("tensor")
            # (protobuf's own encoder leaves an empty payload out altogether)
            assert isinstance(part.data, memoryview) or part.tensor.name == "empty"
            assert part.tensor.data == b""  # the payload was never copied into it
            assembler.add(part)
        back = assembler.finish()
        assert all(torch.equal(back[name], tensor) for name, tensor in weights.items())
    header = wire.parse_update_chunk(
        pb.UpdateChunk(header=pb.UpdateHeader(node_id="n", round=2)).SerializeToString())
    assert header.HasField("header") and header.header.round == 2 and header.data is None
    # The split parser keeps every check: a stray tensor and a cut message are refused.
    stray = next(wire.serialized_update_chunks({"other": torch.ones(2)}))
    with pytest.raises(wire.WireError, match="unexpected tensor 'other'"):
        wire.TensorAssembler(schema).add(wire.parse_update_chunk(stray))
    inner = pb.TensorChunk(name="fc.bias").SerializeToString() + b"\x2a\x64" + bytes(10)
    with pytest.raises(wire.WireError, match="truncated"):  # data claims 100 bytes, has 10
        wire.parse_update_chunk(b"\x12" + bytes([len(inner)]) + inner)


def test_model_chunks_parse_without_copying_and_keep_every_check() -> None:
    from fedkube.runtime.proto import fedkube_pb2 as pb

    weights = _weights()
    schema = wire.schema_of(weights)
    for encoded in (list(wire.serialized_chunks(weights, model_version=4, chunk_bytes=16)),
                    [m.SerializeToString() for m in wire.to_chunks(weights, model_version=4)]):
        assembler = wire.TensorAssembler(schema)
        for data in encoded:
            part = wire.parse_tensor_chunk(data)
            assert part.model_version == 4 and part.nbytes == len(data)
            assert part.tensor.data == b""  # the payload stayed in gRPC's bytes
            assembler.add(part)
        back = assembler.finish()
        assert all(torch.equal(back[name], tensor) for name, tensor in weights.items())
    stray = next(wire.serialized_chunks({"other": torch.ones(2)}))
    with pytest.raises(wire.WireError, match="unexpected tensor 'other'"):
        wire.TensorAssembler(schema).add(wire.parse_tensor_chunk(stray))
    cut = pb.TensorChunk(name="fc.bias").SerializeToString() + b"\x2a\x64" + bytes(10)
    with pytest.raises(wire.WireError, match="truncated"):
        wire.parse_tensor_chunk(cut)


def test_model_deltas_assemble_from_zero_copy_chunks_into_pooled_buffers() -> None:
    from fedkube.runtime.compression.downlink import model_delta

    old = {"w": torch.randn(64, 64), "b": torch.randn(64), "steps": torch.tensor(3)}
    new = {name: t + 1 for name, t in old.items()}
    parts = {"w": model_delta(old, new)["w"], "b": new["b"], "steps": new["steps"]}
    pool = wire.BufferPool(max_bytes=1 << 20)
    for _ in range(2):  # the second time from the first one's buffers
        assembler = wire.ModelAssembler(wire.schema_of(old), held=old, held_version=7,
                                        pool=pool)
        for data in wire.serialized_model_chunks(parts, model_version=8, base_version=7,
                                                 chunk_bytes=1024):
            assembler.add(wire.parse_tensor_chunk(data))
        back = assembler.finish()
        assert all(torch.equal(back[name], t) for name, t in new.items())
        del back, assembler
    assert pool.reused == 2  # the two raw tensors; the delta's result is its own


def test_pooled_memory_is_reused_only_once_nothing_uses_it() -> None:
    pool = wire.BufferPool(max_bytes=1 << 20)
    weights = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    schema = wire.schema_of(weights)

    def receive(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assembler = wire.TensorAssembler(schema, pool=pool)
        for data in wire.serialized_chunks(tensors, chunk_bytes=1024):
            assembler.add(wire.parse_tensor_chunk(data))
        return dict(assembler.finish())

    kept = receive(weights)
    row = kept["w"][3]  # a view keeps the whole buffer in use
    del kept
    other = receive({name: t + 1 for name, t in weights.items()})
    assert pool.reused == 1  # the bias's memory came back, the weight's not: `row` views it
    assert torch.equal(row, weights["w"][3])  # and it was not written over
    address = other["w"].data_ptr()
    del other
    again = receive(weights)
    assert pool.reused == 3 and again["w"].data_ptr() == address  # the same memory, mapped
    assert all(torch.equal(again[name], t) for name, t in weights.items())
    del row, again
    assert pool.spare_bytes <= pool.max_bytes
    small = wire.BufferPool(max_bytes=100)  # spares beyond its bound are freed
    del_me = small.take(4096)
    del del_me
    assert small.spare_bytes == 0


def test_the_allocator_tuning_defers_to_the_users_own_settings() -> None:
    from fedkube.runtime.wire.allocator import keep_large_buffers_mapped

    assert keep_large_buffers_mapped({"MALLOC_TRIM_THRESHOLD_": "1000000"}) is False
    assert keep_large_buffers_mapped({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}) is False
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert keep_large_buffers_mapped({}) is True
