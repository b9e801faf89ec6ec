"""Shamir t-of-k secret sharing (Shamir 1979) of 32-byte secrets over the prime field
GF(2^521 - 1).

Why not a library: pycryptodome's `Shamir` (the well-kept one on PyPI) shares 16-byte
blocks over GF(2^128) in pure Python and takes about 10 ms per block to combine ten
shares here; the coordinator reconstructs one or two 32-byte secrets per client per
round, so at 100 clients that alone is seconds, several times a plain round. Python's
native big integers modulo the Mersenne prime 2^521 - 1 do the same interpolation in
tens of microseconds, and a 32-byte secret fits in one field element. The maths is the
textbook one: a random polynomial of degree t - 1 with the secret as constant term,
evaluated at 1..k; Lagrange interpolation at 0 from any t points.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from functools import lru_cache

PRIME = 2**521 - 1  # a Mersenne prime, larger than any 32-byte secret
SHARE_BYTES = 66  # ceil(521 / 8)
SECRET_BYTES = 32


class ShareError(ValueError):
    """Shares that cannot reconstruct: too few, malformed, or out of the field."""


def split(secret: bytes, *, threshold: int, holders: int) -> list[tuple[int, bytes]]:
    """`holders` shares (index 1..holders) of a 32-byte secret; any `threshold` of them
    reconstruct it, and fewer reveal nothing about it."""
    if len(secret) != SECRET_BYTES:
        raise ShareError(f"a secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= holders:
        raise ShareError(f"threshold must be in [1, {holders}], got {threshold}")
    coefficients = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, holders + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y.to_bytes(SHARE_BYTES, "big")))
    return shares


@lru_cache(maxsize=4096)
def _lagrange_at_zero(indices: tuple[int, ...]) -> tuple[int, ...]:
    """The Lagrange basis at 0 for these x's (cached: one round uses few index sets)."""
    weights = []
    for i in indices:
        numerator, denominator = 1, 1
        for j in indices:
            if j != i:
                numerator = numerator * j % PRIME
                denominator = denominator * (j - i) % PRIME
        weights.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return tuple(weights)


def combine(shares: Sequence[tuple[int, bytes]], *, threshold: int) -> bytes:
    """The secret from `threshold` of `shares` (the lowest indices). Shares from a
    different polynomial give a different value: callers check the result against a
    commitment (`SecAggServer` does)."""
    points: dict[int, int] = {}
    for index, share in shares:
        if not (isinstance(index, int) and index >= 1) or len(share) != SHARE_BYTES:
            raise ShareError(f"malformed share at index {index!r}")
        value = int.from_bytes(share, "big")
        if value >= PRIME:
            raise ShareError(f"share at index {index} lies outside the field")
        points[index] = value
    if len(points) < threshold:
        raise ShareError(f"{len(points)} distinct shares cannot reconstruct a "
                         f"{threshold}-of-k secret")
    chosen = tuple(sorted(points)[:threshold])
    secret = sum(w * points[i] for w, i in zip(_lagrange_at_zero(chosen), chosen,
                                               strict=True)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ShareError("the shares interpolate to no 32-byte secret (inconsistent shares)")
    return secret.to_bytes(SECRET_BYTES, "big")
