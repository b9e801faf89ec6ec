"""Tensors on the wire: split into chunks well under gRPC's message limit, reassembled
with every check the coordinator relies on (names, shapes, dtypes, size, finite values).

Both ends use this module, so a model of any size passes without raising gRPC limits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from google.protobuf.message import DecodeError

from ..compression import DecodedUpdate, EncodedTensor, EncodingError
from ..messages import RejectReason
from ..proto import fedkube_pb2 as pb
from .buffers import BufferPool

# 4 MiB of payload per message: larger chunks mean fewer per-message costs (a protobuf
# object, an event-loop turn on each side, HTTP/2 framing); bench/wire.py measures the
# result. Both ends raise gRPC's message limits to MAX_MESSAGE_BYTES to fit.
CHUNK_BYTES = 4 << 20
#: The gRPC message limit both ends set: room for a peer whose chunks are up to twice ours,
#: plus the fields around the payload.
MAX_MESSAGE_BYTES = 2 * CHUNK_BYTES + (64 << 10)

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


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without copying them (a CPU, contiguous tensor is viewed as is)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bfloat16:  # numpy has no bfloat16: send its bit pattern
        flat = flat.view(torch.int16)
    return memoryview(flat.numpy()).cast("B")


def _views(weights: Mapping[str, torch.Tensor], chunk_bytes: int
           ) -> Iterator[tuple[str, list[int], str, int, memoryview]]:
    """(name, shape, dtype, offset in elements, payload) of every chunk, in order; each
    payload a view of the tensor's memory (no copy yet)."""
    for name, tensor in weights.items():
        dtype = dtype_name(tensor.dtype)
        itemsize = _DTYPES[dtype].itemsize
        data = _byte_view(tensor)
        per_chunk = max(1, chunk_bytes // itemsize) * itemsize
        shape = list(tensor.shape)
        # An empty tensor still needs one message so the receiver sees its name.
        for start in range(0, max(len(data), 1), per_chunk):
            yield name, shape, dtype, start // itemsize, data[start:start + per_chunk]


def _pieces(weights: Mapping[str, torch.Tensor], chunk_bytes: int
            ) -> Iterator[tuple[str, list[int], str, int, bytes]]:
    """As `_views`, each payload copied once into the bytes object a message takes; no
    whole-tensor copy is made on the way."""
    for name, shape, dtype, offset, view in _views(weights, chunk_bytes):
        yield name, shape, dtype, offset, bytes(view)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_prefix(field: int, length: int) -> bytes:
    """The tag and length of a length-delimited protobuf field (wire type 2)."""
    return _varint(field << 3 | 2) + _varint(length)


_CHUNK_DATA = pb.TensorChunk.DESCRIPTOR.fields_by_name["data"].number
_UPDATE_TENSOR = pb.UpdateChunk.DESCRIPTOR.fields_by_name["tensor"].number


def _encoded_pieces(weights: Mapping[str, torch.Tensor], model_version: int,
                    chunk_bytes: int) -> Iterator[tuple[bytes, bytes, memoryview]]:
    """Every chunk as (its other fields encoded, the data field's tag and length, the
    payload's view): joined, they are the TensorChunk's protobuf encoding. Fields may
    come in any order on the wire, so `data` goes last and the payload is never copied
    into a message first: protobuf's own encoder, which grows its buffer by doubling and
    copies it out (0.2-0.4 GB/s here), is left only the few bytes of metadata."""
    for name, shape, dtype, offset, view in _views(weights, chunk_bytes):
        meta = pb.TensorChunk(name=name, shape=shape, dtype=dtype, offset=offset,
                              model_version=model_version).SerializeToString()
        yield meta, _length_prefix(_CHUNK_DATA, len(view)), view


def serialized_chunks(
    weights: Mapping[str, torch.Tensor],
    *,
    model_version: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[bytes]:
    """The chunks of `to_chunks`, each already encoded as a TensorChunk message: one copy
    of the payload, from the tensor's memory into the bytes gRPC sends. Sent through a
    method whose serializer is `serialize` (GetModel's on the coordinator)."""
    for meta, prefix, view in _encoded_pieces(weights, model_version, chunk_bytes):
        yield b"".join((meta, prefix, view))


def serialized_update_chunks(
    parts: Mapping[str, torch.Tensor | EncodedTensor],
    *,
    model_version: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[bytes]:
    """The chunks of `to_compressed_update_chunks`, each encoded as an UpdateChunk
    message; raw tensors with one copy of their payload (as `serialized_chunks`)."""
    for name, part in parts.items():
        if isinstance(part, torch.Tensor):
            for meta, prefix, view in _encoded_pieces({name: part}, model_version,
                                                      chunk_bytes):
                size = len(meta) + len(prefix) + len(view)
                yield b"".join((_length_prefix(_UPDATE_TENSOR, size), meta, prefix, view))
            continue
        for chunk in to_compressed_update_chunks({name: part}, model_version=model_version,
                                                 chunk_bytes=chunk_bytes):
            yield chunk.SerializeToString()


def _read_varint(data: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise WireError("a truncated or malformed chunk message")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return value, at
        shift += 7


def _split_data(data: memoryview) -> tuple[bytes, memoryview | None]:
    """A TensorChunk's encoding without its `data` field, and that field's bytes as a
    view (the last occurrence wins, as protobuf's own parser has it)."""
    rest: list[memoryview] = []
    payload: memoryview | None = None
    at = 0
    while at < len(data):
        start = at
        tag, at = _read_varint(data, at)
        kind = tag & 7
        if kind == 0:
            _, at = _read_varint(data, at)
        elif kind == 1:
            at += 8
        elif kind == 5:
            at += 4
        elif kind == 2:
            length, at = _read_varint(data, at)
            if tag >> 3 == _CHUNK_DATA:
                if at + length > len(data):
                    raise WireError("a truncated chunk message")
                payload = data[at:at + length]
                at += length
                continue
            at += length
        else:
            raise WireError("a malformed chunk message")
        if at > len(data):
            raise WireError("a truncated chunk message")
        rest.append(data[start:at])
    return b"".join(rest), payload


class ReceivedChunk:
    """An UpdateChunk as received: the message without the tensor's payload (parsed by
    protobuf), and the payload as a view of the bytes gRPC handed over, so the only copy
    is the assembler's, into the tensor's storage. `TensorAssembler.add` takes it."""

    __slots__ = ("data", "message")

    def __init__(self, message: pb.UpdateChunk, data: memoryview | None) -> None:
        self.message, self.data = message, data

    def HasField(self, name: str) -> bool:
        return self.message.HasField(name)

    @property
    def header(self) -> pb.UpdateHeader:
        return self.message.header

    @property
    def tensor(self) -> pb.TensorChunk:
        return self.message.tensor


def parse_update_chunk(encoded: bytes) -> ReceivedChunk:
    """A gRPC deserializer for SubmitUpdate: `UpdateChunk.FromString` without copying a
    tensor chunk's payload (twice: into the message, then out as a bytes object)."""
    data = memoryview(encoded)
    if data[:1] != _UPDATE_TAG:  # a header (or anything else): protobuf parses it all
        return ReceivedChunk(pb.UpdateChunk.FromString(encoded), None)
    length, at = _read_varint(data, 1)
    if at + length != len(data):  # more fields than the tensor: leave it to protobuf
        return ReceivedChunk(pb.UpdateChunk.FromString(encoded), None)
    rest, payload = _split_data(data[at:])
    message = pb.UpdateChunk()
    try:
        message.tensor.ParseFromString(rest)
    except DecodeError as error:
        raise WireError(f"a malformed tensor chunk: {error}") from None
    return ReceivedChunk(message, payload)


_UPDATE_TAG = _varint(_UPDATE_TENSOR << 3 | 2)


class ReceivedTensor:
    """A TensorChunk as received (what GetModel streams): its fields but `data` parsed by
    protobuf, and `data` as a view of the bytes gRPC handed over. `TensorAssembler.add`
    takes it."""

    __slots__ = ("data", "nbytes", "tensor")

    def __init__(self, tensor: pb.TensorChunk, data: memoryview | None, nbytes: int) -> None:
        self.tensor, self.data, self.nbytes = tensor, data, nbytes

    @property
    def model_version(self) -> int:
        return self.tensor.model_version


def parse_tensor_chunk(encoded: bytes) -> ReceivedTensor:
    """A gRPC deserializer for GetModel: `TensorChunk.FromString` without copying the
    payload into the message and out again; `nbytes` is the message's encoded size."""
    rest, payload = _split_data(memoryview(encoded))
    tensor = pb.TensorChunk()
    try:
        tensor.ParseFromString(rest)
    except DecodeError as error:
        raise WireError(f"a malformed tensor chunk: {error}") from None
    return ReceivedTensor(tensor, payload, len(encoded))


def serialize(message: bytes | pb.TensorChunk | pb.UpdateChunk) -> bytes:
    """A gRPC serializer for streams of `serialized_*` chunks mixed with messages."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def _fill(chunk: pb.TensorChunk, piece: tuple[str, list[int], str, int, bytes],
          model_version: int) -> None:
    chunk.name, shape, chunk.dtype, chunk.offset, chunk.data = piece
    chunk.shape.extend(shape)
    chunk.model_version = model_version


def to_chunks(
    weights: Mapping[str, torch.Tensor],
    *,
    model_version: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[pb.TensorChunk]:
    """Each tensor as one or more chunks, in the mapping's order (what GetModel sends)."""
    for piece in _pieces(weights, chunk_bytes):
        chunk = pb.TensorChunk()
        _fill(chunk, piece, model_version)
        yield chunk


def to_update_chunks(
    weights: Mapping[str, torch.Tensor],
    *,
    model_version: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[pb.UpdateChunk]:
    """The chunks of `to_chunks`, each inside the UpdateChunk that SubmitUpdate takes.

    Built in place: `UpdateChunk(tensor=chunk)` merges the chunk field by field, which
    upb does at about 0.1-0.25 GB/s and which made it the slowest step of an upload.
    """
    for piece in _pieces(weights, chunk_bytes):
        part = pb.UpdateChunk()
        _fill(part.tensor, piece, model_version)
        yield part


def to_compressed_update_chunks(
    parts: Mapping[str, torch.Tensor | EncodedTensor],
    *,
    model_version: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[pb.UpdateChunk]:
    """An update whose tensors are raw (as `to_update_chunks`) or encoded: an encoding's
    payload travels in pieces of `chunk_bytes`, each carrying the TensorEncoding."""
    for name, part in parts.items():
        if isinstance(part, torch.Tensor):
            for piece in _pieces({name: part}, chunk_bytes):
                chunk = pb.UpdateChunk()
                _fill(chunk.tensor, piece, model_version)
                yield chunk
            continue
        payload = memoryview(part.payload)
        for start in range(0, max(len(payload), 1), chunk_bytes):
            chunk = pb.UpdateChunk()
            tensor = chunk.tensor
            tensor.name, tensor.dtype, tensor.offset = name, "float32", start
            tensor.shape.extend(part.shape)
            tensor.model_version = model_version
            tensor.data = bytes(payload[start:start + chunk_bytes])
            encoding = tensor.encoding
            encoding.count, encoding.sparse, encoding.bits = part.count, part.sparse, part.bits
            encoding.block, encoding.lossless, encoding.size = (
                part.block, part.lossless, len(payload))
            yield chunk


def encoded_size(weights: Mapping[str, torch.Tensor]) -> int:
    """Payload bytes `to_chunks` sends for these weights."""
    return sum(t.numel() * t.element_size() for t in weights.values())


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in a floating-point tensor, in one read of its memory.

    A sum is NaN or infinite whenever any element is, so a finite sum proves every
    element finite without the boolean tensor `isfinite` builds. Only a non-finite sum
    (which finite values can also give, by overflow) pays for the element-wise check.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


class _Incoming:
    """One tensor being received: its preallocated storage and how much has arrived."""

    def __init__(self, spec: TensorSpec, pool: BufferPool | None) -> None:
        self.spec = spec
        self.storage = (torch.empty(spec.nbytes, dtype=torch.uint8) if pool is None
                        else torch.from_numpy(pool.take(spec.nbytes)))
        self.view = memoryview(self.storage.numpy())  # chunks are written through this
        self.filled = 0

    def tensor(self) -> torch.Tensor:
        """The received bytes as the expected dtype and shape, sharing their memory."""
        return self.storage.view(_DTYPES[self.spec.dtype]).reshape(self.spec.shape)


class _Encoded:
    """One encoded tensor being received: its encoding and payload so far."""

    def __init__(self, encoding: pb.TensorEncoding) -> None:
        self.encoding = pb.TensorEncoding()
        self.encoding.CopyFrom(encoding)  # not a view that keeps the whole chunk alive
        self.payload = bytearray(encoding.size)
        self.filled = 0


class TensorAssembler:
    """Rebuilds tensors from chunks, checking each against the expected schema.

    Holds one model's worth of bytes at most. `finish()` returns the tensors only if
    every expected tensor arrived complete and finite; otherwise it raises WireError.
    With `pool`, raw tensors are received into its reused buffers (already mapped)
    instead of fresh memory.
    """

    def __init__(self, schema: Schema, *, max_bytes: int | None = None,
                 pool: BufferPool | None = None) -> None:
        self._schema = schema
        self._pool = pool
        self._max_bytes = max_bytes if max_bytes is not None else sum(
            s.nbytes for s in schema.values())
        self._incoming: dict[str, _Incoming] = {}
        self._encoded: dict[str, _Encoded] = {}
        self._received = 0

    @property
    def bytes_received(self) -> int:
        return self._received

    def add(self, chunk: pb.TensorChunk | ReceivedChunk | ReceivedTensor) -> None:
        """One chunk: a TensorChunk, or a `ReceivedChunk` / `ReceivedTensor` whose
        payload is a view of the received bytes."""
        if isinstance(chunk, (ReceivedChunk, ReceivedTensor)):
            data = chunk.data
            chunk = chunk.tensor
            if data is None:
                data = chunk.data
        else:
            data = chunk.data
        if chunk.HasField("encoding"):
            self._add_encoded(chunk, data)
            return
        if chunk.name in self._encoded:
            raise WireError(f"tensor {chunk.name!r}: raw chunk after encoded ones")
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
        self._received += len(data)
        if self._received > self._max_bytes:
            raise WireError(f"update exceeds {self._max_bytes} bytes", RejectReason.OVERSIZE)
        incoming = self._incoming.get(chunk.name)
        if incoming is None:
            incoming = self._incoming[chunk.name] = _Incoming(expected, self._pool)
        itemsize = _DTYPES[expected.dtype].itemsize
        if chunk.offset * itemsize != incoming.filled:
            raise WireError(
                f"tensor {chunk.name!r}: chunk at element {chunk.offset} out of order")
        end = incoming.filled + len(data)
        if end > expected.nbytes:
            raise WireError(
                f"tensor {chunk.name!r}: {end} bytes, expected {expected.nbytes}")
        incoming.view[incoming.filled:end] = data  # the one copy out of the message
        incoming.filled = end

    def _add_encoded(self, chunk: pb.TensorChunk, data: bytes | memoryview) -> None:
        name = chunk.name
        expected = self._schema.get(name)
        if expected is None:
            raise WireError(f"unexpected tensor {name!r}", RejectReason.BAD_SHAPE)
        if tuple(chunk.shape) != expected.shape:
            raise WireError(
                f"tensor {name!r}: shape {tuple(chunk.shape)} != expected {expected.shape}",
                RejectReason.BAD_SHAPE)
        if expected.dtype != "float32" or chunk.dtype != "float32":
            raise WireError(f"tensor {name!r}: only float32 tensors travel encoded",
                            RejectReason.BAD_SHAPE)
        if name in self._incoming:
            raise WireError(f"tensor {name!r}: encoded chunk after raw ones")
        encoding = chunk.encoding
        self._received += len(data)
        if self._received > self._max_bytes:
            raise WireError(f"update exceeds {self._max_bytes} bytes", RejectReason.OVERSIZE)
        incoming = self._encoded.get(name)
        if incoming is None:
            if not 0 <= encoding.size <= self._max_bytes:
                raise WireError(f"tensor {name!r}: encoding of {encoding.size} bytes exceeds "
                                f"the update's {self._max_bytes}", RejectReason.OVERSIZE)
            incoming = self._encoded[name] = _Encoded(encoding)
        elif encoding != incoming.encoding:
            raise WireError(f"tensor {name!r}: encoding changed between chunks")
        if chunk.offset != incoming.filled:
            raise WireError(f"tensor {name!r}: chunk at byte {chunk.offset} out of order")
        end = incoming.filled + len(data)
        if end > encoding.size:
            raise WireError(f"tensor {name!r}: {end} bytes, its encoding has {encoding.size}")
        incoming.payload[incoming.filled:end] = data
        incoming.filled = end

    def finish(self) -> Mapping[str, torch.Tensor]:
        """The tensors, in schema order, sharing the memory the chunks were written to.

        When some arrived encoded, a `DecodedUpdate`: each encoding was checked here, and
        is decoded whenever a tensor is read, never all at once."""
        if self._encoded:
            return self._finish_encoded()
        return self._finish_raw()

    def _finish_encoded(self) -> Mapping[str, torch.Tensor]:
        raw_names = {name for name in self._schema if name in self._incoming}
        raw = self._finish_raw(only=raw_names)
        parts: dict[str, torch.Tensor | EncodedTensor] = {}
        for name, spec in self._schema.items():
            if name in raw:
                parts[name] = raw[name]
                continue
            incoming = self._encoded[name]
            if incoming.filled != incoming.encoding.size:
                raise WireError(f"tensor {name!r}: {incoming.filled} bytes, its encoding has "
                                f"{incoming.encoding.size}")
            e = incoming.encoding
            parts[name] = EncodedTensor(
                shape=spec.shape, count=e.count, sparse=e.sparse, bits=e.bits, block=e.block,
                lossless=e.lossless or "none",  # type: ignore[arg-type]
                payload=bytes(incoming.payload))
        self._encoded.clear()
        try:
            return DecodedUpdate(parts, {n: s.shape for n, s in self._schema.items()})
        except EncodingError as error:
            reason = (RejectReason.NON_FINITE if "NaN" in str(error)
                      else RejectReason.MALFORMED)
            raise WireError(str(error), reason) from None

    def _finish_raw(self, only: set[str] | None = None) -> dict[str, torch.Tensor]:
        schema = self._schema if only is None else {
            n: s for n, s in self._schema.items() if n in only or n not in self._encoded}
        missing = [name for name in schema if name not in self._incoming]
        if missing:
            raise WireError(f"missing tensors: {', '.join(missing)}", RejectReason.BAD_SHAPE)
        tensors: dict[str, torch.Tensor] = {}
        for name, spec in schema.items():
            incoming = self._incoming[name]
            if incoming.filled != spec.nbytes:
                raise WireError(
                    f"tensor {name!r}: {incoming.filled} bytes, expected {spec.nbytes}")
            if spec.dtype == "bool" and bool((incoming.storage > 1).any()):
                raise WireError(f"tensor {name!r}: bool values other than 0 and 1")
            tensor = incoming.tensor()
            if not _all_finite(tensor):
                raise WireError(f"tensor {name!r} holds NaN or Inf", RejectReason.NON_FINITE)
            tensors[name] = tensor
        self._incoming.clear()
        return tensors


def from_chunks(chunks: Iterable[pb.TensorChunk], schema: Schema) -> Mapping[str, torch.Tensor]:
    """Assemble a whole message stream (the receiving side of `to_chunks`)."""
    assembler = TensorAssembler(schema)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()
