"""The coordinator's KubernetesStatusSink against the test API server over real HTTP:
what lands in the FederatedJob's status, the ClientNodes and the Events, and that API
trouble never reaches the round engine."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import kmock
import pytest
from fedkube.runtime.coordinator.kube_status import KubernetesStatusSink
from fedkube.runtime.spec import (
    ClientCounts,
    ClientNodeSpec,
    ClientNodeStatus,
    ClientPhase,
    FederatedJobStatus,
    Hardware,
    Phase,
    PrivacySpent,
    upsert_condition,
)
from support import REPO

NS = "default"
JOB = "digits"
Obj = dict[str, Any]


@pytest.fixture
def job(kube_api: Any) -> Obj:
    """The CRDs, and a FederatedJob whose status the operator has already written to."""
    for crd in sorted((REPO / "crds").glob("*.yaml")):
        kube_api.apply_file(crd)
    kube_api.apply({"apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
                    "metadata": {"name": JOB, "namespace": NS}, "spec": {"model": "mlp"}})
    return kube_api.patch("fj", JOB, {"status": {
        "phase": "Pending", "endpoint": "digits-coordinator.default.svc:50051",
        "conditions": [
            {"type": "SpecAccepted", "status": "True", "reason": "Created", "message": "ok"},
            {"type": "Ready", "status": "False", "reason": "CoordinatorNotReady",
             "message": "starting"}]}}, namespace=NS, subresource="status")


@pytest.fixture
def sink(kube_api: Any, job: Obj) -> Iterator[KubernetesStatusSink]:
    sink = KubernetesStatusSink(job_name=JOB, namespace=NS, api_client=kube_api.api_client,
                                max_backoff_seconds=0.2)
    yield sink
    sink.close(timeout=5)


def _running(round_: int, **extra: Any) -> FederatedJobStatus:
    status = FederatedJobStatus(phase=Phase.running, round=round_, accuracy=0.5 + round_ / 100,
                                clients=ClientCounts(registered=3, active=2),
                                clients_summary="2/3", **extra)
    status.conditions = upsert_condition([], type="Ready", status="True",
                                         reason="CoordinatorReady", message="serving",
                                         now="2026-01-01T00:00:00Z")
    return status


def _node(node_id: str = "digits-agent-0") -> ClientNodeSpec:
    return ClientNodeSpec(node_id=node_id, device="mps", labels={"site": "lab"}, data_size=600,
                          hardware=Hardware(platform="Darwin-24-arm64", cpus=8))


def _node_status(phase: ClientPhase = ClientPhase.training, heartbeat: str = "2026-01-01T00:00:05Z",
                 rounds: int = 2) -> ClientNodeStatus:
    return ClientNodeStatus(phase=phase, last_heartbeat=heartbeat, rounds_participated=rounds,
                            privacy={JOB: PrivacySpent(epsilon=0.7, delta=1e-5)})


def _status_patches(kube_api: Any, plural: str) -> int:
    return len(kube_api.server["patch", kmock.resource("fedkube.io", "v1alpha1", plural),
                               kmock.subresource("status")])


def test_job_status_lands_next_to_the_operators_conditions(
        kube_api: Any, sink: KubernetesStatusSink) -> None:
    sink.publish_job(_running(2, epsilon=1.5, target_epsilon=4.0))
    assert sink.flush()
    status = kube_api.get("fj", JOB, NS)["status"]
    assert (status["phase"], status["round"], status["accuracy"]) == ("Running", 2, 0.52)
    assert (status["epsilon"], status["targetEpsilon"], status["clientsSummary"]) == (
        1.5, 4.0, "2/3")
    assert status["clients"] == {"registered": 3, "active": 2, "dropped": 0}
    # What the operator owns is untouched; Ready is the coordinator's word now.
    assert status["endpoint"] == "digits-coordinator.default.svc:50051"
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["SpecAccepted"]["status"] == "True"
    assert (by_type["Ready"]["status"], by_type["Ready"]["reason"]) == ("True", "CoordinatorReady")
    assert [c["type"] for c in status["conditions"]] == ["SpecAccepted", "Ready"]


def test_a_burst_of_statuses_is_coalesced_to_the_newest(
        kube_api: Any, sink: KubernetesStatusSink) -> None:
    for round_ in range(1, 61):
        sink.publish_job(_running(round_))
    assert sink.flush()
    assert kube_api.get("fj", JOB, NS)["status"]["round"] == 60
    assert _status_patches(kube_api, "federatedjobs") < 60


def test_client_node_is_created_owned_and_kept_current(
        kube_api: Any, sink: KubernetesStatusSink, job: Obj) -> None:
    sink.publish_client(_node(), _node_status())
    assert sink.flush()
    node = kube_api.get("cn", "digits-digits-agent-0", NS)
    (owner,) = node["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("FederatedJob", JOB,
                                                            job["metadata"]["uid"])
    assert node["metadata"]["labels"]["fedkube.io/job"] == JOB
    assert node["spec"]["nodeId"] == "digits-agent-0" and node["spec"]["job"] == JOB
    assert node["spec"]["device"] == "mps" and node["spec"]["hardware"]["cpus"] == 8
    assert node["status"]["phase"] == "Training"
    assert node["status"]["roundsParticipated"] == 2
    assert node["status"]["privacy"] == {JOB: {"epsilon": 0.7, "delta": 1e-5}}

    # A heartbeat alone, just after the last write, is not worth a PATCH...
    patches = _status_patches(kube_api, "clientnodes")
    sink.publish_client(_node(), _node_status(heartbeat="2026-01-01T00:00:10Z"))
    assert sink.flush()
    assert _status_patches(kube_api, "clientnodes") == patches
    # ...a change of phase or rounds is.
    sink.publish_client(_node(), _node_status(ClientPhase.ready, "2026-01-01T00:00:15Z", 3))
    assert sink.flush()
    node = kube_api.get("cn", "digits-digits-agent-0", NS)
    assert (node["status"]["phase"], node["status"]["roundsParticipated"]) == ("Ready", 3)
    assert node["status"]["lastHeartbeat"] == "2026-01-01T00:00:15Z"


def test_a_client_node_deleted_by_hand_comes_back(
        kube_api: Any, sink: KubernetesStatusSink) -> None:
    sink.publish_client(_node(), _node_status())
    assert sink.flush()
    kube_api.delete("cn", "digits-digits-agent-0", NS)
    kube_api.wait_gone("cn", "digits-digits-agent-0", NS)
    sink.publish_client(_node(), _node_status(rounds=3))
    assert sink.flush()
    node = kube_api.wait_for("cn", "digits-digits-agent-0", namespace=NS)
    assert node["status"]["roundsParticipated"] == 3


def test_events_involve_the_job(kube_api: Any, sink: KubernetesStatusSink, job: Obj) -> None:
    sink.event("RoundCompleted", "round 1: accuracy 0.61")
    sink.event("TooFewClients", "round 2 got 0 of 1 updates", warning=True)
    assert sink.flush()
    events = [e for e in kube_api.events(NS)
              if e["source"].get("component") == "fedkube-coordinator"]
    assert sorted((e["reason"], e["type"]) for e in events) == [
        ("RoundCompleted", "Normal"), ("TooFewClients", "Warning")]
    for event in events:
        assert event["involvedObject"] == {
            "apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob", "name": JOB,
            "namespace": NS, "uid": job["metadata"]["uid"]}


@contextlib.contextmanager
def _api_server_held(kube_api: Any) -> Iterator[None]:
    """The API server's event loop blocked until the block ends: no request is answered."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(60)

    holder = threading.Thread(target=kube_api.call, args=(hold,), daemon=True)
    holder.start()
    assert held.wait(30)
    try:
        yield
    finally:
        release.set()
        holder.join(30)


def test_transient_api_errors_are_retried(kube_api: Any, sink: KubernetesStatusSink,
                                          caplog: pytest.LogCaptureFixture) -> None:
    failing = kube_api.server["patch", kmock.resource("fedkube.io", "v1alpha1", "federatedjobs"),
                              kmock.subresource("status")]
    kube_api.call(lambda: failing[:3] << 503)
    with caplog.at_level(logging.WARNING, "fedkube.coordinator.kube_status"):
        # The engine never waits on the API server: publishing returns while the server
        # cannot answer at all (its event loop held), not merely quickly.
        with _api_server_held(kube_api):
            sink.publish_job(_running(5))
        assert sink.flush(timeout=20)
    assert kube_api.get("fj", JOB, NS)["status"]["round"] == 5
    assert "will retry" in caplog.text


def test_a_deleted_job_is_logged_not_raised(kube_api: Any, sink: KubernetesStatusSink,
                                            caplog: pytest.LogCaptureFixture) -> None:
    kube_api.delete("fj", JOB, NS)
    kube_api.wait_gone("fj", JOB, NS)
    with caplog.at_level(logging.ERROR, "fedkube.coordinator.kube_status"):
        sink.publish_job(_running(1))
        sink.publish_client(_node(), _node_status())
        sink.event("Running", "coordinator up")
        assert sink.flush(timeout=20)
    assert "refused" in caplog.text and "404" in caplog.text


def test_close_sends_what_is_pending(kube_api: Any, job: Obj) -> None:
    sink = KubernetesStatusSink(job_name=JOB, namespace=NS, api_client=kube_api.api_client)
    final = _running(3)
    final.phase = Phase.succeeded
    final.model_ref = "/var/lib/fedkube/model.pt"
    sink.publish_job(final)
    sink.close(timeout=10)
    status = kube_api.get("fj", JOB, NS)["status"]
    assert (status["phase"], status["modelRef"]) == ("Succeeded", "/var/lib/fedkube/model.pt")
