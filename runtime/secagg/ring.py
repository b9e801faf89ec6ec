"""Fixed-point encodings of updates into a ring Z_2^b, where masks cancel exactly.

Each coordinate is clipped to [-value_range, value_range], scaled by `scale` and rounded to
the nearest integer, then read modulo 2^32 (two's complement). `scale` is the largest that
keeps the sum of `clients` such values inside the signed range, so decoding the masked sum
is exact: decode(sum of encodings) == sum of the rounded values / scale, with no wrap.
`Quantized` is the other encoding: stochastic `bits`-bit codes in the smallest ring that
holds their sum (compression.quantizeBits under secure aggregation). Masks are drawn in
Z_2^32 and reduced mod 2^b, which stays uniform since 2^b divides 2^32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .primitives import RING

RING_BITS = 32


def _finite_vector(values: np.ndarray) -> np.ndarray:
    """`values` as one float64 vector; ValueError when any entry is NaN or infinite."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(flat)):
        raise ValueError("an update with NaN or infinite entries cannot be encoded")
    return flat


@dataclass(frozen=True)
class FixedPoint:
    """The encoding shared by every client of a round and the coordinator."""

    value_range: float
    clients: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.value_range) and self.value_range > 0):
            raise ValueError(f"value_range must be finite and > 0, got {self.value_range!r}")
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients!r}")
        if self.scale < 1:
            raise ValueError(
                f"a {RING_BITS}-bit ring cannot hold the sum of {self.clients} values in "
                f"±{self.value_range} with any precision: lower valueRange")

    @property
    def scale(self) -> float:
        """Units per 1.0: the sum of `clients` values of magnitude <= value_range stays
        below 2^31 in magnitude."""
        return math.floor((2 ** (RING_BITS - 1) - 1) / (self.clients * self.value_range))

    ring_bits = RING_BITS  # the whole ring Z_2^32
    width = 4  # bytes per coordinate on the wire

    @property
    def resolution(self) -> float:
        """The rounding error bound of one coordinate of one client: half a unit."""
        return 0.5 / self.scale

    def encode(self, values: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """A float vector as ring elements (clipped, scaled, rounded; `rng` unused)."""
        flat = _finite_vector(values)
        clipped = np.clip(flat, -self.value_range, self.value_range)
        return np.rint(clipped * self.scale).astype(np.int64).astype(RING)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The float64 sum of the clients' values from the unmasked ring sum."""
        ring = np.asarray(total)
        if ring.dtype != RING:
            raise ValueError(f"a ring sum must be {np.dtype(RING).name}, got {ring.dtype}")
        return ring.view(np.int32).astype(np.float64) / self.scale


@dataclass(frozen=True)
class Quantized:
    """Unbiased stochastic quantization to `bits`-bit integer codes as the fixed-point step
    of a secure round (spec.compression.quantizeBits under secure aggregation).

    Every client of the round and the coordinator share one scale, levels / value_range
    (levels = 2^(bits-1) - 1), so the sum of codes is decodable. A coordinate x, clipped to
    ±value_range, becomes floor(x*scale) or that plus one, with the probability that makes
    its expectation x*scale. The sum of `clients` codes lies in ±clients*levels, so the ring
    is Z_2^b with b = ceil(log2(2*clients*levels + 1)) (at most 32), and a masked vector on
    the wire takes ceil(b/8) bytes per coordinate instead of 4.
    """

    value_range: float
    clients: int
    bits: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.value_range) and self.value_range > 0):
            raise ValueError(f"value_range must be finite and > 0, got {self.value_range!r}")
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients!r}")
        if self.bits not in (2, 4, 8, 16):
            raise ValueError(f"bits must be 2, 4, 8 or 16, got {self.bits!r}")
        if self.ring_bits > RING_BITS:
            raise ValueError(
                f"the sum of {self.clients} {self.bits}-bit codes needs a {self.ring_bits}-bit "
                f"ring, more than {RING_BITS}: lower quantizeBits or the number of clients")

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def scale(self) -> float:
        return self.levels / self.value_range

    @property
    def ring_bits(self) -> int:
        return max(2, math.ceil(math.log2(2 * self.clients * self.levels + 1)))

    @property
    def width(self) -> int:
        return -(-self.ring_bits // 8)

    @property
    def resolution(self) -> float:
        """The quantization error bound of one coordinate of one client: one step."""
        return 1.0 / self.scale

    def encode(self, values: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Codes of a float vector as ring elements of Z_2^ring_bits (held in uint32)."""
        flat = _finite_vector(values)
        rng = rng if rng is not None else np.random.default_rng()
        scaled = np.clip(flat, -self.value_range, self.value_range) * self.scale
        low = np.floor(scaled)
        codes = low + (rng.random(flat.size) < scaled - low)
        codes = np.clip(codes, -self.levels, self.levels)
        return reduce(codes.astype(np.int64).astype(RING), self.ring_bits)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        """The float values of ring elements (one client's codes, or a sum of them)."""
        ring = np.asarray(codes)
        if ring.dtype != RING:
            raise ValueError(f"ring elements must be {np.dtype(RING).name}, got {ring.dtype}")
        shift = RING(RING_BITS - self.ring_bits)  # sign-extend the r-bit two's complement
        signed = (ring << shift).view(np.int32) >> np.int32(shift)
        return signed.astype(np.float64) / self.scale

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The float64 sum of the clients' values from the unmasked ring sum."""
        return self.dequantize(total)


Encoding = FixedPoint | Quantized


def encoding_for(value_range: float, clients: int, bits: int = 32) -> Encoding:
    """The encoding of a round: 32-bit fixed point, or `bits`-bit stochastic quantization."""
    if bits == 32:
        return FixedPoint(value_range, clients)
    return Quantized(value_range, clients, bits)


def reduce(vector: np.ndarray, ring_bits: int) -> np.ndarray:
    """`vector` (uint32, read mod 2^32) reduced in place to Z_2^ring_bits."""
    if ring_bits < RING_BITS:
        np.bitwise_and(vector, RING((1 << ring_bits) - 1), out=vector)
    return vector


def to_wire(vector: np.ndarray, width: int) -> np.ndarray:
    """The low `width` bytes of each ring element, little-endian, as one uint8 array."""
    if width in (1, 2, 4):
        return np.ascontiguousarray(vector, dtype="<u4").astype(f"<u{width}").view(np.uint8)
    data = np.ascontiguousarray(vector, dtype="<u4").view(np.uint8).reshape(-1, 4)
    return np.ascontiguousarray(data[:, :width]).reshape(-1)


def from_wire(data: np.ndarray, width: int, length: int) -> np.ndarray:
    """Ring elements (uint32) from `to_wire`'s bytes; ValueError for the wrong length."""
    raw = np.asarray(data, dtype=np.uint8).reshape(-1)
    if raw.size != width * length:
        raise ValueError(f"a masked input of {raw.size} bytes is not {length} ring elements "
                         f"of {width} bytes")
    if width in (1, 2, 4):  # whole little-endian words: one widening copy
        return raw.view(f"<u{width}").astype(RING)
    bytes_ = raw.reshape(length, width)
    out = bytes_[:, 0].astype(RING)
    for index in range(1, width):
        out |= bytes_[:, index].astype(RING) << RING(8 * index)
    return out
