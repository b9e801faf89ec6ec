"""Suspicion: each client's anomaly scores (aggregation/anomaly.py, computed as its
updates are folded) folded into one exponentially weighted number per client, kept in
its registry record (`Client.suspicion`) and published on its ClientNode."""

from __future__ import annotations

from collections.abc import Mapping

from ..messages import RejectReason
from .registry import ClientRegistry

SCORED_REFUSALS: frozenset[RejectReason] = frozenset({RejectReason.NORM_BOUND})
"""Refusals that count as an outlying update (score 1): admission's norm bound refuses
an update many times the round's median norm before any rule or score sees it, so
without this a scaling attacker under the default admission would never be suspected."""


def refusal_score(reason: RejectReason) -> float | None:
    """The anomaly score a refusal of `reason` stands for, if it stands for one."""
    return 1.0 if reason in SCORED_REFUSALS else None


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
