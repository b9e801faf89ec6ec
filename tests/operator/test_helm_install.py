"""The README's Kubernetes path, the way a cluster admin runs it: the real `helm` installs
the chart into the test API server; the local kubelet runs the operator's pod from the
chart's own Deployment (its command, args, env, service account); `kubectl apply` the
example job; `kubectl wait` for it; `kubectl get fj` and `kubectl get cn` show their
columns; `helm uninstall` removes the operator and keeps the CRDs, as the chart documents.

RBAC is not enforced by the emulator; the request audit of conftest.py decides every call
the operator pod (as the chart's service account, bound by the chart's ClusterRoleBinding)
and the coordinator pod (as its job's service account) make, and fails the test on any
that a real cluster would refuse.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s import audit
from support import REPO, free_port, helm_binary

pytestmark = pytest.mark.timeout(900)

RELEASE, NAMESPACE = "fedkube", "fedkube"  # README: helm install fedkube ... --namespace fedkube
EXAMPLE = REPO / "examples" / "digits-fedavg.yaml"
JOB = "digits-fedavg"


def _helm(kube_api: Any, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        binary = helm_binary()
    except RuntimeError as error:
        pytest.fail(str(error))
    env = {**os.environ, "KUBECONFIG": str(kube_api.kubeconfig),
           **{f"HELM_{kind}_HOME": str(home / kind.lower()) for kind in ("CACHE", "CONFIG",
                                                                        "DATA")}}
    return subprocess.run([binary, *args], capture_output=True, text=True, env=env,
                          timeout=180, check=False)


def _example(**spec: Any) -> str:
    """examples/digits-fedavg.yaml as written but for `spec` (merged into its spec): every
    pod of the local kubelet shares this machine's loopback, so the coordinator takes a
    free port."""
    manifest = yaml.safe_load(EXAMPLE.read_text())
    for key, value in spec.items():
        manifest["spec"][key] = ({**manifest["spec"].get(key, {}), **value}
                                 if isinstance(value, dict) else value)
    return yaml.safe_dump(manifest)


def _ok(result: subprocess.CompletedProcess[str], what: str, diagnose: Any = "") -> str:
    assert result.returncode == 0, (f"{what} failed ({result.returncode}):\n{result.stdout}\n"
                                    f"{result.stderr}\n{diagnose() if callable(diagnose) else ''}")
    return result.stdout


def _table(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().splitlines()]


# The example as written trains 10 agent pods: too many processes for the default suite
# on a shared machine, so that run is `slow`; the default one trims clients and rounds.
LIGHTER = {"simulation": {"clients": 3}, "clientsPerRound": 3, "minClients": 2, "rounds": 3}


@pytest.mark.parametrize("changes", [
    pytest.param(LIGHTER, id="three-clients"),
    pytest.param({}, id="as-written", marks=pytest.mark.slow),
])
def test_helm_install_run_the_example_and_uninstall(kube_api: Any, kubectl: Any,
                                                     local_kubelet: Any, tmp_path: Path,
                                                     changes: dict[str, Any]) -> None:
    def diagnose() -> str:
        parts = []
        for pod in kube_api.list("v1/pods", None):
            meta = pod["metadata"]
            parts.append(f"--- pod {meta['namespace']}/{meta['name']} "
                         f"{pod.get('status', {}).get('phase')} ---\n"
                         f"{local_kubelet.logs(meta['name'], namespace=meta['namespace'])[-3000:]}")
        job = kube_api.get("fj", JOB, "default")
        return "\n".join([*parts, f"--- job ---\n{yaml.safe_dump(job)}"])

    # Every port on the one loopback is shared with the rest of the machine: free ones.
    ports = [f"healthPort={free_port()}", f"metrics.port={free_port()}",
             f"coordinator.metricsPort={free_port()}"]
    installed = _ok(_helm(kube_api, tmp_path / "helm", "install", RELEASE,
                          str(REPO / "helm" / "fedkube"), "--namespace", NAMESPACE,
                          "--create-namespace", *[a for p in ports for a in ("--set", p)]),
                    "helm install")
    assert "STATUS: deployed" in installed
    _ok(kubectl("-n", NAMESPACE, "wait", "--for=condition=Available",
                "deployment/fedkube-operator", "--timeout=240s", timeout=260),
        "the chart's operator Deployment becoming Available", diagnose)
    operator_pod = kube_api.list("v1/pods", NAMESPACE)[0]
    container = operator_pod["spec"]["containers"][0]
    assert container["command"] == ["fedkube"] and "operator" in container["args"]
    assert operator_pod["spec"]["serviceAccountName"] == "fedkube"

    clients = changes.get("simulation", {}).get("clients", 10)
    _ok(kubectl("apply", "-f", "-", input=_example(coordinator={"port": free_port()}, **changes)),
        "kubectl apply the example")
    _ok(kubectl("wait", "--for=jsonpath={.status.phase}=Succeeded", f"fj/{JOB}",
                "--timeout=600s", timeout=620), "the job succeeding", diagnose)
    # The coordinator's terminal condition, as in Kubeflow's TrainJob.
    _ok(kubectl("wait", "--for=condition=Complete", f"fj/{JOB}", "--timeout=60s", timeout=80),
        "kubectl wait --for=condition=Complete", diagnose)

    jobs = _table(_ok(kubectl("get", "fj"), "kubectl get fj"))
    assert jobs[0] == ["NAME", "PHASE", "ROUND", "ACCURACY", "EPSILON", "CLIENTS", "AGE"]
    assert jobs[1][:2] == [JOB, "Succeeded"]
    nodes = _table(_ok(kubectl("get", "cn"), "kubectl get cn"))
    assert nodes[0] == ["NAME", "DEVICE", "PHASE", "LAST-SEEN", "ROUNDS", "SUSPICION", "AGE"]
    assert len(nodes) == 1 + clients and all(row[1] == "cpu" for row in nodes[1:])

    # Both of fedkube's workloads really talked to the API, each as its own account.
    users = {d.access.user for d in kube_api.audit.decisions}
    assert audit.service_account_user(NAMESPACE, "fedkube") in users
    assert audit.service_account_user("default", f"{JOB}-coordinator") in users

    uninstalled = _ok(_helm(kube_api, tmp_path / "helm", "uninstall", RELEASE, "--namespace",
                            NAMESPACE), "helm uninstall")
    assert "federatedjobs.fedkube.io" in uninstalled  # "kept due to the resource policy"
    kube_api.wait_gone("apps/v1/deployments", "fedkube-operator", NAMESPACE, timeout=60)
    kube_api.wait_gone("v1/pods", operator_pod["metadata"]["name"], NAMESPACE, timeout=60)
    assert kube_api.list("rbac.authorization.k8s.io/v1/clusterroles") == []
    crds = _ok(kubectl("get", "crd", "-o", "name"), "kubectl get crd").split()
    assert sorted(crds) == ["customresourcedefinition.apiextensions.k8s.io/clientnodes.fedkube.io",
                            "customresourcedefinition.apiextensions.k8s.io/federatedjobs.fedkube.io"]
    assert kube_api.get("fj", JOB, "default")["status"]["phase"] == "Succeeded"  # jobs stay
    listed = _ok(_helm(kube_api, tmp_path / "helm", "list", "--all-namespaces"), "helm list")
    assert RELEASE not in listed.split()
