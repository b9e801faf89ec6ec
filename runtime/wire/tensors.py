"""Tensors on the wire: split into chunks well under gRPC's message limit, reassembled
with every check the coordinator relies on (names, shapes, dtypes, size, finite values).

Both ends use this module, so a model of any size passes without raising gRPC limits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..messages import RejectReason
from ..proto import fedkube_pb2 as pb

# 1 MiB of payload per message: far below gRPC's 4 MiB default, large enough that
# per-message overhead stays negligible.
CHUNK_BYTES = 1 << 20

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class WireError(ValueError):
    """A message that must be refused; the text says which tensor and why, `reason` the
    kind of fault (the label the coordinator's metrics count it under)."""

    def __init__(self, message: str, reason: RejectReason = RejectReason.MALFORMED) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _DTYPES[self.dtype].itemsize


Schema = dict[str, TensorSpec]


def schema_of(weights: Mapping[str, torch.Tensor]) -> Schema:
    """What a valid message for these weights must contain."""
    return {name: TensorSpec(tuple(t.shape), dtype_name(t.dtype)) for name, t in weights.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise WireError(f"dtype {dtype} cannot be sent") from None


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bfloat16:  # numpy has no bfloat16: send its bit pattern
        flat = flat.view(torch.int16)
    return flat.numpy().tobytes()


def to_chunks(
    weights: Mapping[str, torch.Tensor],
    *,
    model_version: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[pb.TensorChunk]:
    """Each tensor as one or more chunks, in the mapping's order."""
    for name, tensor in weights.items():
        dtype = dtype_name(tensor.dtype)
        itemsize = _DTYPES[dtype].itemsize
        data = _raw_bytes(tensor)
        per_chunk = max(1, chunk_bytes // itemsize) * itemsize
        shape = list(tensor.shape)
        # An empty tensor still needs one message so the receiver sees its name.
        for start in range(0, max(len(data), 1), per_chunk):
            yield pb.TensorChunk(
                name=name,
                shape=shape,
                dtype=dtype,
                offset=start // itemsize,
                data=data[start:start + per_chunk],
                model_version=model_version,
            )


def encoded_size(weights: Mapping[str, torch.Tensor]) -> int:
    """Payload bytes `to_chunks` sends for these weights."""
    return sum(t.numel() * t.element_size() for t in weights.values())


class TensorAssembler:
    """Rebuilds tensors from chunks, checking each against the expected schema.

    Holds one model's worth of bytes at most. `finish()` returns the tensors only if
    every expected tensor arrived complete and finite; otherwise it raises WireError.
    """

    def __init__(self, schema: Schema, *, max_bytes: int | None = None) -> None:
        self._schema = schema
        self._max_bytes = max_bytes if max_bytes is not None else sum(
            s.nbytes for s in schema.values())
        self._buffers: dict[str, bytearray] = {}
        self._received = 0

    @property
    def bytes_received(self) -> int:
        return self._received

    def add(self, chunk: pb.TensorChunk) -> None:
        expected = self._schema.get(chunk.name)
        if expected is None:
            raise WireError(f"unexpected tensor {chunk.name!r}", RejectReason.BAD_SHAPE)
        if tuple(chunk.shape) != expected.shape:
            raise WireError(
                f"tensor {chunk.name!r}: shape {tuple(chunk.shape)} != expected {expected.shape}",
                RejectReason.BAD_SHAPE)
        if chunk.dtype != expected.dtype:
            raise WireError(
                f"tensor {chunk.name!r}: dtype {chunk.dtype} != expected {expected.dtype}",
                RejectReason.BAD_SHAPE)
        self._received += len(chunk.data)
        if self._received > self._max_bytes:
            raise WireError(f"update exceeds {self._max_bytes} bytes", RejectReason.OVERSIZE)
        buffer = self._buffers.setdefault(chunk.name, bytearray())
        itemsize = _DTYPES[expected.dtype].itemsize
        if chunk.offset * itemsize != len(buffer):
            raise WireError(
                f"tensor {chunk.name!r}: chunk at element {chunk.offset} out of order")
        buffer.extend(chunk.data)

    def finish(self) -> dict[str, torch.Tensor]:
        missing = [name for name in self._schema if name not in self._buffers]
        if missing:
            raise WireError(f"missing tensors: {', '.join(missing)}", RejectReason.BAD_SHAPE)
        tensors: dict[str, torch.Tensor] = {}
        for name, spec in self._schema.items():
            buffer = self._buffers[name]
            if len(buffer) != spec.nbytes:
                raise WireError(
                    f"tensor {name!r}: {len(buffer)} bytes, expected {spec.nbytes}")
            dtype = _DTYPES[spec.dtype]
            if dtype == torch.bfloat16:
                array = np.frombuffer(buffer, dtype=np.int16)
                tensor = torch.from_numpy(array.copy()).view(torch.bfloat16)
            else:
                array = np.frombuffer(buffer, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
                tensor = torch.from_numpy(array.copy())
            tensor = tensor.reshape(spec.shape)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise WireError(f"tensor {name!r} holds NaN or Inf", RejectReason.NON_FINITE)
            tensors[name] = tensor
        self._buffers.clear()
        return tensors


def from_chunks(chunks: Iterable[pb.TensorChunk], schema: Schema) -> dict[str, torch.Tensor]:
    """Assemble a whole message stream (the receiving side of `to_chunks`)."""
    assembler = TensorAssembler(schema)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()
