"""The simulated link of one simulated client (spec.simulation.network): fixed, or drawn
per client from a log-normal spread around the given bandwidths, deterministically from
the job's seed and the client's index."""

from __future__ import annotations

import math
import random

from ..spec import NetworkSpec
from .client import LinkLimits


def link_for(network: NetworkSpec, *, seed: int, index: int) -> LinkLimits:
    rng = random.Random(seed * 1_000_003 + index)
    factor = math.exp(rng.gauss(0.0, network.spread)) if network.spread else 1.0

    def bits(mbps: float | None) -> float | None:
        return None if mbps is None else mbps * 1e6 * factor

    return LinkLimits(uplink_bits_per_second=bits(network.uplink_mbps),
                      downlink_bits_per_second=bits(network.downlink_mbps),
                      latency_seconds=network.latency_ms / 1000.0)
