"""The global model as an exact delta from the version a client already holds.

Consecutive global models differ little: most entries keep their sign, exponent and high
mantissa bits. The delta here is the bitwise XOR of the two versions' bytes, byte-shuffled
(all first bytes of the elements, then all second bytes, ... as Blosc's shuffle filter
does) so the unchanged high bytes form long runs of zeros, then framed with zstd or lz4.
Applying it XORs the same bytes back: the client reproduces the new version bit for bit
(any dtype, NaN payloads and signed zeros included), which is what a Flower user expects
of a model download. An arithmetic delta (new - old in float32) would not be exact.

Each delta carries the CRC-32 of the version it leads to, so a delta applied to any
other base, or corrupted on the way, is refused instead of yielding a wrong model.

Pure functions on tensors; no protocol types. A malformed delta raises `EncodingError`.
GetModel sends these under spec.compression.downlink delta (coordinator/downlink.py).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .codec import EncodingError, Lossless, frame, unframe


@dataclass(frozen=True)
class ModelDelta:
    """One tensor's change between two versions: `payload` is the framed, shuffled XOR
    of their bytes (`lossless` says the framing; "none" when framing did not help),
    `checksum` the CRC-32 of the new version's bytes."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    lossless: Lossless
    payload: bytes
    checksum: int

    @property
    def nbytes(self) -> int:
        return len(self.payload)


def _bytes_of(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's elements as a flat uint8 array (a view where it can be)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, dtype=np.uint8)


def delta_of(old: torch.Tensor, new: torch.Tensor, *, lossless: Lossless = "zstd"
             ) -> ModelDelta:
    """The exact delta that turns `old` into `new` (same shape and dtype)."""
    if old.shape != new.shape or old.dtype != new.dtype:
        raise ValueError(f"delta between {old.dtype}{tuple(old.shape)} and "
                         f"{new.dtype}{tuple(new.shape)}: shapes and dtypes must match")
    width = new.element_size()
    target = _bytes_of(new)
    xor = np.bitwise_xor(_bytes_of(old), target)
    shuffled = xor.reshape(-1, width).T.tobytes()  # byte plane by byte plane
    payload = frame(shuffled, lossless)
    if lossless != "none" and len(payload) >= len(shuffled):
        payload, lossless = shuffled, "none"
    return ModelDelta(shape=tuple(new.shape), dtype=new.dtype, lossless=lossless,
                      payload=payload, checksum=zlib.crc32(target))


def apply_delta(old: torch.Tensor, delta: ModelDelta) -> torch.Tensor:
    """The version `delta` leads to from `old`, as a new tensor. Raises EncodingError
    when `delta` does not fit `old`, its payload is not the size it must be, or the
    result is not the version the delta was made for (its checksum differs)."""
    if tuple(old.shape) != delta.shape or old.dtype != delta.dtype:
        raise EncodingError(f"delta for {delta.dtype}{delta.shape} applied to "
                            f"{old.dtype}{tuple(old.shape)}")
    width = old.element_size()
    base = _bytes_of(old)
    shuffled = unframe(delta.payload, delta.lossless, expected=len(base))
    xor = np.frombuffer(shuffled, dtype=np.uint8).reshape(width, -1).T
    out = np.bitwise_xor(base.reshape(-1, width), xor).reshape(-1)
    if zlib.crc32(out) != delta.checksum:
        raise EncodingError("the delta does not lead to the version it was made for "
                            "(checksum mismatch): a corrupted delta, or another base")
    if not len(out):
        return torch.empty(old.shape, dtype=old.dtype)
    return torch.from_numpy(out.copy()).view(old.dtype).reshape(old.shape)


def model_delta(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], *,
                lossless: Lossless = "zstd") -> dict[str, ModelDelta]:
    """Tensor by tensor, in `new`'s order; both models must have the same tensors."""
    if list(old) != list(new):
        raise ValueError(f"the versions hold different tensors: {sorted(set(old) ^ set(new))}")
    return {name: delta_of(old[name], tensor, lossless=lossless)
            for name, tensor in new.items()}


def apply_model_delta(old: Mapping[str, torch.Tensor], delta: Mapping[str, ModelDelta]
                      ) -> dict[str, torch.Tensor]:
    if list(old) != list(delta):
        raise EncodingError(f"delta names other tensors than the model held: "
                            f"{sorted(set(old) ^ set(delta))}")
    out = {}
    for name, part in delta.items():
        try:
            out[name] = apply_delta(old[name], part)
        except EncodingError as error:
            raise EncodingError(f"tensor {name!r}: {error}") from None
    return out
