"""The pure parts of the coordinator's Kubernetes status writer (the sink itself runs
against the test API server in tests/operator/test_operator_kube_status.py)."""

from __future__ import annotations

import copy
import re

from fedkube.runtime.coordinator.kube_status import client_node_name, merge_conditions
from hypothesis import given
from hypothesis import strategies as st

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


def test_merge_conditions_keeps_the_operators_and_replaces_ours() -> None:
    server = [
        {"type": "SpecAccepted", "status": "True", "reason": "Created"},
        {"type": "Ready", "status": "False", "reason": "CoordinatorNotReady"},
        {"type": "Degraded", "status": "False", "reason": "CoordinatorReady"},
    ]
    ours = [
        {"type": "Ready", "status": "True", "reason": "CoordinatorReady"},
        {"type": "Converged", "status": "True", "reason": "TargetAccuracyReached"},
    ]
    before = copy.deepcopy((server, ours))
    assert merge_conditions(server, ours) == [
        {"type": "SpecAccepted", "status": "True", "reason": "Created"},
        {"type": "Ready", "status": "True", "reason": "CoordinatorReady"},
        {"type": "Degraded", "status": "False", "reason": "CoordinatorReady"},
        {"type": "Converged", "status": "True", "reason": "TargetAccuracyReached"},
    ]
    assert (server, ours) == before


def test_merge_conditions_with_nothing_on_either_side() -> None:
    assert merge_conditions([], []) == []
    only = [{"type": "Ready", "status": "True"}]
    assert merge_conditions(only, []) == only
    assert merge_conditions([], only) == only
