"""A local kubelet: runs the Pods of a test API server as processes on this machine.

:class:`LocalKubelet` watches Pods (and Deployments) over the API server's HTTP API, as a
kubelet and the controller manager would, and for each Pod in its namespaces:

- prepares volumes under ``<workdir>/pods/<namespace>/<pod>-<uid8>/volumes/<name>``:
  ``configMap`` and ``secret`` (all keys or ``items``; until the object exists, unless
  ``optional``, the Pod stays Pending with its containers ``ContainerCreating``), ``emptyDir``, ``persistentVolumeClaim`` (one folder per claim that outlives
  the pod, ``<workdir>/claims/<namespace>/<claim>``) and ``hostPath`` (the host path itself);
- gives each container a root folder ``<pod dir>/<container>/root`` in which every
  ``mountPath`` is a symlink to its volume (``subPath`` honoured), and exposes that root as
  ``FEDKUBE_PATH_PREFIX``. **The path rule:** in the container's command, args, env values
  and workingDir, every path that starts with a mountPath (at the start of the string or
  after a character that cannot be part of a path, such as ``'``, ``=``, ``:`` or a space)
  is prefixed with the container root, so ``--job /etc/fedkube/job.yaml`` becomes
  ``--job <root>/etc/fedkube/job.yaml`` and ``open('/etc/cfg/x')`` inside ``python -c`` works.
  Paths inside mounted files are not rewritten; code may map them with the prefix itself;
- resolves Services by rewriting host names, because every Pod's IP is 127.0.0.1 and a
  container listens on its own ports on loopback. **The host rule:** ``<svc>.<ns>.svc
  .cluster.local``, ``<svc>.<ns>.svc`` and ``<svc>.<ns>`` anywhere (bounded by non-host
  characters), and the bare ``<svc>`` of the Pod's namespace when followed by ``:<port>``
  or as a whole env value, become ``127.0.0.1``; a following service port becomes the
  target port (a named ``targetPort`` is looked up in the Pods the Service selects). Unless
  ``enableServiceLinks: false``, ``<SVC>_SERVICE_HOST``/``_PORT`` are set as a kubelet does;
- resolves the command: ``fedkube`` is ``[sys.executable, -P, -m, fedkube.runtime.cli]``,
  ``python``/``python3`` is ``sys.executable``, no command means the image entrypoint (the
  ``entrypoint`` argument, ``fedkube`` by default); ``$(VAR)`` references are expanded;
- sets env: the test process's environment, then ``HOSTNAME``, ``KUBECONFIG`` (the test API
  server: in-cluster config fails here, so clients fall back to it), ``PYTHONUNBUFFERED``,
  ``FEDKUBE_PATH_PREFIX``, service links, ``envFrom``, then ``env`` with ``value`` or
  ``valueFrom`` (``fieldRef`` metadata.name/namespace/uid/labels/annotations, spec.nodeName,
  spec.serviceAccountName, status.podIP/hostIP; ``secretKeyRef``; ``configMapKeyRef``);
- runs init containers one after another, then the containers, each in its own process
  group with stdout and stderr appended to ``<pod dir>/<container>.log`` (also served as
  ``kubectl logs``); restarts them by ``restartPolicy`` (Always by default, OnFailure,
  Never) with a short back-off, showing ``CrashLoopBackOff`` and ``lastState`` meanwhile;
- runs readiness probes (tcpSocket, httpGet, exec; periods capped at 1 s so tests stay
  fast): a container is ready once its probe passes, or at start when it has none;
- reports through the ``status`` subresource: phase Pending → Running → Succeeded/Failed,
  ``podIP``/``hostIP`` 127.0.0.1, ``startTime``, conditions (PodScheduled, Initialized,
  ContainersReady, Ready) and ``containerStatuses`` (state, lastState, ready, restartCount);
- on deletion (or ``deletionTimestamp``) sends SIGTERM to each process group, then SIGKILL
  after the grace period (``terminationGracePeriodSeconds``, capped by ``grace_cap``).

Deployments get a minimal controller: one Pod per replica built from the template (owned
by the Deployment directly: there are no ReplicaSets), labelled ``pod-template-hash``;
Pods that ended or that come from an older template are deleted and replaced (so the
strategy is always Recreate); ``status`` reports replicas, ready, available, updated and
the Available condition. Not emulated: liveness and startup probes, resource limits,
securityContext (users, read-only root), images (every container runs this checkout),
network isolation (every port is on the one loopback), node selection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import aiohttp

from . import audit, machinery
from .apiserver import KubeApi

Obj = dict[str, Any]

FEDKUBE_COMMAND = (sys.executable, "-P", "-m", "fedkube.runtime.cli")
_PYTHONS = frozenset({"python", "python3", "/usr/bin/python3", "/usr/local/bin/python",
                      "/usr/local/bin/python3", "/usr/bin/python"})
_TERMINAL = frozenset({"Succeeded", "Failed"})


def _now() -> str:
    return machinery.format_time(datetime.now(UTC))


class ApiError(RuntimeError):
    """An API request the server refused (other than 404)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------- pure helpers


def resolve_command(command: Sequence[str], entrypoint: Sequence[str] = ("fedkube",),
                    ) -> list[str]:
    """The local argv of a container's command (args already appended)."""
    argv = list(command) or list(entrypoint)
    if argv[0] == "fedkube":
        return [*FEDKUBE_COMMAND, *argv[1:]]
    if argv[0] in _PYTHONS:
        return [sys.executable, *argv[1:]]
    return argv


def expand_references(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known variables are replaced, ``$$`` escapes a ``$``,
    unknown references stay as written."""
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, text)


@dataclass(frozen=True)
class Rewriter:
    """Applies the path rule and the host rule of the module docstring to one string."""

    root: str
    mount_paths: tuple[str, ...] = ()
    hosts: Mapping[str, Mapping[int, int]] = field(default_factory=dict)  # anywhere
    short_hosts: Mapping[str, Mapping[int, int]] = field(default_factory=dict)  # with a port

    def __call__(self, text: str, *, whole_value_hosts: bool = False) -> str:
        if whole_value_hosts and text in self.short_hosts:
            return "127.0.0.1"
        if self.mount_paths:
            paths = sorted({p.rstrip("/") or "/" for p in self.mount_paths}, key=len, reverse=True)
            pattern = r"(?<![\w./-])(?:" + "|".join(map(re.escape, paths)) + r")(?![\w.-])"
            text = re.sub(pattern, lambda m: self.root + m.group(0), text)
        for names, needs_port in ((self.hosts, False), (self.short_hosts, True)):
            if not names:
                continue
            alternatives = "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
            port = r"(?::(\d+))" + ("" if needs_port else "?")
            pattern = rf"(?<![\w.-])({alternatives}){port}(?![\w.-]|:\d)"
            text = re.sub(pattern, lambda m, names=names: _loopback(m, names), text)
        return text


def _loopback(match: re.Match[str], names: Mapping[str, Mapping[int, int]]) -> str:
    if match.group(2) is None:
        return "127.0.0.1"
    port = int(match.group(2))
    return f"127.0.0.1:{names[match.group(1)].get(port, port)}"


def service_ports(service: Obj, pods: Sequence[Obj]) -> dict[int, int]:
    """Service port → the port its Pods listen on (named target ports looked up in the
    containers of the Pods the Service selects)."""
    selector = machinery.selector_from_spec({"matchLabels": service["spec"].get("selector")})
    named: dict[str, int] = {}
    for pod in pods:
        if service["spec"].get("selector") and machinery.labels_match(
                selector, pod["metadata"].get("labels")):
            for container in pod["spec"].get("containers") or []:
                for port in container.get("ports") or []:
                    if port.get("name"):
                        named.setdefault(port["name"], port["containerPort"])
    ports = {}
    for port in service["spec"].get("ports") or []:
        target = port.get("targetPort", port["port"])
        ports[port["port"]] = named.get(target, port["port"]) if isinstance(target, str) else target
    return ports


def template_hash(template: Mapping[str, Any]) -> str:
    """A stable label value for a Pod template, like the ``pod-template-hash`` label."""
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()
    return digest[:10]


def pod_phase(statuses: Sequence[Obj], started: bool) -> str:
    """Phase from container statuses: Pending until every container has started, Running
    while one runs or waits to restart, then Succeeded (all exited 0) or Failed."""
    if not started or not statuses:
        return "Pending"
    states = [s["state"] for s in statuses]
    if any("terminated" not in state for state in states):
        return "Running"
    return "Succeeded" if all(s["terminated"]["exitCode"] == 0 for s in states) else "Failed"


# ----------------------------------------------------------------- a running pod


@dataclass
class _PodRun:
    pod: Obj
    dir: Path
    task: asyncio.Task[None] | None = None
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    statuses: dict[str, Obj] = field(default_factory=dict)
    init_statuses: dict[str, Obj] = field(default_factory=dict)
    launched: set[str] = field(default_factory=set)  # containers started at least once
    initialized: bool = False
    reason: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def started(self) -> bool:
        return all(c["name"] in self.launched for c in self.pod["spec"]["containers"])

    @property
    def namespace(self) -> str:
        return self.pod["metadata"]["namespace"]

    @property
    def name(self) -> str:
        return self.pod["metadata"]["name"]


class LocalKubelet:
    """Runs Pods of ``api`` (in ``namespaces``, or all when None) as local processes.

    ``entrypoint`` is the image's entrypoint for containers without a ``command``; ``env``
    is added to every container's environment; ``grace_cap`` caps the seconds between
    SIGTERM and SIGKILL. Call :meth:`start`, then :meth:`stop` (kills everything).
    """

    def __init__(
        self,
        api: KubeApi,
        workdir: Path,
        *,
        namespaces: Collection[str] | None = None,
        entrypoint: Sequence[str] = ("fedkube",),
        env: Mapping[str, str] | None = None,
        grace_cap: float = 3.0,
    ) -> None:
        self.api = api
        self.workdir = Path(workdir)
        self.namespaces = None if namespaces is None else frozenset(namespaces)
        self.entrypoint = tuple(entrypoint)
        self.env = dict(env or {})
        self.grace_cap = grace_cap
        self.errors: list[BaseException] = []  # failures of the kubelet itself, for tests
        self._runs: dict[str, _PodRun] = {}  # by pod uid
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._dirty: asyncio.Event | None = None
        self._ready = threading.Event()
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> LocalKubelet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()),
                                        name="local-kubelet", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the local kubelet did not start")
        self.api.server.log_reader = self.read_log
        return self

    def stop(self) -> None:
        """Kill every container (SIGTERM, then SIGKILL) and stop watching."""
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=self.grace_cap + 15)
        self._thread = None
        if getattr(self.api, "server", None) is not None and (
                self.api.server.log_reader == self.read_log):
            self.api.server.log_reader = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop, self._dirty = asyncio.Event(), asyncio.Event()
        # Big enough for any one watch event on a line (aiohttp's default is 64 KiB).
        self._session = aiohttp.ClientSession(
            self.api.url, read_bufsize=2**24,
            headers={"Authorization": f"Bearer {audit.KUBELET_TOKEN}"})
        tasks = [asyncio.create_task(self._watch("/api/v1/pods", self._on_pod)),
                 asyncio.create_task(self._watch("/apis/apps/v1/deployments", self._on_change)),
                 asyncio.create_task(self._control_deployments())]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            # Cancelling a pod's task kills its processes (SIGTERM, then SIGKILL).
            pods = [run.task for run in self._runs.values() if run.task is not None]
            for task in [*tasks, *pods]:
                task.cancel()
            await asyncio.gather(*tasks, *pods, return_exceptions=True)
            await self._session.close()

    # ------------------------------------------------------------- deployments

    async def _control_deployments(self) -> None:
        """Reconcile every Deployment on each change of a Deployment or Pod (and each second)."""
        assert self._dirty is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), 1.0)
            self._dirty.clear()
            try:
                deployments = await self._call("GET", "/apis/apps/v1/deployments")
                pods = await self._call("GET", "/api/v1/pods")
                assert deployments is not None and pods is not None
                for deployment in deployments["items"]:
                    if self._in_scope(deployment) and not deployment["metadata"].get(
                            "deletionTimestamp"):
                        await self._reconcile(deployment, pods["items"])
            except ApiError as exc:
                if exc.status not in (403, 409):  # a namespace going away, a lost race
                    self.errors.append(exc)
            except Exception as exc:  # noqa: BLE001 -- kept in .errors, retried on the next change
                self.errors.append(exc)

    async def _reconcile(self, deployment: Obj, pods: Sequence[Obj]) -> None:
        meta, spec = deployment["metadata"], deployment["spec"]
        namespace, uid = meta["namespace"], meta["uid"]
        wanted = template_hash(spec["template"])
        owned = [p for p in pods if p["metadata"]["namespace"] == namespace
                 and not p["metadata"].get("deletionTimestamp")
                 and any(ref.get("uid") == uid for ref in p["metadata"].get("ownerReferences")
                         or [])]
        keep = [p for p in owned if (p["metadata"].get("labels") or {}).get(
            "pod-template-hash") == wanted and (p.get("status") or {}).get("phase") not in
            _TERMINAL]
        replicas = spec.get("replicas", 1)
        gone = [p for p in owned if p not in keep[:replicas]]
        for pod in gone:
            await self._call("DELETE", f"/api/v1/namespaces/{namespace}/pods/"
                             f"{pod['metadata']['name']}")
        # Recreate: old containers stop before new ones start (they may share a port).
        stopping = [task for p in gone if (run := self._runs.get(p["metadata"]["uid"]))
                    and (task := run.task) is not None]
        if stopping:
            await asyncio.wait(stopping, timeout=self.grace_cap + 2)
        keep = keep[:replicas]
        for _ in range(replicas - len(keep)):
            created = await self._call("POST", f"/api/v1/namespaces/{namespace}/pods",
                                       pod_from_template(deployment, wanted))
            assert created is not None
            keep.append(created)
        ready = sum(map(is_ready, keep))
        previous = {c["type"]: c for c in (deployment.get("status") or {}).get("conditions")
                    or []}
        status = {
            "observedGeneration": meta.get("generation", 1), "replicas": len(keep),
            "updatedReplicas": len(keep), "readyReplicas": ready, "availableReplicas": ready,
            "unavailableReplicas": len(keep) - ready,
            "conditions": [_condition("Available", ready >= replicas, previous),
                           _condition("Progressing", True, previous)],
        }
        await self._call("PATCH", f"/apis/apps/v1/namespaces/{namespace}/deployments/"
                         f"{meta['name']}/status", {"status": status},
                         "application/merge-patch+json")

    # -------------------------------------------------------------------- logs

    def log_path(self, pod: str, container: str | None = None, namespace: str = "default",
                 ) -> Path:
        """Where a container's output goes (the first container when ``container`` is None)."""
        for run in reversed(list(self._runs.values())):  # the latest pod of that name
            if (run.name, run.namespace) == (pod, namespace):
                containers = [c["name"] for c in run.pod["spec"]["containers"]]
                return run.dir / f"{container or containers[0]}.log"
        raise KeyError(f"the kubelet has not run pod {namespace}/{pod}")

    def logs(self, pod: str, container: str | None = None, namespace: str = "default") -> str:
        """A container's output so far ("" before it has written anything)."""
        path = self.log_path(pod, container, namespace)
        return path.read_text(errors="replace") if path.exists() else ""

    def read_log(self, namespace: str, pod: str, container: str | None) -> str | None:
        try:
            return self.logs(pod, container, namespace)
        except KeyError:
            return None

    # --------------------------------------------------------------- API calls

    async def _call(self, method: str, path: str, body: Any = None,
                    content_type: str = "application/json") -> Obj | None:
        """One API request; the JSON reply, or None on 404 (the object went away)."""
        assert self._session is not None
        data = None if body is None else json.dumps(body)
        async with self._session.request(method, path, data=data,
                                         headers={"Content-Type": content_type}) as response:
            if response.status == 404:
                return None
            if response.status >= 400:
                raise ApiError(response.status, f"{method} {path}: {response.status} "
                               f"{await response.text()}")
            return await response.json()

    async def _watch(self, path: str, handle: Any) -> None:
        """List, then watch from the list's resourceVersion; reconnect from the last version
        seen, and list again after anything unexpected (which goes to ``errors``)."""
        assert self._session is not None
        version: str | None = None
        while True:
            try:
                if version is None:
                    listing = await self._call("GET", path)
                    assert listing is not None
                    version = listing["metadata"]["resourceVersion"]
                    for obj in listing["items"]:
                        await self._guarded(handle, "ADDED", obj)
                async with self._session.get(path, params={
                        "watch": "true", "resourceVersion": version},
                        timeout=aiohttp.ClientTimeout(total=None)) as response:
                    async for line in response.content:
                        event = json.loads(line) if line.strip() else {}
                        if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                            version = event["object"]["metadata"]["resourceVersion"]
                            await self._guarded(handle, event["type"], event["object"])
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.1)
            except Exception as exc:  # noqa: BLE001 -- a kubelet that stops watching is worse
                self.errors.append(exc)
                version = None
                await asyncio.sleep(0.1)

    async def _guarded(self, handle: Any, kind: str, obj: Obj) -> None:
        try:
            await handle(kind, obj)
        except Exception as exc:  # noqa: BLE001 -- one bad object must not stop the kubelet
            self.errors.append(exc)

    def _in_scope(self, obj: Obj) -> bool:
        return self.namespaces is None or obj["metadata"].get("namespace") in self.namespaces

    async def _on_change(self, kind: str, obj: Obj) -> None:
        assert self._dirty is not None
        self._dirty.set()

    # -------------------------------------------------------------------- pods

    async def _on_pod(self, kind: str, pod: Obj) -> None:
        await self._on_change(kind, pod)
        if not self._in_scope(pod):
            return
        uid = pod["metadata"]["uid"]
        run = self._runs.get(uid)
        if kind == "DELETED" or pod["metadata"].get("deletionTimestamp"):
            if run is not None and run.task is not None and not run.task.done():
                run.task.cancel()
            return
        if run is None and (pod.get("status") or {}).get("phase") not in _TERMINAL:
            meta = pod["metadata"]
            folder = self.workdir / "pods" / meta["namespace"] / f"{meta['name']}-{uid[:8]}"
            run = self._runs[uid] = _PodRun(pod, folder)
            run.task = asyncio.create_task(self._run_pod(run))
        elif run is not None:
            run.pod = pod

    async def _run_pod(self, run: _PodRun) -> None:
        try:
            run.dir.mkdir(parents=True, exist_ok=True)
            containers = run.pod["spec"]["containers"]
            run.statuses = {c["name"]: _container_status(c, 0) for c in containers}
            await self._publish(run)  # ContainerCreating, while volumes wait for their sources
            volumes = await self._prepare_volumes(run)
            spec = run.pod["spec"]
            for init in spec.get("initContainers") or []:
                code = await self._supervise(run, init, volumes, init=True)
                if code != 0:
                    run.reason = f"init container {init['name']} exited with {code}"
                    await self._publish(run)
                    return
            run.initialized = True
            await asyncio.gather(*(self._supervise(run, c, volumes)
                                   for c in spec["containers"]))
        except asyncio.CancelledError:
            await asyncio.gather(*(self._kill(run, p) for p in run.processes.values()))
            raise
        except Exception as exc:  # noqa: BLE001 -- the pod fails, the kubelet goes on
            self.errors.append(exc)
            run.reason = f"the local kubelet failed: {exc!r}"
            await self._publish(run)

    async def _supervise(self, run: _PodRun, container: Obj, volumes: Mapping[str, Path],
                         *, init: bool = False) -> int:
        """Run one container until it ends for good by the restart policy; its exit code."""
        name = container["name"]
        statuses = run.init_statuses if init else run.statuses
        policy = run.pod["spec"].get("restartPolicy", "Always")
        restarts = 0
        while True:
            argv, env, cwd = await self._container_process(run, container, volumes)
            log = run.dir / f"{name}.log"
            started = _now()
            try:
                with log.open("ab") as out:
                    process = await asyncio.create_subprocess_exec(
                        *argv, stdout=out, stderr=asyncio.subprocess.STDOUT, cwd=cwd, env=env,
                        stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
            except OSError as exc:
                with log.open("a") as out:
                    out.write(f"local kubelet: cannot start {argv!r}: {exc}\n")
                code = 128
            else:
                run.processes[name] = process
                probe = container.get("readinessProbe")
                statuses[name] = _container_status(container, restarts, running=started,
                                                   ready=probe is None and not init)
                if not init:
                    run.launched.add(name)
                await self._publish(run)
                prober = (asyncio.create_task(self._probe(run, container, probe, statuses))
                          if probe and not init else None)
                try:
                    code = await process.wait()
                finally:
                    if prober is not None:
                        prober.cancel()
            terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                          "startedAt": started, "finishedAt": _now()}
            if policy == "Never" or (code == 0 and (init or policy == "OnFailure")):
                statuses[name] = _container_status(container, restarts, terminated=terminated)
                await self._publish(run)
                return code
            restarts += 1
            statuses[name] = _container_status(container, restarts, last=terminated,
                                               waiting="CrashLoopBackOff" if code else "Completed")
            await self._publish(run)
            await asyncio.sleep(min(0.2 * 2 ** (restarts - 1), 5.0))

    async def _probe(self, run: _PodRun, container: Obj, probe: Obj,
                     statuses: dict[str, Obj]) -> None:
        await asyncio.sleep(min(probe.get("initialDelaySeconds", 0), 1.0))
        period = min(probe.get("periodSeconds", 10), 1.0)
        threshold = {True: probe.get("successThreshold", 1), False: probe.get("failureThreshold",
                                                                              3)}
        streak: tuple[bool, int] = (False, 0)
        while True:
            passed = await self._probe_once(container, probe)
            streak = (passed, streak[1] + 1 if streak[0] == passed else 1)
            status = statuses[container["name"]]
            if streak[1] >= threshold[passed] and status.get("ready") != passed:
                status["ready"] = passed
                await self._publish(run)
            await asyncio.sleep(period)

    async def _probe_once(self, container: Obj, probe: Obj) -> bool:
        def port_of(value: Any) -> int:
            named = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
            return named[value] if isinstance(value, str) and not value.isdigit() else int(value)

        timeout = min(probe.get("timeoutSeconds", 1), 1.0)
        try:
            if "tcpSocket" in probe:
                _, writer = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port_of(probe["tcpSocket"]["port"])), timeout)
                writer.close()
                return True
            if "httpGet" in probe:
                get = probe["httpGet"]
                url = f"http://127.0.0.1:{port_of(get['port'])}{get.get('path', '/')}"
                async with aiohttp.ClientSession() as session, session.get(
                        url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                    return 200 <= response.status < 400
            if "grpc" in probe:  # grpc.health.v1, as the kubelet's own gRPC probe
                return await _grpc_health(port_of(probe["grpc"]["port"]),
                                          probe["grpc"].get("service", ""), timeout + 1)
            if "exec" in probe:
                process = await asyncio.create_subprocess_exec(
                    *resolve_command(probe["exec"]["command"]),
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
                return await asyncio.wait_for(process.wait(), timeout + 5) == 0
        except (TimeoutError, OSError, aiohttp.ClientError, KeyError, ValueError):
            return False
        return False

    async def _kill(self, run: _PodRun, process: asyncio.subprocess.Process) -> None:
        if process.returncode is not None:
            return
        grace = min(run.pod["spec"].get("terminationGracePeriodSeconds", 30), self.grace_cap)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()

    async def _publish(self, run: _PodRun) -> None:
        """Write the pod's status through the status subresource (in order, one at a time)."""
        async with run.lock:
            containers = [run.statuses[c["name"]] for c in run.pod["spec"]["containers"]
                          if c["name"] in run.statuses]
            phase = "Failed" if run.reason else pod_phase(containers, run.started)
            ready = phase == "Running" and bool(containers) and all(
                c["ready"] for c in containers)
            previous = {c["type"]: c for c in (run.pod.get("status") or {}).get(
                "conditions") or []}
            conditions = [_condition(t, s, previous) for t, s in (
                ("PodScheduled", True), ("Initialized", run.initialized),
                ("ContainersReady", ready), ("Ready", ready))]
            status: Obj = {
                "phase": phase, "podIP": "127.0.0.1", "hostIP": "127.0.0.1",
                "podIPs": [{"ip": "127.0.0.1"}], "hostIPs": [{"ip": "127.0.0.1"}],
                "startTime": (run.pod.get("status") or {}).get("startTime") or _now(),
                "conditions": conditions, "containerStatuses": containers,
                "initContainerStatuses": list(run.init_statuses.values()),
                "qosClass": "BestEffort",
            }
            if run.reason:
                status.update(reason="Error", message=run.reason)
            meta = run.pod["metadata"]
            updated = await self._call(
                "PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
                {"status": status}, "application/merge-patch+json")
            if updated is not None:
                run.pod = updated

    # ---------------------------------------------------------------- volumes

    async def _prepare_volumes(self, run: _PodRun) -> dict[str, Path]:
        namespace = run.namespace
        folders: dict[str, Path] = {}
        for volume in run.pod["spec"].get("volumes") or []:
            name = volume["name"]
            folder = run.dir / "volumes" / name
            if "configMap" in volume or "secret" in volume:
                source = volume.get("configMap") or volume["secret"]
                secret = "secret" in volume
                object_name = source.get("secretName") if secret else source.get("name")
                kind = "secrets" if secret else "configmaps"
                obj = await self._wait_for(f"/api/v1/namespaces/{namespace}/{kind}/{object_name}",
                                           optional=source.get("optional", False))
                data = dict((obj or {}).get("data") or {})
                if secret:
                    data = {k: _decode(v) for k, v in data.items()}
                elif obj:
                    data.update({k: _decode(v) for k, v in (obj.get("binaryData") or {}).items()})
                items = source.get("items") or [{"key": k, "path": k} for k in data]
                folder.mkdir(parents=True, exist_ok=True)
                for item in items:
                    if item["key"] in data:
                        target = folder / item["path"]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_text(data[item["key"]])
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                folder = self.workdir / "claims" / namespace / claim
            elif "hostPath" in volume:
                folder = Path(volume["hostPath"]["path"])
            elif "emptyDir" not in volume:
                raise ValueError(f"volume {name!r}: only configMap, secret, emptyDir, "
                                 "persistentVolumeClaim and hostPath are emulated")
            folder.mkdir(parents=True, exist_ok=True)
            folders[name] = folder
        return folders

    async def _wait_for(self, path: str, *, optional: bool) -> Obj | None:
        """A ConfigMap or Secret, waiting for it as a kubelet does (the Pod stays Pending)."""
        while True:
            obj = await self._call("GET", path)
            if obj is not None or optional:
                return obj
            await asyncio.sleep(0.2)

    # ------------------------------------------------------------ processes

    async def _container_process(self, run: _PodRun, container: Obj,
                                 volumes: Mapping[str, Path]) -> tuple[list[str], dict[str, str],
                                                                       str]:
        """argv, env and working directory of a container, with mounts and Services mapped."""
        root = run.dir / container["name"] / "root"
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        mounts = []
        for mount in container.get("volumeMounts") or []:
            link = root / mount["mountPath"].lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            target = volumes[mount["name"]] / mount.get("subPath", "")
            if not target.exists():
                target.mkdir(parents=True)
            link.symlink_to(target)
            mounts.append(mount["mountPath"])
        services = await self._call("GET", "/api/v1/services")
        pods = await self._call("GET", "/api/v1/pods")
        assert services is not None and pods is not None
        namespace = run.namespace
        hosts: dict[str, dict[int, int]] = {}
        short: dict[str, dict[int, int]] = {}
        links: dict[str, str] = {}
        for service in services["items"]:
            svc, ns = service["metadata"]["name"], service["metadata"]["namespace"]
            ports = service_ports(service, [p for p in pods["items"]
                                            if p["metadata"]["namespace"] == ns])
            for host in (f"{svc}.{ns}.svc.cluster.local", f"{svc}.{ns}.svc", f"{svc}.{ns}"):
                hosts[host] = ports
            if ns == namespace:
                short[svc] = ports
                prefix = svc.upper().replace("-", "_")
                links[f"{prefix}_SERVICE_HOST"] = "127.0.0.1"
                if ports:
                    links[f"{prefix}_SERVICE_PORT"] = str(next(iter(ports.values())))
        rewrite = Rewriter(str(root), tuple(mounts), hosts, short)
        env = {**os.environ, **self.env, "HOSTNAME": run.name,
               "KUBECONFIG": str(self._kubeconfig(run)), "PYTHONUNBUFFERED": "1",
               "FEDKUBE_PATH_PREFIX": str(root)}
        if run.pod["spec"].get("enableServiceLinks", True):
            env.update(links)
        env.update(await self._container_env(run, container, env, rewrite))
        command = [*(container.get("command") or []), *(container.get("args") or [])]
        if not container.get("command"):
            command = [*self.entrypoint, *command]
        argv = [rewrite(expand_references(part, env)) for part in command]
        cwd = rewrite(container["workingDir"]) if container.get("workingDir") else str(root)
        Path(cwd).mkdir(parents=True, exist_ok=True)
        return resolve_command(argv, self.entrypoint), env, cwd

    def _kubeconfig(self, run: _PodRun) -> Path:
        """The pod's credentials, as its service account token would be: the account of
        ``serviceAccountName`` (``default``), or none (anonymous) when
        ``automountServiceAccountToken`` is false (see audit.py)."""
        spec = run.pod["spec"]
        token = None
        if spec.get("automountServiceAccountToken", True):
            token = audit.service_account_token(run.namespace,
                                                spec.get("serviceAccountName") or "default")
        return self.api.write_kubeconfig(run.dir / "kubeconfig", token=token,
                                         namespace=run.namespace)

    async def _container_env(self, run: _PodRun, container: Obj, base: Mapping[str, str],
                             rewrite: Rewriter) -> dict[str, str]:
        namespace = run.namespace
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            ref = source.get("configMapRef") or source.get("secretRef") or {}
            kind = "secrets" if "secretRef" in source else "configmaps"
            obj = await self._wait_for(f"/api/v1/namespaces/{namespace}/{kind}/{ref['name']}",
                                       optional=ref.get("optional", False))
            for key, value in ((obj or {}).get("data") or {}).items():
                if kind == "secrets":
                    value = base64.b64decode(value).decode(errors="replace")
                env[source.get("prefix", "") + key] = value
        for var in container.get("env") or []:
            if "valueFrom" not in var:
                value = expand_references(var.get("value", ""), {**base, **env})
                env[var["name"]] = rewrite(value, whole_value_hosts=True)
                continue
            source = var["valueFrom"]
            value = None
            if "fieldRef" in source:
                value = _field_value(run.pod, source["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in source or "configMapKeyRef" in source:
                ref = source.get("secretKeyRef") or source["configMapKeyRef"]
                kind = "secrets" if "secretKeyRef" in source else "configmaps"
                obj = await self._wait_for(f"/api/v1/namespaces/{namespace}/{kind}/{ref['name']}",
                                           optional=ref.get("optional", False))
                raw = ((obj or {}).get("data") or {}).get(ref["key"])
                if raw is not None:
                    value = base64.b64decode(raw).decode() if kind == "secrets" else raw
            elif "resourceFieldRef" in source:
                value = "0"
            if value is not None:
                env[var["name"]] = value
        return env


def _decode(value: str) -> str:
    return base64.b64decode(value).decode(errors="replace")


def _field_value(pod: Obj, path: str) -> str:
    """A Pod field for ``valueFrom.fieldRef`` (``metadata.labels['app']`` included)."""
    meta = pod["metadata"]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return (meta.get(match[1]) or {}).get(match[2], "")
    values = {
        "metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"], "spec.nodeName": "local-kubelet",
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1", "status.podIPs": "127.0.0.1",
    }
    if path not in values:
        raise ValueError(f"fieldRef {path!r} is not supported")
    return values[path]


def _container_status(container: Obj, restarts: int, *, running: str | None = None,
                      terminated: Obj | None = None, last: Obj | None = None,
                      waiting: str | None = None, ready: bool = False) -> Obj:
    state: Obj = ({"running": {"startedAt": running}} if running else
                  {"terminated": terminated} if terminated else
                  {"waiting": {"reason": waiting or "ContainerCreating"}})
    status: Obj = {"name": container["name"], "image": container.get("image", ""),
                   "imageID": "", "containerID": f"local://{container['name']}",
                   "ready": ready and running is not None, "started": running is not None,
                   "restartCount": restarts, "state": state, "lastState": {}}
    if last:
        status["lastState"] = {"terminated": last}
    return status


def _condition(kind: str, true: bool, previous: Mapping[str, Obj]) -> Obj:
    status = "True" if true else "False"
    old = previous.get(kind)
    since = old["lastTransitionTime"] if old and old.get("status") == status else _now()
    return {"type": kind, "status": status, "lastTransitionTime": since}


# ------------------------------------------------------------------ deployments


def pod_from_template(deployment: Obj, pod_hash: str) -> Obj:
    """A Pod of a Deployment: its template, owned by it, labelled with the template hash."""
    meta, template = deployment["metadata"], deployment["spec"]["template"]
    labels = (template.get("metadata") or {}).get("labels") or {}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": f"{meta['name']}-{pod_hash}-", "namespace": meta["namespace"],
            "labels": {**labels, "pod-template-hash": pod_hash},
            "annotations": dict((template.get("metadata") or {}).get("annotations") or {}),
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                 "name": meta["name"], "uid": meta["uid"], "controller": True,
                                 "blockOwnerDeletion": True}],
        },
        "spec": copy.deepcopy(template["spec"]),
    }


def is_ready(pod: Obj) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


async def _grpc_health(port: int, service: str, timeout: float) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
