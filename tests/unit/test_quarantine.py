"""Suspicion (coordinator/anomaly.py), quarantine (coordinator/quarantine.py) and what a
ClientNode shows of them."""

from __future__ import annotations

import time

import pytest
from fedkube.runtime.coordinator.anomaly import fold_scores
from fedkube.runtime.coordinator.quarantine import Quarantine
from fedkube.runtime.coordinator.registry import ClientRegistry
from fedkube.runtime.messages import NodeFacts, Registration
from fedkube.runtime.spec import (
    CLIENT_STATUS_FIELD_OWNERS,
    ClientNodeStatus,
    ClientPhase,
    RobustnessSpec,
    Writer,
)


def _registry(*names: str) -> ClientRegistry:
    registry = ClientRegistry(job="j", offline_after=60.0)
    for name in names:
        registry.register(Registration(node_id=name, join_token="", facts=NodeFacts()))
    return registry


def _phase(registry: ClientRegistry, name: str) -> ClientPhase:
    client = registry.get(name)
    assert client is not None
    return client.phase(now=time.monotonic(), offline_after=60.0)


def test_suspicion_is_an_exponentially_weighted_mean_of_the_scores() -> None:
    registry = _registry("a", "b")
    fold_scores(registry, {"a": 1.0, "b": 0.0}, decay=0.5)
    fold_scores(registry, {"a": 1.0, "b": 0.2, "gone": 1.0}, decay=0.5)
    a, b = registry.get("a"), registry.get("b")
    assert a is not None and b is not None
    assert a.suspicion == pytest.approx(0.75) and a.scored == 2
    assert b.suspicion == pytest.approx(0.1)
    fold_scores(registry, {"a": 0.0}, decay=0.5)
    assert a.suspicion == pytest.approx(0.375)  # it decays when the client behaves
    status = a.status(job="j", now=time.monotonic(), offline_after=60.0, wall_now=time.time())
    assert status.suspicion == pytest.approx(0.375)
    with pytest.raises(ValueError, match="suspicion decay must be in"):
        fold_scores(registry, {}, decay=0.0)


def test_a_client_over_the_threshold_is_quarantined_then_released_after_its_rounds() -> None:
    registry = _registry("honest", "bad")
    quarantine = Quarantine(RobustnessSpec(quarantine_threshold=0.5, quarantine_rounds=2),
                            registry)
    fold_scores(registry, {"honest": 0.0, "bad": 1.0}, decay=0.5)
    changes = quarantine.judge(3, {"bad": "norm z=40.0"})
    assert [(c.node_id, c.quarantined) for c in changes] == [("bad", True)]
    assert "norm z=40.0" in changes[0].reason and "round 3" in changes[0].reason
    bad = registry.get("bad")
    assert bad is not None and bad.quarantined and bad.quarantined_until == 5
    assert _phase(registry, "bad") is ClientPhase.quarantined
    assert quarantine.count() == 1 and quarantine.judge(4, {}) == []  # not twice
    status = bad.status(job="j", now=time.monotonic(), offline_after=60.0, wall_now=time.time())
    assert status.phase is ClientPhase.quarantined and status.quarantined_until_round == 5
    assert status.quarantine_reason == bad.quarantine_reason

    assert quarantine.release(4) == []  # round 5 has not closed yet
    released = quarantine.release(5)
    assert [(c.node_id, c.quarantined) for c in released] == [("bad", False)]
    assert not bad.quarantined and bad.suspicion == 0.0
    assert _phase(registry, "bad") is ClientPhase.ready


def test_a_user_clears_a_quarantine_before_its_rounds_are_served() -> None:
    registry = _registry("bad")
    quarantine = Quarantine(RobustnessSpec(quarantine_threshold=0.4, quarantine_rounds=50),
                            registry)
    fold_scores(registry, {"bad": 1.0}, decay=0.5)
    quarantine.judge(1, {})
    released = quarantine.release(2, cleared={"bad"})
    assert released and "label" in released[0].reason
    assert quarantine.held_ids() == []


def test_without_a_threshold_nobody_is_quarantined() -> None:
    registry = _registry("bad")
    fold_scores(registry, {"bad": 1.0}, decay=1.0)
    assert Quarantine(RobustnessSpec(), registry).judge(1, {}) == []


def test_the_coordinator_owns_every_clientnode_status_field() -> None:
    wire_fields = {field.alias for field in ClientNodeStatus.model_fields.values()}
    assert set(CLIENT_STATUS_FIELD_OWNERS) == wire_fields
    assert CLIENT_STATUS_FIELD_OWNERS["phase"] is Writer.coordinator
