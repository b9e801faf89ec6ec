"""Suspicion: each client's anomaly scores (aggregation/anomaly.py, computed as its
updates are folded) folded into one exponentially weighted number per client, kept in
its registry record (`Client.suspicion`) and published on its ClientNode."""

from __future__ import annotations

from collections.abc import Mapping

from .registry import ClientRegistry


def fold_scores(registry: ClientRegistry, scores: Mapping[str, float], *, decay: float
                ) -> dict[str, float]:
    """suspicion <- (1 - decay) x suspicion + decay x score, for each scored client still
    registered; returns the new suspicions. Starts from 0, so one outlying round of a
    new client gives it `decay`."""
    if not 0 < decay <= 1:
        raise ValueError(f"suspicion decay must be in (0, 1], got {decay!r}")
    updated = {}
    for node_id, score in scores.items():
        client = registry.get(node_id)
        if client is None:
            continue
        client.suspicion = (1 - decay) * client.suspicion + decay * min(1.0, max(0.0, score))
        client.scored += 1
        updated[node_id] = client.suspicion
    return updated
