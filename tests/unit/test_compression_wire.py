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


class _Counting(DecodedUpdate):
    """Counts the decoded tensors alive at once (each read decodes anew)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.alive: set[int] = set()
        self.peak = 0
        self.reads = 0

    def __getitem__(self, name):
        import weakref

        tensor = super().__getitem__(name)
        if tensor.dtype == torch.float32 and tensor.numel() > 100:
            self.reads += 1
            key = self.reads
            self.alive.add(key)
            weakref.finalize(tensor, self.alive.discard, key)
            self.peak = max(self.peak, len(self.alive))
        return tensor


@pytest.mark.parametrize("config", [CompressionConfig(bits=8), CompressionConfig(top_k=0.1)])
def test_the_fold_never_holds_the_whole_decoded_update(config):
    from fedkube.runtime.aggregation import RoundAggregator
    from fedkube.runtime.aggregation.bounds import update_norm
    from fedkube.runtime.coordinator.strategy import aggregation_config
    from fedkube.runtime.spec import StrategySpec

    torch.manual_seed(1)
    template = {f"w{i}": torch.zeros(50, 40) for i in range(4)}
    update = {k: torch.randn_like(v) for k, v in template.items()}
    out = compress_update(update, config)
    view = _Counting(out.parts, {k: tuple(v.shape) for k, v in template.items()})
    norm = update_norm(view)
    aggregator = RoundAggregator(aggregation_config(StrategySpec()), template, max_buffered=0)
    aggregator.add("n", view, 10)
    mean = aggregator.finish().mean_delta
    expected = decode_update(out.parts)
    # A loop's next tensor is decoded while its last is still bound: two at most, never
    # the whole update (four here).
    assert view.peak <= 2 < len(template) and view.reads >= 2 * len(template)
    assert norm == pytest.approx(float(torch.sqrt(sum((t.double() ** 2).sum()
                                                      for t in expected.values()))))
    for k in template:
        torch.testing.assert_close(mean[k], expected[k])


def test_robust_rules_and_central_clipping_see_the_decoded_update():
    from fedkube.runtime.aggregation import RoundAggregator
    from fedkube.runtime.coordinator.strategy import aggregation_config
    from fedkube.runtime.privacy.central import clip_update
    from fedkube.runtime.spec import StrategySpec

    torch.manual_seed(2)
    template = {"w": torch.zeros(40, 10), "b": torch.zeros(10)}
    updates = [{k: torch.randn_like(v) for k, v in template.items()} for _ in range(3)]
    shapes = {k: tuple(v.shape) for k, v in template.items()}
    parts = [compress_update(u, CompressionConfig(top_k=0.2, bits=8)).parts for u in updates]
    decoded = [decode_update(p) for p in parts]

    median = RoundAggregator(aggregation_config(StrategySpec(name="median")), template,
                             max_buffered=3)
    for i, p in enumerate(parts):
        median.add(f"n{i}", DecodedUpdate(p, shapes), 10)
    got = median.finish().mean_delta
    for k in template:
        torch.testing.assert_close(got[k], torch.stack([d[k] for d in decoded]).median(0).values)

    clipped = RoundAggregator(aggregation_config(StrategySpec()), template, max_buffered=0,
                              transform=lambda d: clip_update(d, max_norm=0.5),
                              uniform_weights=True)
    for i, p in enumerate(parts):
        clipped.add(f"n{i}", DecodedUpdate(p, shapes), 10)
    mean = clipped.finish().mean_delta
    expected = [clip_update(d, max_norm=0.5) for d in decoded]
    for k in template:
        torch.testing.assert_close(mean[k], sum(e[k] for e in expected) / 3)
