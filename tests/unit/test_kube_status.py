"""The pure parts of the Kubernetes status writers: ClientNode names, the ownership table
of spec.py, refusing what a writer does not own, terminal conditions (the writers run
against the test API server in tests/operator/test_operator_kube_status.py)."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from fedkube.runtime.kube.client import KubeClient
from fedkube.runtime.kube.sink import client_node_name
from fedkube.runtime.kube.status import JobStatusWriter, set_condition
from fedkube.runtime.spec import (
    CONDITION_OWNERS,
    STATUS_FIELD_OWNERS,
    ConditionType,
    FederatedJobStatus,
    NotOwnedError,
    Phase,
    Writer,
    check_owned,
    owned_status,
    terminal_conditions,
)
from hypothesis import given
from hypothesis import strategies as st
from kubernetes.client import ApiClient

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def test_client_node_name_of_a_valid_id_is_job_dash_id() -> None:
    assert client_node_name("digits", "digits-agent-0") == "digits-digits-agent-0"
    assert client_node_name("digits", "macbook.lab") == "digits-macbook.lab"


def test_client_node_name_sanitises_and_disambiguates() -> None:
    a = client_node_name("digits", "Mac Book_1")
    b = client_node_name("digits", "mac-book-1")
    assert a.startswith("digits-mac-book-1-") and DNS_SUBDOMAIN.match(a)
    assert b == "digits-mac-book-1"
    assert a != b  # the hash suffix keeps sanitised ids apart from ids that were valid


@given(st.text(min_size=1, max_size=400))
def test_client_node_names_are_always_valid_and_stable(node_id: str) -> None:
    name = client_node_name("job", node_id)
    assert len(name) <= 253 and DNS_SUBDOMAIN.match(name), name
    assert client_node_name("job", node_id) == name


def test_long_ids_that_share_a_prefix_do_not_collide() -> None:
    stem = "n" * 300
    assert client_node_name("job", stem + "a") != client_node_name("job", stem + "b")


def test_every_status_field_and_condition_type_has_exactly_one_writer() -> None:
    fields = {info.alias or name for name, info in FederatedJobStatus.model_fields.items()}
    assert fields - {"conditions"} == set(STATUS_FIELD_OWNERS)
    types = {v for k, v in vars(ConditionType).items() if not k.startswith("_")}
    assert types == set(CONDITION_OWNERS)
    assert {Writer.operator, Writer.coordinator} == set(CONDITION_OWNERS.values())
    assert (Writer.operator.field_manager, Writer.coordinator.field_manager) == (
        "fedkube-operator", "fedkube-coordinator")


def _full_status() -> dict[str, Any]:
    return {"phase": "Running", "round": 3, "endpoint": "e:1", "startTime": "t",
            "observedGeneration": 2,
            "conditions": [{"type": t, "status": "True"} for t in CONDITION_OWNERS]}


def test_each_writer_owns_its_share_and_the_shares_make_the_whole() -> None:
    status = _full_status()
    before = copy.deepcopy(status)
    operator = owned_status(status, Writer.operator)
    coordinator = owned_status(status, Writer.coordinator)
    assert status == before  # not mutated
    assert set(operator) == {"endpoint", "startTime", "observedGeneration", "conditions"}
    assert [c["type"] for c in operator["conditions"]] == [
        "SpecAccepted", "Insecure", "SpecChangeRefused", "Ready", "Degraded"]
    assert set(coordinator) == {"phase", "round", "conditions"}
    assert [c["type"] for c in coordinator["conditions"]] == [
        "Converged", "BudgetExhausted", "Complete", "Failed"]
    check_owned(operator, Writer.operator)
    check_owned(coordinator, Writer.coordinator)


@pytest.mark.parametrize(("writer", "share", "named"), [
    (Writer.operator, {"phase": "Failed"}, "status.phase is written by the coordinator"),
    (Writer.coordinator, {"endpoint": "x"}, "status.endpoint is written by the operator"),
    (Writer.coordinator, {"conditions": [{"type": "Ready", "status": "True"}]},
     "status.conditions[type=Ready] is written by the operator"),
    (Writer.operator, {"conditions": [{"type": "Complete", "status": "True"}]},
     "status.conditions[type=Complete] is written by the coordinator"),
    (Writer.operator, {"conditions": [{"type": "Mystery", "status": "True"}]},
     "status.conditions[type=Mystery]: not a FederatedJob condition type"),
    (Writer.coordinator, {"nonsense": 1}, "status.nonsense: not a FederatedJob status field"),
])
def test_a_writer_refuses_to_apply_what_it_does_not_own(
        writer: Writer, share: dict[str, Any], named: str) -> None:
    # No API server behind this client: the refusal comes before any request.
    status_writer = JobStatusWriter(KubeClient(ApiClient()), writer)
    with pytest.raises(NotOwnedError, match=re.escape(named)):
        status_writer.apply("default", "job", share)


@pytest.mark.parametrize(("phase", "kind"), [
    (Phase.succeeded, "Complete"), (Phase.failed, "Failed"), (Phase.stopped, "Failed")])
def test_a_finished_job_gets_one_terminal_condition(phase: Phase, kind: str) -> None:
    (condition,) = terminal_conditions(phase, "Why", "what happened", "2026-01-01T00:00:00Z")
    assert (condition.type, condition.status, condition.reason, condition.message) == (
        kind, "True", "Why", "what happened")
    assert condition.last_transition_time == "2026-01-01T00:00:00Z"


@pytest.mark.parametrize("phase", [Phase.pending, Phase.running])
def test_a_job_still_going_has_no_terminal_condition(phase: Phase) -> None:
    assert terminal_conditions(phase, "Why", "", "now") == []


def test_set_condition_upserts_by_type_and_keeps_the_transition_time() -> None:
    share: dict[str, Any] = {}
    set_condition(share, type="Ready", status="False", reason="A", message="a", now="t1")
    set_condition(share, type="Ready", status="False", reason="B", message="b", now="t2")
    set_condition(share, type="Degraded", status="True", reason="C", message="c", now="t3")
    assert share["conditions"] == [
        {"type": "Ready", "status": "False", "reason": "B", "message": "b",
         "lastTransitionTime": "t1"},
        {"type": "Degraded", "status": "True", "reason": "C", "message": "c",
         "lastTransitionTime": "t3"}]
    set_condition(share, type="Ready", status="True", reason="D", message="d", now="t4")
    assert share["conditions"][0]["lastTransitionTime"] == "t4"
