"""One secure round between real `SecAggClient`s and a real `SecAggServer` in one process,
messages passed by hand, with clients dropping out at chosen phases. For tests, the
benchmark and anyone checking the protocol without a network."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .client import SecAggClient
from .messages import Phase
from .server import SecAggConfig, SecAggResult, SecAggServer


def dither_rng(seed: int, node: str) -> np.random.Generator:
    """The stochastic-rounding randomness `run_round` gives `node` (reproducible)."""
    return np.random.default_rng([seed, *node.encode()])


def run_round(updates: Mapping[str, np.ndarray], *, config: SecAggConfig, round: int = 1,
              seed: int = 0, drop_before: Mapping[str, Phase] | None = None) -> SecAggResult:
    """The result of a round in which client `n` leaves just before phase
    `drop_before[n]` (ADVERTISE: never shows up; UNMASK: sends its masked input, then
    vanishes). Raises RoundFailed like the coordinator would."""
    drop_before = dict(drop_before or {})
    length = next(iter(updates.values())).size

    def present(node: str, phase: Phase) -> bool:
        order = list(Phase)
        leaves = drop_before.get(node)
        return leaves is None or order.index(phase) < order.index(leaves)

    server = SecAggServer(round=round, selected=updates, length=length, config=config,
                          seed=seed)
    clients = {n: SecAggClient(n, round, quantize_bits=config.quantize_bits) for n in updates}
    for node, client in clients.items():
        if present(node, Phase.ADVERTISE):
            server.receive_advert(client.advertise())
    rosters = server.close_advertising()
    for node, roster in rosters.items():
        if present(node, Phase.SHARE):
            server.receive_shares(clients[node].share(roster))
    deliveries = server.close_sharing()
    for node, delivery in deliveries.items():
        if present(node, Phase.MASKED_INPUT):
            server.receive_masked(clients[node].mask(delivery, updates[node],
                                                     rng=dither_rng(seed, node)))
    requests = server.close_masking()
    for node, request in requests.items():
        if present(node, Phase.UNMASK):
            server.receive_unmask(clients[node].unmask(request))
    return server.finish()
