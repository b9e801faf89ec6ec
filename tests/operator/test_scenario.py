"""The user's path in a cluster, really run: `kubectl apply` a FederatedJob → the operator
creates the coordinator and agent pods → the local kubelet runs them as processes → agents
register over gRPC → ClientNodes appear → rounds advance in the status → Succeeded.

The API server is the emulator of tests/k8s; everything else is the product as shipped:
`fedkube operator`, `fedkube coordinator --kube`, `fedkube agent`, kubectl 1.37.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import OperatorProcess, free_port

pytestmark = pytest.mark.timeout(300)

NS = "default"
TARGET_EPSILON = 8.0


def _manifest(path: Path, name: str, **spec: Any) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
        "metadata": {"name": name},
        "spec": {
            "model": "mlp", "data": {"dataset": "digits"},
            # Every pod of the local kubelet shares the loopback: a free port per test.
            "coordinator": {"port": free_port()},
            **spec,
        }}))
    return path


def _diagnose(kube_api: Any, operator: OperatorProcess, kubelet: Any, job: str) -> str:
    parts = [f"--- job ---\n{yaml.safe_dump(kube_api.get('fj', job, namespace=NS))}",
             f"--- operator ---\n{operator.log()[-3000:]}"]
    for pod in kube_api.list("v1/pods", NS):
        name = pod["metadata"]["name"]
        parts.append(f"--- pod {name} ---\n{kubelet.logs(name)[-2500:]}")
    return "\n".join(parts)


PHASE_ORDER = ["Pending", "Running", "Succeeded"]


def _committed_statuses(kube_api: Any, job: str) -> list[dict[str, Any]]:
    """The job's status after each write the API server committed, oldest first."""
    key = kube_api.resource("fj").key
    changes = kube_api.call(lambda: list(kube_api.server.changes))
    return [c.object.get("status") or {} for c in changes
            if c.resource == key and c.name == job and c.namespace == NS]


def _wait(kube_api, operator, kubelet, job, what, predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n"
                         f"{_diagnose(kube_api, operator, kubelet, job)}")


def test_apply_train_watch_succeed(tmp_path: Path, kube_api: Any, kubectl: Any,
                                   operator: OperatorProcess, local_kubelet: Any) -> None:
    job = "digits-dp"
    manifest = _manifest(
        tmp_path / "job.yaml", job, rounds=3, clientsPerRound=3, minClients=2,
        localEpochs=2, batchSize=32, learningRate=0.2, roundTimeoutSeconds=60,
        simulation={"clients": 3},
        privacy={"mode": "local", "targetEpsilon": TARGET_EPSILON, "delta": 1e-5})
    def status() -> dict[str, Any]:
        return (kube_api.get("fj", job, namespace=NS) or {}).get("status") or {}

    applied = kubectl("apply", "-f", str(manifest))
    assert applied.returncode == 0, applied.stderr
    assert f"federatedjob.fedkube.io/{job} created" in applied.stdout

    def client_nodes() -> list[dict[str, Any]]:
        return kube_api.list("cn", NS, label_selector=f"fedkube.io/job={job}")

    # An agent registers before it has loaded its data (the job spec comes with the
    # registration reply), then reports its data size: wait for the latter.
    nodes = _wait(kube_api, operator, local_kubelet, job, "three ClientNodes with data",
                  lambda: (len(found := client_nodes()) == 3
                           and all(n["spec"]["dataSize"] > 0 for n in found) and found),
                  timeout=120)
    assert {n["spec"]["device"] for n in nodes} == {"cpu"}

    # A user's way to block until the job is done: kubectl wait on the terminal condition.
    waited: list[Any] = []
    waiter = threading.Thread(target=lambda: waited.append(kubectl(
        "wait", "--for=condition=Complete", f"fj/{job}", "--timeout=200s", timeout=230)))
    waiter.start()
    _wait(kube_api, operator, local_kubelet, job, "the job to finish",
          lambda: status().get("phase") in ("Succeeded", "Failed"), timeout=200)
    waiter.join(timeout=60)
    assert waited and waited[0].returncode == 0, waited and waited[0].stderr
    assert f"federatedjob.fedkube.io/{job} condition met" in waited[0].stdout
    final = status()
    assert final["phase"] == "Succeeded", _diagnose(kube_api, operator, local_kubelet, job)
    assert final["round"] == 3
    # What `kubectl get fj -w` was shown: every status the API server committed, in order
    # (its change log, not a poller that a busy machine can put to sleep past a state).
    # The coordinator coalesces bursts of status writes, so a quick round (even all of
    # them, and the dispatch before) may never be committed on its own; what must hold is
    # that the job was visibly Running with its clients registering one by one before it
    # ended, and that phase, round and registrations never went back.
    history = _committed_statuses(kube_api, job)
    phases = [s["phase"] for s in history if s.get("phase")]
    assert phases == sorted(phases, key=PHASE_ORDER.index), phases
    assert phases[-1] == "Succeeded", phases
    running = [s for s in history if s.get("phase") == "Running"]
    registered = [s.get("clients", {}).get("registered", 0) for s in running]
    assert registered and max(registered) == 3, running
    assert registered == sorted(registered), registered
    rounds = [s.get("round", 0) for s in history]
    assert rounds == sorted(rounds), rounds
    assert final["accuracy"] > 0.3  # ten classes: chance is 0.1
    assert 0 < final["epsilon"] <= TARGET_EPSILON
    assert final["targetEpsilon"] == TARGET_EPSILON
    assert final["completionTime"] and final["endpoint"].startswith(f"{job}-coordinator.")
    by_type = {c["type"]: c for c in final["conditions"]}
    assert (by_type["Complete"]["status"], by_type["Complete"]["reason"]) == (
        "True", "RoundsCompleted")
    assert "Failed" not in by_type and by_type["SpecAccepted"]["status"] == "True"

    # What `kubectl get fj` shows a user: every printer column filled in.
    table = kubectl("get", "fj", job)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "ROUND", "ACCURACY", "EPSILON", "CLIENTS", "AGE"]
    name, phase, round_, accuracy, epsilon, clients, _age = row.split()
    assert (name, phase, round_) == (job, "Succeeded", "3")
    assert float(accuracy) == pytest.approx(final["accuracy"])
    assert float(epsilon) == pytest.approx(final["epsilon"])
    assert clients.endswith("/3")

    # Each device's spent budget for this job, on its ClientNode.
    for node in client_nodes():
        spent = node["status"]["privacy"][job]
        assert 0 < spent["epsilon"] <= TARGET_EPSILON
        assert spent["delta"] == pytest.approx(1e-5)
        assert node["status"]["roundsParticipated"] >= 2
    cn_table = kubectl("get", "cn")
    assert cn_table.stdout.split()[:7] == ["NAME", "DEVICE", "PHASE", "LAST-SEEN", "ROUNDS",
                                           "SUSPICION", "AGE"], cn_table.stdout

    # The finished job keeps its manifest and results, not its pods.
    _wait(kube_api, operator, local_kubelet, job, "pods cleaned up",
          lambda: not kube_api.list("v1/pods", NS, label_selector=f"fedkube.io/job={job}"),
          timeout=60)
    assert kube_api.get("v1/configmaps", f"{job}-spec", namespace=NS) is not None
    assert kube_api.get("apps/v1/deployments", f"{job}-coordinator", namespace=NS) is None


def test_delete_running_job_removes_its_children_and_agents_go_offline(
        tmp_path: Path, kube_api: Any, kubectl: Any, operator: OperatorProcess,
        local_kubelet: Any) -> None:
    job = "long-job"
    manifest = _manifest(
        tmp_path / "job.yaml", job, rounds=500, clientsPerRound=2, minClients=1,
        localEpochs=1, batchSize=32, roundTimeoutSeconds=60, simulation={"clients": 2})
    assert kubectl("apply", "-f", str(manifest)).returncode == 0

    def running_round() -> int:
        status = (kube_api.get("fj", job, namespace=NS) or {}).get("status") or {}
        return status.get("round", 0) if status.get("phase") == "Running" else 0

    _wait(kube_api, operator, local_kubelet, job, "a round", running_round, timeout=120)

    # An agent that stops: its pod is deleted, the kubelet kills the process, the
    # coordinator no longer hears its heartbeat, and the operator marks its node Offline.
    victim = f"{job}-agent-1"
    assert kubectl("delete", "pod", victim, "--wait=false").returncode == 0
    _wait(kube_api, operator, local_kubelet, job, "its ClientNode Offline",
          lambda: any(n["spec"]["nodeId"] == victim
                      and (n.get("status") or {}).get("phase") == "Offline"
                      for n in kube_api.list("cn", NS)), timeout=90)

    deleted = kubectl("delete", "fj", job, "--wait=false")
    assert deleted.returncode == 0, deleted.stderr

    def nothing_left() -> bool:
        owned = [kube_api.list(kind, NS, label_selector=f"fedkube.io/job={job}")
                 for kind in ("v1/pods", "v1/services", "v1/configmaps", "apps/v1/deployments",
                              "cn")]
        return not any(owned) and kube_api.get("fj", job, namespace=NS) is None

    _wait(kube_api, operator, local_kubelet, job, "everything the job owned to go",
          nothing_left, timeout=60)


@pytest.mark.slow  # a job of 3 agent pods run until an attacker was caught, left out, released
@pytest.mark.timeout(600)
def test_an_attacker_is_quarantined_left_out_and_released_by_removing_its_label(
        tmp_path: Path, kube_api: Any, kubectl: Any, operator: OperatorProcess,
        local_kubelet: Any) -> None:
    job = "byzantine"
    manifest = _manifest(
        tmp_path / "job.yaml", job, rounds=500, clientsPerRound=3, minClients=2,
        localEpochs=1, batchSize=64, roundTimeoutSeconds=60,
        admission={"normBoundFactor": None},
        robustness={"quarantineThreshold": 0.5, "quarantineRounds": 1000},
        simulation={"clients": 3, "attackers": {"fraction": 0.34, "kind": "signflip"}})
    assert kubectl("apply", "-f", str(manifest)).returncode == 0

    def nodes() -> dict[str, dict[str, Any]]:
        return {n["metadata"]["name"]: n for n in kube_api.list(
            "cn", NS, label_selector=f"fedkube.io/job={job}")}

    def job_status() -> dict[str, Any]:
        return (kube_api.get("fj", job, namespace=NS) or {}).get("status") or {}

    def quarantined() -> list[str]:
        return [name for name, n in nodes().items()
                if (n.get("status") or {}).get("phase") == "Quarantined"]

    held = _wait(kube_api, operator, local_kubelet, job, "a Quarantined ClientNode",
                 quarantined, timeout=180)
    assert len(held) == 1
    name = held[0]
    node = nodes()[name]
    assert node["metadata"]["labels"]["fedkube.io/quarantined"] == "true"
    assert "quarantineThreshold 0.5" in node["status"]["quarantineReason"]
    assert node["status"]["suspicion"] >= 0.5
    _wait(kube_api, operator, local_kubelet, job, "the job to count it",
          lambda: job_status().get("clients", {}).get("quarantined") == 1, timeout=60)
    node_id = node["spec"]["nodeId"]
    _wait(kube_api, operator, local_kubelet, job, "a Quarantined event",
          lambda: any(e["reason"] == "Quarantined" and e["message"].startswith(node_id)
                      for e in kube_api.events(NS)), timeout=120)

    # Left out of selection: the others keep training, its rounds stand still.
    before = {n: (o.get("status") or {}).get("roundsParticipated", 0)
              for n, o in nodes().items()}
    _wait(kube_api, operator, local_kubelet, job, "two more rounds without it",
          lambda: all((o.get("status") or {}).get("roundsParticipated", 0) >= before[n] + 2
                      for n, o in nodes().items() if n != name), timeout=120)
    assert nodes()[name]["status"]["roundsParticipated"] == before[name]
    assert quarantined() == [name]

    # A user releases it: it is selected again (and, attacking still, caught again).
    released = kubectl("label", "cn", name, "fedkube.io/quarantined-")
    assert released.returncode == 0, released.stderr
    _wait(kube_api, operator, local_kubelet, job, "it to train again",
          lambda: nodes()[name]["status"]["roundsParticipated"] > before[name], timeout=120)
    _wait(kube_api, operator, local_kubelet, job, "a QuarantineReleased event",
          lambda: any(e["reason"] == "QuarantineReleased" and "label" in e["message"]
                      for e in kube_api.events(NS)), timeout=120)
    assert kubectl("delete", "fj", job, "--wait=false").returncode == 0
