"""The only code besides `proto/` that knows protobuf.

- `tensors`: tensors split into chunks under gRPC's message limit and reassembled with
  every check the coordinator relies on.
- `buffers`: reused destinations for received tensors (no fresh pages per transfer).
- `convert`: every translation between protobuf messages and the domain types that the
  coordinator and the agent work with.
- `downlink`: the global model on GetModel's wire with tensors as deltas from the
  version the agent holds.
"""

from .buffers import BufferPool
from .downlink import ModelAssembler, serialized_model_chunks
from .tensors import (
    CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    ReceivedChunk,
    ReceivedTensor,
    Schema,
    TensorAssembler,
    TensorSpec,
    WireError,
    dtype_name,
    encoded_size,
    from_chunks,
    parse_tensor_chunk,
    parse_update_chunk,
    schema_of,
    serialize,
    serialized_chunks,
    serialized_update_chunks,
    to_chunks,
    to_compressed_update_chunks,
    to_update_chunks,
)

__all__ = [
    "CHUNK_BYTES",
    "MAX_MESSAGE_BYTES",
    "BufferPool",
    "ModelAssembler",
    "ReceivedChunk",
    "ReceivedTensor",
    "Schema",
    "TensorAssembler",
    "TensorSpec",
    "WireError",
    "dtype_name",
    "encoded_size",
    "from_chunks",
    "parse_tensor_chunk",
    "parse_update_chunk",
    "schema_of",
    "serialize",
    "serialized_chunks",
    "serialized_model_chunks",
    "serialized_update_chunks",
    "to_chunks",
    "to_compressed_update_chunks",
    "to_update_chunks",
]
