"""Suspicion (coordinator/anomaly.py), quarantine (coordinator/quarantine.py) and what a
ClientNode shows of them."""

from __future__ import annotations

import random
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from fedkube.runtime import wire
from fedkube.runtime.coordinator import checkpoint
from fedkube.runtime.coordinator.anomaly import fold_scores
from fedkube.runtime.coordinator.quarantine import (
    Quarantine,
    restore_robustness,
    robustness_state,
)
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


WEIGHTS = {"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}


def _checkpoint(clients: dict) -> checkpoint.State:
    return checkpoint.State(
        weights=WEIGHTS, round=3, version=3, history=[], best_accuracy=None,
        rounds_without_improvement=0, bytes_up=0, bytes_down=0,
        rng_state=random.Random(0).getstate(), noise_state=torch.Generator().get_state(),
        server_optimizer={}, accountant=None, clients=clients)


def test_suspicion_and_quarantine_go_through_the_checkpoint(tmp_path: Path) -> None:
    registry = _registry("honest", "bad", "new")
    quarantine = Quarantine(RobustnessSpec(quarantine_threshold=0.5, quarantine_rounds=4),
                            registry)
    fold_scores(registry, {"honest": 0.1, "bad": 1.0}, decay=0.5)
    quarantine.judge(3, {"bad": "cosine z=9.0"})
    saved = {c.node_id: s for c in registry.all() if (s := robustness_state(c)) is not None}
    assert set(saved) == {"honest", "bad"}  # "new" was never scored: nothing to keep
    checkpoint.save(tmp_path, _checkpoint(saved))
    loaded = checkpoint.load(tmp_path, schema=wire.schema_of(WEIGHTS))
    assert loaded is not None and loaded.clients == saved

    again = _registry("honest", "bad")  # a restarted coordinator, clients registering
    for node_id, state in loaded.clients.items():
        client = again.get(node_id)
        assert client is not None
        restore_robustness(client, state)
    bad, honest = again.get("bad"), again.get("honest")
    assert bad is not None and honest is not None
    assert bad.quarantined_until == 7 and "cosine z=9.0" in (bad.quarantine_reason or "")
    assert bad.suspicion == pytest.approx(0.5) and bad.scored == 1
    assert _phase(again, "bad") is ClientPhase.quarantined
    assert honest.suspicion == pytest.approx(0.05) and not honest.quarantined
    # Served out after the restart like before it: released once round 7 has closed.
    assert Quarantine(quarantine.settings, again).release(6) == []
    assert [c.node_id for c in Quarantine(quarantine.settings, again).release(7)] == ["bad"]


def test_a_checkpoint_from_before_client_state_still_loads(tmp_path: Path) -> None:
    old = asdict(_checkpoint({}))
    del old["clients"]  # what coordinators wrote before suspicion was checkpointed
    torch.save(old, tmp_path / checkpoint.CHECKPOINT)
    loaded = checkpoint.load(tmp_path, schema=wire.schema_of(WEIGHTS))
    assert loaded is not None and loaded.round == 3 and loaded.clients == {}


def test_the_coordinator_owns_every_clientnode_status_field() -> None:
    wire_fields = {field.alias for field in ClientNodeStatus.model_fields.values()}
    assert set(CLIENT_STATUS_FIELD_OWNERS) == wire_fields
    assert CLIENT_STATUS_FIELD_OWNERS["phase"] is Writer.coordinator
