"""Compression adaptive to the link: from the finest setting to the coarsest the job
allows, the first whose upload would take no longer than the target at the throughput
the client measured on its last upload (the coarsest allowed when none would, and before
anything was measured: a metered link is not spent on a guess)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

from .codec import BITS, CompressionConfig, raw_size

TOP_K_STEPS = (0.5, 0.25, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)


def ladder(coarsest: CompressionConfig) -> list[CompressionConfig]:
    """Settings from fp32 to `coarsest`, each sending fewer bytes than the one before:
    dense values at 32 bits down to coarsest.bits, then top-k fractions down to
    coarsest.top_k at coarsest.bits. Error feedback and lossless as in `coarsest`."""
    base = dataclasses.replace(coarsest, top_k=None)
    steps = [dataclasses.replace(base, bits=bits) for bits in BITS if bits >= coarsest.bits]
    if coarsest.top_k is not None:
        fractions = [f for f in TOP_K_STEPS if f > coarsest.top_k] + [coarsest.top_k]
        steps += [dataclasses.replace(base, bits=coarsest.bits, top_k=f) for f in fractions]
    # Indices cost 4 bytes an entry: keep only the fractions that send less than the
    # step before them (at 8 bits, top-k pays off below 20%).
    kept: list[CompressionConfig] = []
    for step in steps:
        if not kept or (estimated_bytes(step, [_TYPICAL]) < estimated_bytes(kept[-1], [_TYPICAL])
                        or step == coarsest):
            kept.append(step)
    return kept


_TYPICAL = 1 << 20  # elements of a typical tensor, for ordering the ladder


def estimated_bytes(config: CompressionConfig, sizes: Iterable[int]) -> int:
    """Upload bytes of an update whose float32 tensors have `sizes` elements (before any
    lossless framing, which only makes it smaller)."""
    total = 0
    for n in sizes:
        sparse = config.top_k is not None
        count = min(n, max(1, math.ceil(config.top_k * n))) if sparse and n else n
        total += min(4 * n, raw_size(count=count, sparse=sparse, bits=config.bits,
                                     block=config.block))
    return total


def choose(coarsest: CompressionConfig, *, sizes: list[int], bytes_per_second: float,
           target_seconds: float) -> CompressionConfig:
    """The finest setting of `ladder(coarsest)` expected to upload within `target_seconds`
    at `bytes_per_second`; `coarsest` when none is, or when nothing was measured yet."""
    if not (bytes_per_second > 0 and math.isfinite(bytes_per_second)):
        return coarsest
    budget = bytes_per_second * target_seconds
    for config in ladder(coarsest):
        if estimated_bytes(config, sizes) <= budget:
            return config
    return coarsest
