"""The global model on GetModel's wire when some tensors travel as `ModelDelta`s from
the version the agent holds (spec.compression.downlink delta): the coordinator's
serialiser and the agent's assembler. Raw tensors go as in `tensors.serialized_chunks`;
a delta's payload goes in pieces of `chunk_bytes`, each carrying the TensorChunk's
`delta` field, so every message stays under the limit whatever the model's size.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from ..compression import EncodingError
from ..compression.downlink import ModelDelta, apply_delta
from ..proto import fedkube_pb2 as pb
from .buffers import BufferPool
from .tensors import (
    _DTYPES,
    CHUNK_BYTES,
    ReceivedTensor,
    Schema,
    TensorAssembler,
    WireError,
    dtype_name,
    serialized_chunks,
)

ModelPart = torch.Tensor | ModelDelta


def serialized_model_chunks(
    parts: Mapping[str, ModelPart],
    *,
    model_version: int,
    base_version: int,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[bytes]:
    """Each tensor of the model, raw or as a delta from `base_version`, as encoded
    TensorChunk messages in the mapping's order."""
    for name, part in parts.items():
        if isinstance(part, torch.Tensor):
            yield from serialized_chunks({name: part}, model_version=model_version,
                                         chunk_bytes=chunk_bytes)
            continue
        payload = memoryview(part.payload)
        for start in range(0, max(len(payload), 1), chunk_bytes):
            chunk = pb.TensorChunk(name=name, shape=list(part.shape),
                                   dtype=dtype_name(part.dtype), offset=start,
                                   model_version=model_version,
                                   data=bytes(payload[start:start + chunk_bytes]))
            chunk.delta.base_version = base_version
            chunk.delta.lossless = part.lossless
            chunk.delta.size = len(payload)
            chunk.delta.checksum = part.checksum
            yield chunk.SerializeToString()


class _IncomingDelta:
    def __init__(self, delta: pb.ModelDelta) -> None:
        self.delta = pb.ModelDelta()
        self.delta.CopyFrom(delta)
        self.payload = bytearray(delta.size)
        self.filled = 0


class ModelAssembler:
    """The agent's side: rebuilds the global model from raw chunks and delta chunks,
    applying each delta to the tensor of `held` (the version `held_version`, which the
    agent named in its request). `finish()` returns the whole model or raises WireError
    naming the tensor; `held` is never written to. Chunks may be TensorChunks or
    `ReceivedTensor`s (GetModel's zero-copy parse); raw tensors are received into `pool`'s
    reused buffers when one is given."""

    def __init__(self, schema: Schema, *, held: Mapping[str, torch.Tensor] | None = None,
                 held_version: int | None = None, pool: BufferPool | None = None) -> None:
        self._schema = schema
        self._pool = pool
        self._held = held
        self._held_version = held_version
        self._raw: dict[str, TensorAssembler] = {}
        self._deltas: dict[str, _IncomingDelta] = {}
        self.bytes_received = 0

    def add(self, chunk: pb.TensorChunk | ReceivedTensor) -> None:
        received = chunk
        if isinstance(chunk, ReceivedTensor):
            chunk = chunk.tensor
            data = chunk.data if received.data is None else received.data
        else:
            data = chunk.data
        name = chunk.name
        spec = self._schema.get(name)
        if spec is None:
            raise WireError(f"unexpected tensor {name!r}")
        self.bytes_received += len(data)
        if not chunk.HasField("delta"):
            if name in self._deltas:
                raise WireError(f"tensor {name!r}: raw chunk after delta ones")
            assembler = self._raw.get(name)
            if assembler is None:
                assembler = self._raw[name] = TensorAssembler({name: spec}, pool=self._pool)
            assembler.add(received)
            return
        if name in self._raw:
            raise WireError(f"tensor {name!r}: delta chunk after raw ones")
        if self._held is None or chunk.delta.base_version != self._held_version:
            held = "none" if self._held is None else f"version {self._held_version}"
            raise WireError(f"tensor {name!r}: a delta from version "
                            f"{chunk.delta.base_version}, but this agent holds {held}")
        if tuple(chunk.shape) != spec.shape or chunk.dtype != spec.dtype:
            raise WireError(f"tensor {name!r}: delta for {chunk.dtype}{tuple(chunk.shape)}, "
                            f"expected {spec.dtype}{spec.shape}")
        incoming = self._deltas.get(name)
        if incoming is None:
            if not 0 <= chunk.delta.size <= 2 * spec.nbytes + (1 << 16):
                raise WireError(f"tensor {name!r}: a delta of {chunk.delta.size} bytes for "
                                f"a tensor of {spec.nbytes}")
            incoming = self._deltas[name] = _IncomingDelta(chunk.delta)
        elif chunk.delta != incoming.delta:
            raise WireError(f"tensor {name!r}: delta header changed between chunks")
        if chunk.offset != incoming.filled:
            raise WireError(f"tensor {name!r}: delta chunk at byte {chunk.offset} out of order")
        end = incoming.filled + len(data)
        if end > incoming.delta.size:
            raise WireError(f"tensor {name!r}: {end} bytes, its delta has {incoming.delta.size}")
        incoming.payload[incoming.filled:end] = data
        incoming.filled = end

    def finish(self) -> dict[str, torch.Tensor]:
        """The model, in schema order."""
        missing = [n for n in self._schema if n not in self._raw and n not in self._deltas]
        if missing:
            raise WireError(f"missing tensors: {', '.join(missing)}")
        out: dict[str, torch.Tensor] = {}
        for name, spec in self._schema.items():
            if name in self._raw:
                out[name] = self._raw[name].finish()[name]
                continue
            assert self._held is not None  # add() refused deltas without a held model
            incoming = self._deltas[name]
            if incoming.filled != incoming.delta.size:
                raise WireError(f"tensor {name!r}: {incoming.filled} bytes, its delta has "
                                f"{incoming.delta.size}")
            delta = ModelDelta(shape=spec.shape, dtype=_DTYPES[spec.dtype],
                               lossless=incoming.delta.lossless or "none",  # type: ignore[arg-type]
                               payload=bytes(incoming.payload),
                               checksum=incoming.delta.checksum)
            try:
                out[name] = apply_delta(self._held[name], delta)
            except (EncodingError, KeyError) as error:
                raise WireError(f"tensor {name!r}: {error}") from None
        return out
