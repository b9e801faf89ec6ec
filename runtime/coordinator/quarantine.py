"""Quarantine: a client whose suspicion reaches robustness.quarantineThreshold sits out
robustness.quarantineRounds rounds (it is not selected), then is released with its
suspicion reset; a user releases it sooner by removing the ClientNode's
`fedkube.io/quarantined` label (spec.QUARANTINE_LABEL), which a `ReleaseSource` reports."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..spec import RobustnessSpec
from .registry import Client, ClientRegistry

log = logging.getLogger("fedkube.coordinator")


class ReleaseSource(Protocol):
    """Where users release quarantined clients (the Kubernetes sink: the label)."""

    def quarantine_cleared(self, node_ids: Collection[str]) -> set[str]:
        """Those of `node_ids` whose quarantine a user cleared."""


@dataclass(frozen=True)
class Change:
    """A client entering or leaving quarantine, and why (for the job's events)."""

    node_id: str
    quarantined: bool
    reason: str


class Quarantine:
    def __init__(self, settings: RobustnessSpec, registry: ClientRegistry) -> None:
        self.settings = settings
        self.registry = registry

    def holds(self, client: Client) -> bool:
        return client.quarantined

    def count(self) -> int:
        return sum(1 for c in self.registry.all() if c.quarantined)

    def judge(self, round_number: int, reasons: dict[str, str]) -> list[Change]:
        """After round `round_number`'s suspicions were folded: quarantine whoever
        reached the threshold. `reasons`: the signal behind each client's score."""
        threshold = self.settings.quarantine_threshold
        if threshold is None:
            return []
        changes = []
        for client in self.registry.all():
            if client.quarantined or not client.scored or client.suspicion < threshold:
                continue
            client.quarantined_until = round_number + self.settings.quarantine_rounds
            why = reasons.get(client.node_id) or "unlike the others"
            client.quarantine_reason = (
                f"suspicion {client.suspicion:.2f} reached quarantineThreshold {threshold:g} "
                f"in round {round_number} ({why}); out until round "
                f"{client.quarantined_until} has closed")
            log.warning("quarantined %s: %s", client.node_id, client.quarantine_reason,
                        extra={"node": client.node_id, "round": round_number})
            changes.append(Change(client.node_id, True, client.quarantine_reason))
        return changes

    def release(self, rounds_done: int, cleared: Collection[str] = ()) -> list[Change]:
        """Release whoever has sat out its rounds (`rounds_done` rounds have closed) or
        was cleared by a user; their suspicion starts again from 0."""
        changes = []
        for client in self.registry.all():
            if not client.quarantined:
                continue
            assert client.quarantined_until is not None
            if client.node_id in cleared:
                why = "a user removed its fedkube.io/quarantined label"
            elif rounds_done >= client.quarantined_until:
                why = f"served {self.settings.quarantine_rounds} rounds in quarantine"
            else:
                continue
            client.quarantined_until = None
            client.quarantine_reason = None
            client.suspicion = 0.0
            log.info("released %s from quarantine: %s", client.node_id, why,
                     extra={"node": client.node_id})
            changes.append(Change(client.node_id, False, why))
        return changes

    def held_ids(self) -> list[str]:
        return sorted(c.node_id for c in self.registry.all() if c.quarantined)


def robustness_state(client: Client) -> dict[str, Any] | None:
    """What of `client` a checkpoint keeps for a restarted coordinator: its suspicion
    and quarantine; None for a client that was never scored nor quarantined."""
    if not client.scored and not client.quarantined:
        return None
    return {"suspicion": client.suspicion, "scored": client.scored,
            "quarantinedUntil": client.quarantined_until,
            "quarantineReason": client.quarantine_reason}


def restore_robustness(client: Client, saved: Mapping[str, Any]) -> None:
    """Give a client that registered with a restarted coordinator back what
    `robustness_state` saved of it."""
    client.suspicion = float(saved.get("suspicion", 0.0))
    client.scored = int(saved.get("scored", 0))
    until = saved.get("quarantinedUntil")
    client.quarantined_until = None if until is None else int(until)
    client.quarantine_reason = saved.get("quarantineReason") if until is not None else None
