"""The operator as a user runs it (`fedkube operator`, a real process with a kubeconfig)
against the test API server, driven through the API: apply, edit, delete, watch status.

The API server has no controllers and no kubelet: where a test needs a pod's state, it
writes the pod status a kubelet would write.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import yaml
from fedkube.runtime.kube.sink import KubernetesStatusSink
from fedkube.runtime.spec import FederatedJobStatus, Phase, terminal_conditions, upsert_condition
from k8s import audit
from support import OperatorProcess as Operator

NS = "default"
OFFLINE_AFTER = Operator.OFFLINE_AFTER

Obj = dict[str, Any]


def _job(name: str, **spec: Any) -> Obj:
    return {"apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"model": "mlp", "rounds": 3, **spec}}


def _condition(obj: Obj, type_: str) -> Obj | None:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), None)


def _has_condition(type_: str, status: str, reason: str | None = None) -> Callable[[Obj], bool]:
    def check(obj: Obj) -> bool:
        found = _condition(obj, type_)
        return found is not None and found["status"] == status and (
            reason is None or found["reason"] == reason)
    return check


# The operator applies its share (with these conditions) last (see handlers.create_job):
# waiting for them means everything else it writes for the same step is there too.
ACCEPTED = _has_condition("SpecAccepted", "True", "Created")
REJECTED = _has_condition("SpecAccepted", "False", "InvalidSpec")


def _wait(kube_api: Any, resource: str, name: str, predicate: Callable[[Obj], Any],
          operator: Operator, timeout: float = 20) -> Obj:
    try:
        return kube_api.wait_for(resource, name, predicate, namespace=NS, timeout=timeout)
    except TimeoutError as error:
        raise AssertionError(f"{error}\n--- operator log ---\n"
                             f"{operator.log()[-4000:]}") from None


def _events(kube_api: Any, operator: Operator, reason: str,
            done: Callable[[list[Obj]], bool] = bool, timeout: float = 20) -> list[Obj]:
    """The Events with this reason once ``done(events)`` holds. kopf posts Events from a
    queue after the status patch lands: a test waits for them rather than racing them."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in kube_api.events(NS) if e["reason"] == reason]
        if done(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout}s for {reason} events; saw {found}\n"
                                 f"--- operator log ---\n{operator.log()[-4000:]}")
        time.sleep(0.1)  # polling interval


def _children(kube_api: Any, job: str) -> dict[str, list[Obj]]:
    kinds = {"ConfigMap": "v1/configmaps", "Service": "v1/services", "Pod": "v1/pods",
             "ServiceAccount": "v1/serviceaccounts", "Deployment": "apps/v1/deployments",
             "Role": "rbac.authorization.k8s.io/v1/roles",
             "RoleBinding": "rbac.authorization.k8s.io/v1/rolebindings"}
    return {kind: kube_api.list(resource, NS, label_selector=f"fedkube.io/job={job}")
            for kind, resource in kinds.items()}


def test_invalid_manifest_fails_with_the_field_named(kube_api: Any, operator: Operator) -> None:
    kube_api.apply(_job("bad", simulation={"clients": 1}, minClients=3))
    job = _wait(kube_api, "fj", "bad", REJECTED, operator)
    assert job["status"]["phase"] == "Failed"
    accepted = _condition(job, "SpecAccepted")
    assert accepted is not None and accepted["status"] == "False"
    assert accepted["reason"] == "InvalidSpec"
    assert "minClients" in accepted["message"] and "simulation.clients" in accepted["message"]
    assert "minClients" in job["status"]["message"]
    # Failed is terminal: it gets a completion time and the Failed condition (written in
    # the coordinator's name: no coordinator will ever run), and nothing was created.
    assert job["status"]["completionTime"]
    assert _has_condition("Failed", "True", "InvalidSpec")(job)
    managers = {(e["manager"], e.get("subresource")) for e in job["metadata"]["managedFields"]}
    assert {("fedkube-operator", "status"), ("fedkube-coordinator", "status")} <= managers
    assert not any(_children(kube_api, "bad").values())
    warnings = _events(kube_api, operator, "InvalidSpec")
    assert warnings[0]["type"] == "Warning"
    assert warnings[0]["involvedObject"]["name"] == "bad"


def test_valid_job_gets_owned_children_and_an_endpoint(kube_api: Any, operator: Operator,
                                                       ) -> None:
    kube_api.apply(_job("digits", simulation={"clients": 2}, clientsPerRound=2,
                        privacy={"mode": "central", "targetEpsilon": 5.0}))
    job = _wait(kube_api, "fj", "digits", ACCEPTED, operator)
    status = job["status"]
    assert status["phase"] == "Pending"
    assert status["endpoint"] == "digits-coordinator.default.svc:50051"
    assert status["targetEpsilon"] == 5.0 and status["startTime"]
    assert _has_condition("SpecAccepted", "True", "Created")(job)
    assert _has_condition("Insecure", "True", "NoTLSOrJoinToken")(job)

    children = _children(kube_api, "digits")
    names = {kind: sorted(o["metadata"]["name"] for o in objs) for kind, objs in children.items()}
    assert names == {
        "ConfigMap": ["digits-spec"],
        "Service": ["digits-coordinator"],
        "Pod": ["digits-agent-0", "digits-agent-1"],
        "ServiceAccount": ["digits-coordinator"],
        "Deployment": ["digits-coordinator"],
        "Role": ["digits-coordinator"],
        "RoleBinding": ["digits-coordinator"],
    }
    uid = job["metadata"]["uid"]
    for objs in children.values():
        for obj in objs:
            (owner,) = obj["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
                "FederatedJob", "digits", uid, True)
    manifest = yaml.safe_load(children["ConfigMap"][0]["data"]["job.yaml"])
    assert manifest["metadata"] == {"name": "digits", "namespace": NS}
    assert manifest["spec"]["clientsPerRound"] == 2
    (container,) = children["Deployment"][0]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "fedkube:test"
    assert len(_events(kube_api, operator, "Created")) == 1


def test_deleting_a_job_removes_what_it_owns(kube_api: Any, operator: Operator) -> None:
    kube_api.apply(_job("gone", simulation={"clients": 1}))
    _wait(kube_api, "fj", "gone", ACCEPTED, operator)
    # ClientNodes are owned by the job too (the coordinator creates them that way).
    job = kube_api.get("fj", "gone", NS)
    kube_api.apply({
        "apiVersion": "fedkube.io/v1alpha1", "kind": "ClientNode",
        "metadata": {"name": "gone-gone-agent-0", "namespace": NS,
                     "labels": {"fedkube.io/job": "gone"},
                     "ownerReferences": [{"apiVersion": "fedkube.io/v1alpha1",
                                          "kind": "FederatedJob", "name": "gone",
                                          "uid": job["metadata"]["uid"], "controller": True}]},
        "spec": {"nodeId": "gone-agent-0"}})
    assert any(_children(kube_api, "gone").values())
    kube_api.delete("fj", "gone", NS)
    kube_api.wait_gone("fj", "gone", NS, timeout=20)
    kube_api.wait_gone("cn", "gone-gone-agent-0", NS, timeout=20)
    assert not any(_children(kube_api, "gone").values())


def _publish(kube_api: Any, job: str, status: FederatedJobStatus) -> None:
    sink = KubernetesStatusSink(job_name=job, namespace=NS, api_client=kube_api.api_client)
    sink.publish_job(status)
    sink.close()


def _finished(job: str) -> FederatedJobStatus:
    status = FederatedJobStatus(phase=Phase.succeeded, round=3, accuracy=0.91,
                                model_ref="/var/lib/fedkube/model.pt",
                                completion_time="2026-01-01T00:10:00Z")
    status.conditions = terminal_conditions(Phase.succeeded, "RoundsCompleted",
                                            "completed 3 rounds", "2026-01-01T00:10:00Z")
    return status


def test_finished_job_keeps_config_and_loses_its_pods(kube_api: Any, operator: Operator,
                                                      ) -> None:
    kube_api.apply(_job("done", simulation={"clients": 2}))
    _wait(kube_api, "fj", "done", ACCEPTED, operator)
    # What the coordinator writes when its last round ends, through its real writer.
    _publish(kube_api, "done", _finished("done"))
    job = _wait(kube_api, "fj", "done", _has_condition("Ready", "False", "JobFinished"),
                operator)
    deadline = time.monotonic() + 20
    while any(_children(kube_api, "done")[kind] for kind in ("Deployment", "Service", "Pod")):
        assert time.monotonic() < deadline, _children(kube_api, "done")
        time.sleep(0.1)
    left = _children(kube_api, "done")
    assert [o["metadata"]["name"] for o in left["ConfigMap"]] == ["done-spec"]
    assert job["status"]["modelRef"] == "/var/lib/fedkube/model.pt"
    assert job["status"]["phase"] == "Succeeded"
    finished = _events(kube_api, operator, "Succeeded")
    assert "model at /var/lib/fedkube/model.pt" in finished[0]["message"]


def test_spec_edits_apply_mutable_fields_and_refuse_the_rest(kube_api: Any, operator: Operator,
                                                             ) -> None:
    kube_api.apply(_job("edit", simulation={"clients": 3}, clientsPerRound=2))
    _wait(kube_api, "fj", "edit", ACCEPTED, operator)

    def running_spec() -> Obj:
        config_map = kube_api.get("v1/configmaps", "edit-spec", NS)
        return yaml.safe_load(config_map["data"]["job.yaml"])["spec"]

    kube_api.patch("fj", "edit", {"spec": {"rounds": 7, "clientsPerRound": 3}}, namespace=NS)
    deadline = time.monotonic() + 20
    while running_spec()["rounds"] != 7:
        assert time.monotonic() < deadline, operator.log()[-3000:]
        time.sleep(0.1)
    assert running_spec()["clientsPerRound"] == 3
    assert _condition(kube_api.get("fj", "edit", NS), "SpecChangeRefused") is None

    kube_api.patch("fj", "edit", {"spec": {"model": "cnn8", "rounds": 9,
                                           "data": {"partition": "shards"}}}, namespace=NS)
    job = _wait(kube_api, "fj", "edit", _has_condition("SpecChangeRefused", "True",
                                                       "ImmutableField"), operator)
    message = _condition(job, "SpecChangeRefused")["message"]  # type: ignore[index]
    assert "spec.model" in message and "spec.data.partition" in message
    assert "spec.rounds" not in message.split("cannot change")[0]
    spec = running_spec()
    assert (spec["model"], spec["data"]["partition"], spec["rounds"]) == ("mlp", "iid", 9)

    # Putting the immutable fields back clears the refusal.
    kube_api.patch("fj", "edit", {"spec": {"model": "mlp", "data": {"partition": "iid"}}},
                   namespace=NS)
    _wait(kube_api, "fj", "edit", _has_condition("SpecChangeRefused", "False"), operator)


def _coordinator_pod(job: str) -> Obj:
    """A pod as the Deployment's ReplicaSet would create it."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{job}-coordinator-7d9f-x2x", "namespace": NS,
                         "labels": {"app.kubernetes.io/name": "fedkube",
                                    "app.kubernetes.io/component": "coordinator",
                                    "app.kubernetes.io/managed-by": "fedkube-operator",
                                    "fedkube.io/job": job}},
            "spec": {"containers": [{"name": "coordinator", "image": "fedkube:test"}]}}


def test_failing_coordinator_degrades_the_job_until_it_recovers(kube_api: Any,
                                                                operator: Operator) -> None:
    kube_api.apply(_job("flaky"))
    _wait(kube_api, "fj", "flaky", _has_condition("Ready", "False", "CoordinatorNotReady"),
          operator)
    crashing = {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [{"name": "coordinator", "ready": False, "restartCount": 4,
                                       "state": {"waiting": {"reason": "CrashLoopBackOff",
                                                             "message": "back-off 40s"}}}]}
    kube_api.apply(_coordinator_pod("flaky"))
    # What the kubelet reports about it.
    kube_api.patch("v1/pods", "flaky-coordinator-7d9f-x2x", {"status": crashing}, namespace=NS,
                   subresource="status")
    job = _wait(kube_api, "fj", "flaky", _has_condition("Degraded", "True", "CoordinatorFailed"),
                operator)
    assert "CrashLoopBackOff" in _condition(job, "Degraded")["message"]  # type: ignore[index]

    serving = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
               "containerStatuses": [{"name": "coordinator", "ready": True, "restartCount": 4,
                                      "state": {"running": {}}}]}
    kube_api.patch("v1/pods", "flaky-coordinator-7d9f-x2x", {"status": serving}, namespace=NS,
                   subresource="status")
    job = _wait(kube_api, "fj", "flaky", _has_condition("Degraded", "False", "CoordinatorReady"),
                operator)
    assert _has_condition("Ready", "True", "CoordinatorReady")(job)
    # kopf posts the Event after the status patch lands: wait for it, do not race it.
    deadline = time.monotonic() + 30
    while True:
        reasons = [e["reason"] for e in kube_api.events(NS)
                   if e["involvedObject"]["name"] == "flaky"]
        if {"CoordinatorFailed", "CoordinatorReady"} <= set(reasons):
            break
        assert time.monotonic() < deadline, reasons
        time.sleep(0.2)  # polling interval


def _register_node(kube_api: Any, name: str, heartbeat: str, phase: str = "Ready") -> None:
    """A ClientNode as the coordinator writes it: the object, then its status."""
    kube_api.apply({"apiVersion": "fedkube.io/v1alpha1", "kind": "ClientNode",
                    "metadata": {"name": name, "namespace": NS},
                    "spec": {"nodeId": name, "device": "mps"}})
    kube_api.patch("cn", name, {"status": {"phase": phase, "lastHeartbeat": heartbeat}},
                   namespace=NS, subresource="status")


def _phase(phase: str) -> Callable[[Obj], bool]:
    return lambda obj: (obj.get("status") or {}).get("phase") == phase


def _iso(seconds_ago: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds_ago))


def test_silent_client_nodes_go_offline(kube_api: Any, operator: Operator) -> None:
    # Quarantined is the coordinator's alone (spec.CLIENT_STATUS_FIELD_OWNERS): a silent
    # quarantined node is left as it is.
    # (Written Quarantined in one status patch: a Ready status first would race the timer.)
    _register_node(kube_api, "held", heartbeat=_iso(120), phase="Quarantined")
    _register_node(kube_api, "stale", heartbeat=_iso(120))
    node = _wait(kube_api, "cn", "stale", _phase("Offline"), operator)
    assert node["status"]["lastHeartbeat"]  # the last sighting stays for `kubectl get cn`

    # A node heard from recently stays Ready past the threshold. Its heartbeat is dated a
    # minute ahead, so a machine too busy to run this loop on time cannot make it stale...
    _register_node(kube_api, "alive", heartbeat=_iso(-60))
    deadline = time.monotonic() + OFFLINE_AFTER * 2
    while time.monotonic() < deadline:
        assert kube_api.get("cn", "alive", NS)["status"]["phase"] == "Ready"
        time.sleep(0.3)  # polling interval
    # ...and goes Offline once it falls silent.
    kube_api.patch("cn", "alive", {"status": {"lastHeartbeat": _iso(0)}}, namespace=NS,
                   subresource="status")
    _wait(kube_api, "cn", "alive", _phase("Offline"), operator)
    offline_events = _events(kube_api, operator, "Offline", lambda found: len(
        {e["involvedObject"]["name"] for e in found}) >= 2)
    assert {e["involvedObject"]["name"] for e in offline_events} == {"stale", "alive"}
    assert kube_api.get("cn", "held", NS)["status"]["phase"] == "Quarantined"


def test_a_node_back_from_offline_is_watched_again(kube_api: Any, operator: Operator) -> None:
    _register_node(kube_api, "back", heartbeat=_iso(60))
    _wait(kube_api, "cn", "back", _phase("Offline"), operator)
    # The coordinator hears from it again and says so.
    kube_api.patch("cn", "back", {"status": {"phase": "Ready", "lastHeartbeat": _iso(0)}},
                   namespace=NS, subresource="status")
    _wait(kube_api, "cn", "back", _phase("Ready"), operator, timeout=2)
    _wait(kube_api, "cn", "back", _phase("Offline"), operator, timeout=OFFLINE_AFTER + 15)


def test_kubectl_get_shows_the_printer_columns(kube_api: Any, kubectl: Any,
                                               operator: Operator) -> None:
    kube_api.apply(_job("cols"))
    _wait(kube_api, "fj", "cols", ACCEPTED, operator)
    # What the coordinator publishes mid-run.
    kube_api.patch("fj", "cols", {"status": {"phase": "Running", "round": 2, "accuracy": 0.875,
                                             "epsilon": 1.25, "clientsSummary": "3/3"}},
                   namespace=NS, subresource="status")
    out = kubectl("get", "fj", "cols", "-n", NS, check=True).stdout.splitlines()
    assert out[0].split() == ["NAME", "PHASE", "ROUND", "ACCURACY", "EPSILON", "CLIENTS", "AGE"]
    assert out[1].split()[:6] == ["cols", "Running", "2", "0.875", "1.25", "3/3"]


def test_a_restarted_operator_recreates_missing_children(kube_api: Any, operator: Operator,
                                                         ) -> None:
    kube_api.apply(_job("resumed", simulation={"clients": 1}))
    _wait(kube_api, "fj", "resumed", ACCEPTED, operator)
    operator.stop()
    kube_api.delete("apps/v1/deployments", "resumed-coordinator", NS)
    kube_api.wait_gone("apps/v1/deployments", "resumed-coordinator", NS)
    operator.start()
    deployment = _wait(kube_api, "apps/v1/deployments", "resumed-coordinator", bool, operator)
    assert deployment["metadata"]["ownerReferences"][0]["name"] == "resumed"
    job = kube_api.get("fj", "resumed", NS)
    # Resuming did not reset what was already recorded.
    assert job["status"]["phase"] == "Pending"
    assert [c["type"] for c in job["status"]["conditions"]].count("SpecAccepted") == 1


def test_metrics_count_jobs_by_phase_and_handler_runs(kube_api: Any, operator: Operator) -> None:
    kube_api.apply(_job("m-good"))
    kube_api.apply(_job("m-bad", minClients=2, simulation={"clients": 1}))
    _wait(kube_api, "fj", "m-bad", REJECTED, operator)
    _wait(kube_api, "fj", "m-good", ACCEPTED, operator)
    deadline = time.monotonic() + 10
    while True:
        text = operator.metrics()
        if 'fedkube_operator_federatedjobs{phase="Failed"} 1.0' in text and (
                'fedkube_operator_federatedjobs{phase="Pending"} 1.0' in text):
            break
        assert time.monotonic() < deadline, text
        time.sleep(0.2)
    assert ('fedkube_operator_reconciliations_total{handler="create_job",'
            'outcome="permanent_error"} 1.0') in text
    assert ('fedkube_operator_reconciliations_total{handler="create_job",'
            'outcome="success"} 1.0') in text


def test_the_coordinators_own_conditions_survive_the_operator(kube_api: Any,
                                                              operator: Operator) -> None:
    kube_api.apply(_job("shared"))
    _wait(kube_api, "fj", "shared", ACCEPTED, operator)
    # The coordinator, through its real status writer, reports a condition of its own...
    status = FederatedJobStatus(phase=Phase.running, round=1)
    status.conditions = upsert_condition([], type="BudgetExhausted", status="False",
                                         reason="WithinBudget", message="epsilon 0.4 of 4",
                                         now="2026-01-01T00:00:00Z")
    _publish(kube_api, "shared", status)
    # ...while its pod is healthy: the operator marks it Ready and leaves the rest alone.
    kube_api.apply(_coordinator_pod("shared"))
    kube_api.patch("v1/pods", "shared-coordinator-7d9f-x2x", {"status": {
        "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
        namespace=NS, subresource="status")
    # A few more health checks (each reads the coordinator's Deployment), counted at the
    # API server rather than waited for by the clock.
    checks = threading.Semaphore(0)

    def count_health_checks(request: Any) -> None:
        access = audit.access_of(request)
        if access is not None and access.verb == "get" and access.resource == "deployments" \
                and access.name == "shared-coordinator":
            checks.release()

    kube_api.server.observers.append(count_health_checks)
    try:
        job = _wait(kube_api, "fj", "shared", _has_condition("Ready", "True"), operator)
        for _ in range(3):
            assert checks.acquire(timeout=60), operator.log()[-4000:]
    finally:
        kube_api.server.observers.remove(count_health_checks)
    job = kube_api.get("fj", "shared", NS)
    assert _has_condition("BudgetExhausted", "False", "WithinBudget")(job)
    assert _has_condition("SpecAccepted", "True", "Created")(job)
    assert job["status"]["phase"] == "Running"


def test_kubectl_wait_for_complete_returns_when_the_coordinator_finishes(
        kube_api: Any, kubectl: Any, operator: Operator) -> None:
    kube_api.apply(_job("waited"))
    _wait(kube_api, "fj", "waited", ACCEPTED, operator)
    waited: list[Any] = []
    waiter = threading.Thread(target=lambda: waited.append(kubectl(
        "wait", "--for=condition=Complete", "fj/waited", "-n", NS, "--timeout=60s",
        timeout=90)))
    waiter.start()
    _wait(kube_api, "fj", "waited", _has_condition("Ready", "False"), operator)
    _publish(kube_api, "waited", _finished("waited"))
    waiter.join(timeout=90)
    (result,) = waited
    assert result.returncode == 0, result.stderr
    assert "condition met" in result.stdout
