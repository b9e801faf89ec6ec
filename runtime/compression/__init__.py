"""Compressed updates: top-k with error feedback, stochastic quantization, lossless
framing, and the choice of setting for a link. Pure functions on tensors; the wire maps
`EncodedTensor` to protobuf, the agent keeps the residual, the coordinator folds a
`DecodedUpdate`."""

from .codec import (
    BITS,
    LOSSLESS,
    CompressionConfig,
    EncodedTensor,
    EncodingError,
    decode,
    encode,
    parse,
    raw_size,
)
from .decoded import DecodedUpdate
from .feedback import CompressedUpdate, compress_update, decode_update

__all__ = [
    "BITS",
    "LOSSLESS",
    "CompressedUpdate",
    "CompressionConfig",
    "DecodedUpdate",
    "EncodedTensor",
    "EncodingError",
    "compress_update",
    "decode",
    "decode_update",
    "encode",
    "parse",
    "raw_size",
]
