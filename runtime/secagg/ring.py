"""Fixed-point encoding of updates into the ring Z_2^32, where masks cancel exactly.

Each coordinate is clipped to [-value_range, value_range], scaled by `scale` and rounded to
the nearest integer, then read modulo 2^32 (two's complement). `scale` is the largest that
keeps the sum of `clients` such values inside the signed range, so decoding the masked sum
is exact: decode(sum of encodings) == sum of the rounded values / scale, with no wrap.
Quantization composes here: this *is* the quantization step of a secure round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .primitives import RING

RING_BITS = 32


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

    @property
    def resolution(self) -> float:
        """The rounding error bound of one coordinate of one client: half a unit."""
        return 0.5 / self.scale

    def encode(self, values: np.ndarray) -> np.ndarray:
        """A float vector as ring elements (clipped, scaled, rounded)."""
        flat = np.asarray(values, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(flat)):
            raise ValueError("an update with NaN or infinite entries cannot be encoded")
        clipped = np.clip(flat, -self.value_range, self.value_range)
        return np.rint(clipped * self.scale).astype(np.int64).astype(RING)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The float64 sum of the clients' values from the unmasked ring sum."""
        ring = np.asarray(total)
        if ring.dtype != RING:
            raise ValueError(f"a ring sum must be {np.dtype(RING).name}, got {ring.dtype}")
        return ring.view(np.int32).astype(np.float64) / self.scale
