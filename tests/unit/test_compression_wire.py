"""Compressed updates on the wire: encodings travel per tensor in chunks and come back
as a mapping that decodes on read; inconsistent or oversize encodings are refused."""

from __future__ import annotations

import pytest
import torch
from fedkube.runtime import wire
from fedkube.runtime.compression import (
    CompressionConfig,
    DecodedUpdate,
    compress_update,
    decode_update,
)
from fedkube.runtime.messages import RejectReason


def _update():
    torch.manual_seed(0)
    return {"w": torch.randn(64, 32), "b": torch.randn(32), "steps": torch.tensor(3)}


def _assemble(chunks, update):
    assembler = wire.TensorAssembler(wire.schema_of(update))
    for part in chunks:
        assembler.add(part.tensor)
    return assembler.finish()


@pytest.mark.parametrize("config", [
    CompressionConfig(top_k=0.05, bits=8), CompressionConfig(bits=4, lossless="zstd"),
    CompressionConfig(top_k=0.2, lossless="lz4"), CompressionConfig()])
def test_compressed_update_round_trips_across_chunk_boundaries(config):
    update = _update()
    out = compress_update(update, config, generator=None)
    chunks = list(wire.to_compressed_update_chunks(out.parts, chunk_bytes=100))
    received = _assemble(chunks, update)
    expected = decode_update(out.parts)
    assert list(received) == list(update)
    for name in update:
        assert torch.equal(received[name], expected[name])
    assert sum(len(c.tensor.data) for c in chunks) == out.sent_bytes
    if config.enabled:
        assert isinstance(received, DecodedUpdate) and received.encoded >= 1
        assert len(chunks) > 1
    else:  # compression off: the raw path as before, a plain dict
        assert type(received) is dict


def _encoded_chunks(**change):
    update = _update()
    out = compress_update(update, CompressionConfig(top_k=0.1, bits=8))
    chunks = [c.tensor for c in wire.to_compressed_update_chunks(out.parts, chunk_bytes=64)]
    return update, chunks


def test_an_encoding_that_changes_between_chunks_is_refused():
    update, chunks = _encoded_chunks()
    encoded = [c for c in chunks if c.HasField("encoding")]
    encoded[1].encoding.bits = 4
    assembler = wire.TensorAssembler(wire.schema_of(update))
    with pytest.raises(wire.WireError, match="encoding changed"):
        for chunk in chunks:
            assembler.add(chunk)


def test_an_encoding_larger_than_the_update_is_refused_before_allocation():
    update, chunks = _encoded_chunks()
    chunks[0].encoding.size = 1 << 40
    assembler = wire.TensorAssembler(wire.schema_of(update))
    with pytest.raises(wire.WireError) as error:
        assembler.add(chunks[0])
    assert error.value.reason is RejectReason.OVERSIZE


def test_encoded_non_float32_and_malformed_payloads_are_refused():
    update, chunks = _encoded_chunks()
    bad = chunks[0]
    bad.name = "steps"
    del bad.shape[:]
    assembler = wire.TensorAssembler(wire.schema_of(update))
    with pytest.raises(wire.WireError, match="only float32"):
        assembler.add(bad)
    update, chunks = _encoded_chunks()
    first = next(c for c in chunks if c.HasField("encoding"))
    first.data = b"\xff\xff\xff\x7f" + first.data[4:]  # first index 2**31-1: out of range
    assembler = wire.TensorAssembler(wire.schema_of(update))
    for chunk in chunks:
        assembler.add(chunk)
    with pytest.raises(wire.WireError, match="out of range") as error:
        assembler.finish()
    assert error.value.reason is RejectReason.MALFORMED
