"""The coordinator's KubernetesStatusSink against the test API server over real HTTP:
what lands in the FederatedJob's status, the ClientNodes and the Events, and that API
trouble never reaches the round engine."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kmock
import kubernetes.config
import pytest
from fedkube.operator import resources
from fedkube.runtime.kube.client import KubeClient
from fedkube.runtime.kube.sink import KubernetesStatusSink
from fedkube.runtime.kube.status import JobStatusWriter
from fedkube.runtime.spec import (
    ClientCounts,
    ClientNodeSpec,
    ClientNodeStatus,
    ClientPhase,
    FederatedJobStatus,
    Hardware,
    Phase,
    PrivacySpent,
    Writer,
    terminal_conditions,
    upsert_condition,
)
from k8s import audit
from kubernetes.client import ApiClient
from support import REPO

NS = "default"
JOB = "digits"
Obj = dict[str, Any]


@pytest.fixture
def job(kube_api: Any) -> Obj:
    """The CRDs, and a FederatedJob whose status the operator has already written to
    (through its own writer, as fedkube-operator)."""
    for crd in sorted((REPO / "crds").glob("*.yaml")):
        kube_api.apply_file(crd)
    kube_api.apply({"apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
                    "metadata": {"name": JOB, "namespace": NS}, "spec": {"model": "mlp"}})
    JobStatusWriter(KubeClient(kube_api.api_client), Writer.operator).apply(NS, JOB, {
        "endpoint": "digits-coordinator.default.svc:50051",
        "conditions": [
            {"type": "SpecAccepted", "status": "True", "reason": "Created", "message": "ok"},
            {"type": "Ready", "status": "False", "reason": "CoordinatorNotReady",
             "message": "starting"}]})
    return kube_api.get("fj", JOB, NS)


@pytest.fixture
def coordinator_client(kube_api: Any, job: Obj, tmp_path: Path) -> Iterator[ApiClient]:
    """A client with the credentials the coordinator pod has: its job's service account,
    holding only the Role the operator grants it (operator/resources.py), so the request
    audit of tests/operator/conftest.py checks every call the writer makes against it."""
    ref = resources.JobRef(name=JOB, namespace=NS)
    for obj in (resources.coordinator_service_account(ref), resources.coordinator_role(ref),
                resources.coordinator_role_binding(ref)):
        kube_api.apply(obj)
    token = audit.service_account_token(NS, resources.coordinator_name(JOB))
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "coordinator.kubeconfig", token=token)
    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    yield client
    client.close()


@pytest.fixture
def sink(coordinator_client: ApiClient) -> Iterator[KubernetesStatusSink]:
    sink = KubernetesStatusSink(job_name=JOB, namespace=NS, api_client=coordinator_client,
                                max_backoff_seconds=0.2)
    yield sink
    sink.close(timeout=5)


def _running(round_: int, **extra: Any) -> FederatedJobStatus:
    return FederatedJobStatus(phase=Phase.running, round=round_, accuracy=0.5 + round_ / 100,
                              clients=ClientCounts(registered=3, active=2),
                              clients_summary="2/3", **extra)


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


def _managers(obj: Obj) -> dict[str, Obj]:
    return {f"{e['manager']}/{e.get('subresource', '')}": e["fieldsV1"]
            for e in obj["metadata"].get("managedFields") or []}


def test_job_status_lands_next_to_the_operators_share(
        kube_api: Any, sink: KubernetesStatusSink) -> None:
    sink.publish_job(_running(2, epsilon=1.5))
    assert sink.flush()
    job = kube_api.get("fj", JOB, NS)
    status = job["status"]
    assert (status["phase"], status["round"], status["accuracy"]) == ("Running", 2, 0.52)
    assert (status["epsilon"], status["clientsSummary"]) == (1.5, "2/3")
    assert status["clients"] == {"registered": 3, "active": 2, "dropped": 0, "quarantined": 0}
    # What the operator owns is untouched, and each writer owns its own share.
    assert status["endpoint"] == "digits-coordinator.default.svc:50051"
    assert [c["type"] for c in status["conditions"]] == ["SpecAccepted", "Ready"]
    managers = _managers(job)
    assert set(managers) == {"fedkube-operator/status", "fedkube-coordinator/status"}
    assert "f:phase" in managers["fedkube-coordinator/status"]["f:status"]
    assert "f:endpoint" not in managers["fedkube-coordinator/status"]["f:status"]
    assert set(managers["fedkube-operator/status"]["f:status"]["f:conditions"]) == {
        'k:{"type":"SpecAccepted"}', 'k:{"type":"Ready"}'}


def test_the_coordinator_applies_only_its_share(
        kube_api: Any, sink: KubernetesStatusSink) -> None:
    # The engine's status model has the operator's fields too (startTime, Ready): what
    # the table gives the operator never leaves the coordinator.
    status = _running(1, start_time="2026-01-01T00:00:00Z", endpoint="elsewhere:1")
    status.conditions = upsert_condition([], type="Ready", status="True", reason="Mine",
                                         message="", now="2026-01-01T00:00:00Z")
    sink.publish_job(status)
    assert sink.flush()
    written = kube_api.get("fj", JOB, NS)["status"]
    assert written["endpoint"] == "digits-coordinator.default.svc:50051"
    assert "startTime" not in written
    ready = next(c for c in written["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "CoordinatorNotReady"


def test_the_end_of_a_job_is_complete_and_drops_what_it_no_longer_says(
        kube_api: Any, sink: KubernetesStatusSink) -> None:
    sink.publish_job(_running(2, message="round 2 running"))
    assert sink.flush()
    final = _running(3)
    final.phase, final.accuracy = Phase.succeeded, None
    final.conditions = terminal_conditions(Phase.succeeded, "RoundsCompleted", "3 rounds",
                                           "2026-01-01T00:00:00Z")
    sink.publish_job(final)
    assert sink.flush()
    status = kube_api.get("fj", JOB, NS)["status"]
    assert status["phase"] == "Succeeded"
    assert "accuracy" not in status and "message" not in status  # no longer applied: removed
    assert [(c["type"], c["status"]) for c in status["conditions"]] == [
        ("SpecAccepted", "True"), ("Ready", "False"), ("Complete", "True")]


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
    with caplog.at_level(logging.WARNING, "fedkube.kube.sink"):
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
    with caplog.at_level(logging.ERROR, "fedkube.kube.sink"):
        sink.publish_job(_running(1))
        sink.publish_client(_node(), _node_status())
        sink.event("Running", "coordinator up")
        assert sink.flush(timeout=20)
    assert "refused" in caplog.text and "404" in caplog.text


def test_close_sends_what_is_pending(kube_api: Any, coordinator_client: ApiClient) -> None:
    sink = KubernetesStatusSink(job_name=JOB, namespace=NS, api_client=coordinator_client)
    final = _running(3)
    final.phase = Phase.succeeded
    final.model_ref = "/var/lib/fedkube/model.pt"
    sink.publish_job(final)
    sink.close(timeout=10)
    status = kube_api.get("fj", JOB, NS)["status"]
    assert (status["phase"], status["modelRef"]) == ("Succeeded", "/var/lib/fedkube/model.pt")


def test_a_quarantined_node_carries_the_label_and_a_user_removing_it_releases_it(
        kube_api: Any, kubectl: Any, sink: KubernetesStatusSink) -> None:
    from fedkube.runtime.spec import QUARANTINE_LABEL

    node_id = "digits-agent-0"
    sink.publish_client(_node(node_id), _node_status(phase=ClientPhase.quarantined))
    assert sink.flush(timeout=10)
    name = f"{JOB}-{node_id}"
    assert kube_api.get("cn", name, NS)["metadata"]["labels"][QUARANTINE_LABEL] == "true"
    assert sink.quarantine_cleared([node_id]) == set()  # not cleared yet
    removed = kubectl("label", "cn", name, f"{QUARANTINE_LABEL}-")
    assert removed.returncode == 0, removed.stderr
    assert QUARANTINE_LABEL not in kube_api.get("cn", name, NS)["metadata"]["labels"]
    assert sink.quarantine_cleared([node_id, "never-written"]) == {node_id}
    # Released: the coordinator's next write leaves the label off.
    sink.publish_client(_node(node_id), _node_status(phase=ClientPhase.ready))
    assert sink.flush(timeout=10)
    node = kube_api.get("cn", name, NS)
    assert QUARANTINE_LABEL not in node["metadata"]["labels"]
    assert node["status"]["phase"] == "Ready"
