"""The operator's pure edits of its share of a FederatedJob's status (the handlers apply
them; tests/operator/test_operator_handlers.py runs those against the API emulator)."""

from __future__ import annotations

from typing import Any

import pytest
from fedkube.operator import job_status
from fedkube.operator.resources import CoordinatorHealth
from fedkube.runtime.spec import CoordinatorSpec, Writer, check_owned


def _types(share: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(c["type"], c["status"], c["reason"]) for c in share.get("conditions") or []]


def test_accept_writes_only_the_operators_fields() -> None:
    share: dict[str, Any] = {}
    job_status.accept(share, endpoint="j-coordinator.ns.svc:50051", generation=2,
                      coordinator=CoordinatorSpec(), target_epsilon=3.0, now="t1")
    check_owned(share, Writer.operator)
    assert (share["endpoint"], share["observedGeneration"], share["startTime"],
            share["targetEpsilon"]) == ("j-coordinator.ns.svc:50051", 2, "t1", 3.0)
    assert _types(share) == [("SpecAccepted", "True", "Created"),
                             ("Insecure", "True", "NoTLSOrJoinToken")]
    job_status.accept(share, endpoint="e", generation=3, coordinator=CoordinatorSpec(),
                      target_epsilon=None, now="t2")
    assert share["startTime"] == "t1"  # a resumed handler keeps the first start


@pytest.mark.parametrize(("secrets", "status", "reason", "protected", "unprotected"), [
    ({}, "True", "NoTLSOrJoinToken", "session credential", "plaintext"),
    ({"joinTokenSecret": "t"}, "True", "NoTLS", "only token holders can join", "plaintext"),
    ({"tlsSecret": "s"}, "True", "NoClientAuthentication", "encrypted",
     "any pod that reaches the Service can join"),
    ({"tlsSecret": "s", "joinTokenSecret": "t"}, "False", "TLSAndJoinToken",
     "only holders of the token can join", "not tied to device identities"),
    ({"tlsSecret": "s", "clientCaSecret": "ca"}, "False", "MutualTLS",
     "bound to its client certificate", "any certificate from the client CA"),
    ({"tlsSecret": "s", "clientCaSecret": "ca", "joinTokenSecret": "t"}, "False", "MutualTLS",
     "joinTokenSecret", "the coordinator sees every update"),
])
def test_insecure_says_what_each_configuration_protects(
        secrets: dict[str, str], status: str, reason: str, protected: str,
        unprotected: str) -> None:
    share: dict[str, Any] = {}
    job_status.accept(share, endpoint="e", generation=1,
                      coordinator=CoordinatorSpec.model_validate(secrets), target_epsilon=None,
                      now="t1")
    (insecure,) = [c for c in share["conditions"] if c["type"] == "Insecure"]
    assert (insecure["status"], insecure["reason"]) == (status, reason)
    assert protected in insecure["message"] and unprotected in insecure["message"]


def test_health_flips_ready_and_degraded_and_says_when_it_is_news() -> None:
    share: dict[str, Any] = {}
    starting = CoordinatorHealth(ready=False, failure=None)
    failing = CoordinatorHealth(ready=False, failure="pod x: CrashLoopBackOff")
    serving = CoordinatorHealth(ready=True, failure=None)
    assert job_status.record_health(share, starting, "t1") is None
    assert _types(share) == [("Ready", "False", "CoordinatorNotReady")]
    assert job_status.record_health(share, failing, "t2") == "failed"
    assert job_status.record_health(share, failing, "t3") is None  # not news twice
    assert job_status.record_health(share, serving, "t4") == "recovered"
    assert _types(share) == [("Ready", "True", "CoordinatorReady"),
                             ("Degraded", "False", "CoordinatorReady")]
    assert job_status.record_health(share, serving, "t5") is None
    check_owned(share, Writer.operator)


def test_spec_change_refusal_is_news_once_and_is_cleared_when_it_no_longer_holds() -> None:
    share: dict[str, Any] = {}
    assert not job_status.record_spec_change(share, generation=2, refusal=None, now="t1")
    assert "conditions" not in share  # nothing refused, nothing to say
    refusal = ("ImmutableField", "spec.model cannot change")
    assert job_status.record_spec_change(share, generation=3, refusal=refusal, now="t2")
    assert not job_status.record_spec_change(share, generation=3, refusal=refusal, now="t3")
    assert not job_status.record_spec_change(share, generation=4, refusal=None, now="t4")
    assert _types(share) == [("SpecChangeRefused", "False", "SpecChangeApplied")]
    assert share["observedGeneration"] == 4


def test_a_refused_spec_gets_the_coordinators_end_once() -> None:
    share: dict[str, Any] = {}
    job_status.refused_end(share, message="spec.minClients: too many", now="t1")
    check_owned(share, Writer.coordinator)
    assert (share["phase"], share["message"], share["completionTime"]) == (
        "Failed", "spec.minClients: too many", "t1")
    assert _types(share) == [("Failed", "True", "InvalidSpec")]
    job_status.refused_end(share, message="other", now="t2")
    assert share["message"] == "spec.minClients: too many"


def test_pending_never_overwrites_what_the_coordinator_said() -> None:
    share: dict[str, Any] = {}
    job_status.pending(share)
    assert share == {"phase": "Pending"}
    running = {"phase": "Running", "round": 2}
    job_status.pending(running)
    assert running == {"phase": "Running", "round": 2}
