"""The operator scenario against a real cluster (kind, k3d, any kubeconfig).

Needs what CI lacks, so it is skipped with the reason unless given:

    kind create cluster
    docker build -t fedkube:dev . && kind load docker-image fedkube:dev
    FEDKUBE_KUBECONFIG=~/.kube/config FEDKUBE_IMAGE=fedkube:dev pytest -m cluster tests/e2e

The operator runs here, out of cluster, with that kubeconfig (as `fedkube operator` does
during development); the coordinator and agents run in the cluster from FEDKUBE_IMAGE.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from support import REPO, Processes, fedkube_command

KUBECONFIG = os.environ.get("FEDKUBE_KUBECONFIG")
IMAGE = os.environ.get("FEDKUBE_IMAGE")

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not (KUBECONFIG and IMAGE),
                       reason="needs a real cluster: set FEDKUBE_KUBECONFIG and FEDKUBE_IMAGE "
                       "(an image the cluster can pull); see this module's docstring"),
]


def _kubectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or "kubectl"
    return subprocess.run([binary, "--kubeconfig", str(KUBECONFIG), *args], input=stdin,
                          capture_output=True, text=True, check=False, timeout=120)


def test_apply_train_succeed_on_a_real_cluster(tmp_path: Path, processes: Processes) -> None:
    namespace = f"fedkube-e2e-{uuid.uuid4().hex[:6]}"
    assert _kubectl("create", "namespace", namespace).returncode == 0
    try:
        assert _kubectl("apply", "-f", str(REPO / "crds")).returncode == 0
        processes.start("operator", fedkube_command("operator", "--namespace", namespace,
                                                    "--liveness-port", "0"),
                        KUBECONFIG=str(KUBECONFIG), FEDKUBE_IMAGE=str(IMAGE))
        job = yaml.safe_load((REPO / "examples" / "digits-fedavg.yaml").read_text())
        job["spec"]["rounds"] = 3
        applied = _kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(job))
        assert applied.returncode == 0, applied.stderr

        deadline = time.monotonic() + 600
        status: dict = {}
        while time.monotonic() < deadline:
            got = _kubectl("get", "fj", "digits-fedavg", "-n", namespace, "-o", "json")
            status = json.loads(got.stdout).get("status", {}) if got.returncode == 0 else {}
            if status.get("phase") in ("Succeeded", "Failed"):
                break
            time.sleep(3)
        assert status.get("phase") == "Succeeded", (status, processes.log("operator")[-3000:])
        assert status["accuracy"] > 0.5
        nodes = json.loads(_kubectl("get", "cn", "-n", namespace, "-o", "json").stdout)
        assert len(nodes["items"]) == 10
    finally:
        _kubectl("delete", "namespace", namespace, "--wait=false")
