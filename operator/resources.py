"""Pure builders of the Kubernetes objects a FederatedJob owns.

Dicts out, no API calls: the handlers adopt (ownerReferences) and create what these
return, and the unit tests read them directly. The containers run the runtime's entry
points with the flags of its CLI contract:

    fedkube coordinator --job PATH --port N --kube --output DIR
                        [--join-token-file F] [--tls-cert F --tls-key F [--tls-client-ca F]]
                        [--metrics-port N]
    fedkube agent --coordinator HOST:PORT --node-id ID --device cpu --simulated-index I
                  [--tls-ca F]    (join token from env FEDKUBE_JOIN_TOKEN)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from fedkube.runtime.spec import (
    API_GROUP,
    API_GROUP_VERSION,
    FederatedJobSpec,
    ManifestError,
    ResourceRequirements,
    mutable_field_paths,
    with_mutable_edits,
)

from .settings import OperatorSettings

JOB_LABEL = f"{API_GROUP}/job"
COMPONENT_LABEL = "app.kubernetes.io/component"
COORDINATOR = "coordinator"
AGENT = "agent"

SPEC_DIR = "/etc/fedkube"
SPEC_KEY = "job.yaml"
STATE_DIR = "/var/lib/fedkube"
TOKEN_DIR = "/etc/fedkube-token"
TLS_DIR = "/etc/fedkube-tls"
CLIENT_CA_DIR = "/etc/fedkube-client-ca"

# Children are named `<job>-coordinator`; a Service name is a DNS label (63 characters).
MAX_JOB_NAME = 63 - len(f"-{COORDINATOR}")


@dataclass(frozen=True)
class JobRef:
    """Which FederatedJob the children belong to."""

    name: str
    namespace: str


Obj = dict[str, Any]


# ------------------------------------------------------------------------- names


def spec_config_map_name(job: str) -> str:
    return f"{job}-spec"


def coordinator_name(job: str) -> str:
    """Name of the coordinator's Deployment, Service, ServiceAccount, Role, RoleBinding."""
    return f"{job}-{COORDINATOR}"


def agent_pod_name(job: str, index: int) -> str:
    return f"{job}-{AGENT}-{index}"


def coordinator_endpoint(job: JobRef, spec: FederatedJobSpec) -> str:
    """Where agents dial the coordinator, inside the cluster."""
    return f"{coordinator_name(job.name)}.{job.namespace}.svc:{spec.coordinator.port}"


def labels(job: JobRef, component: str) -> dict[str, str]:
    """Labels on every child; `selector_labels` is the subset selectors match on."""
    return {
        **selector_labels(job, component),
        "app.kubernetes.io/managed-by": "fedkube-operator",
    }


def selector_labels(job: JobRef, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "fedkube",
        COMPONENT_LABEL: component,
        JOB_LABEL: job.name,
    }


def _metadata(name: str, job: JobRef, component: str) -> Obj:
    return {"name": name, "namespace": job.namespace, "labels": labels(job, component)}


# ------------------------------------------------------------------ shared pieces


def _pod_security_context() -> Obj:
    # The image may declare any user; pinning a non-root uid/gid keeps runAsNonRoot
    # satisfiable and makes emptyDir volumes writable through fsGroup.
    return {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security_context() -> Obj:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _common_env(job: JobRef) -> list[Obj]:
    return [
        {"name": "FEDKUBE_JOB_NAME", "value": job.name},
        {"name": "FEDKUBE_NAMESPACE",
         "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        # The root filesystem is read-only; libraries that cache under $HOME use /tmp.
        {"name": "HOME", "value": "/tmp"},
    ]


def _tmp_volume() -> tuple[Obj, Obj]:
    return {"name": "tmp", "emptyDir": {}}, {"name": "tmp", "mountPath": "/tmp"}


def image_of(spec: FederatedJobSpec, settings: OperatorSettings) -> str:
    return spec.coordinator.image or settings.image


def with_operator_defaults(spec: FederatedJobSpec, settings: OperatorSettings) -> FederatedJobSpec:
    """The spec the job runs: the operator's cluster-wide defaults (TLS secret, join
    token secret, client CA, coordinator and agent resources) fill in what the spec leaves
    unset. ManifestError when the result cannot run: mutual TLS without TLS, or with
    simulated agent pods (they hold no client certificates)."""
    coordinator = spec.coordinator
    filled = coordinator.model_copy(update={
        "tls_secret": coordinator.tls_secret or settings.default_tls_secret,
        "join_token_secret": coordinator.join_token_secret or settings.default_join_token_secret,
        "client_ca_secret": coordinator.client_ca_secret or settings.default_client_ca_secret,
        "resources": coordinator.resources or settings.default_coordinator_resources,
    })
    if filled.client_ca_secret and not filled.tls_secret:
        raise ManifestError("spec.coordinator.clientCaSecret: mutual TLS needs "
                            "spec.coordinator.tlsSecret (the coordinator's own certificate)")
    if filled.client_ca_secret and spec.simulation.clients:
        raise ManifestError("spec.coordinator.clientCaSecret: simulated agent pods "
                            "(spec.simulation.clients) have no client certificates and could "
                            "not join; use real agents with --tls-cert/--tls-key")
    simulation = spec.simulation.model_copy(update={
        "resources": agent_resources(spec, settings)})
    return spec.model_copy(update={"coordinator": filled, "simulation": simulation})


def agent_resources(spec: FederatedJobSpec, settings: OperatorSettings) -> ResourceRequirements:
    """The job's spec.simulation.resources, or the operator's default for agent pods."""
    return spec.simulation.resources or settings.default_agent_resources


def _pull_secrets(settings: OperatorSettings) -> dict[str, Any]:
    if not settings.image_pull_secrets:
        return {}
    return {"imagePullSecrets": [{"name": name} for name in settings.image_pull_secrets]}


# --------------------------------------------------------------------- ConfigMap


def job_manifest(job: JobRef, spec: FederatedJobSpec) -> Obj:
    """The FederatedJob as the coordinator reads it from its --job file."""
    return {
        "apiVersion": API_GROUP_VERSION,
        "kind": "FederatedJob",
        "metadata": {"name": job.name, "namespace": job.namespace},
        "spec": spec.to_wire(),
    }


def spec_config_map(job: JobRef, spec: FederatedJobSpec) -> Obj:
    """ConfigMap `<job>-spec` with `job.yaml`: the full manifest the coordinator runs."""
    text = yaml.safe_dump(job_manifest(job, spec), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(spec_config_map_name(job.name), job, COORDINATOR),
        "data": {SPEC_KEY: text},
    }


# ------------------------------------------------------------------- coordinator


def coordinator_command(spec: FederatedJobSpec, settings: OperatorSettings) -> list[str]:
    command = [
        "fedkube", "coordinator",
        "--job", f"{SPEC_DIR}/{SPEC_KEY}",
        "--port", str(spec.coordinator.port),
        "--kube",
        "--output", STATE_DIR,
    ]
    if spec.coordinator.join_token_secret:
        command += ["--join-token-file", f"{TOKEN_DIR}/token"]
    if spec.coordinator.tls_secret:
        command += ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
    if spec.coordinator.client_ca_secret:
        command += ["--tls-client-ca", f"{CLIENT_CA_DIR}/ca.crt"]
    if settings.coordinator_metrics_port:
        command += ["--metrics-port", str(settings.coordinator_metrics_port)]
    return command


def _coordinator_volumes(job: JobRef, spec: FederatedJobSpec) -> tuple[list[Obj], list[Obj]]:
    tmp, tmp_mount = _tmp_volume()
    claim = spec.coordinator.checkpoint_volume_claim
    state = ({"persistentVolumeClaim": {"claimName": claim}} if claim else {"emptyDir": {}})
    volumes = [
        {"name": "job-spec", "configMap": {"name": spec_config_map_name(job.name)}},
        {"name": "state", **state},
        tmp,
    ]
    mounts = [
        {"name": "job-spec", "mountPath": SPEC_DIR, "readOnly": True},
        {"name": "state", "mountPath": STATE_DIR},
        tmp_mount,
    ]
    if spec.coordinator.join_token_secret:
        volumes.append({"name": "join-token", "secret": {
            "secretName": spec.coordinator.join_token_secret,
            "items": [{"key": "token", "path": "token"}],
        }})
        mounts.append({"name": "join-token", "mountPath": TOKEN_DIR, "readOnly": True})
    if spec.coordinator.tls_secret:
        volumes.append({"name": "tls", "secret": {
            "secretName": spec.coordinator.tls_secret,
            "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}],
        }})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    if spec.coordinator.client_ca_secret:
        # Only the CA certificate that signs the agents' client certificates.
        volumes.append({"name": "client-ca", "secret": {
            "secretName": spec.coordinator.client_ca_secret,
            "items": [{"key": "ca.crt", "path": "ca.crt"}],
        }})
        mounts.append({"name": "client-ca", "mountPath": CLIENT_CA_DIR, "readOnly": True})
    return volumes, mounts


def _coordinator_probe(spec: FederatedJobSpec) -> Obj:
    """The coordinator's grpc.health.v1 service; the kubelet's gRPC probe speaks no TLS,
    so a TLS coordinator is probed by its port alone."""
    if spec.coordinator.tls_secret:
        return {"tcpSocket": {"port": "grpc"}}
    return {"grpc": {"port": spec.coordinator.port, "service": "fedkube.v1.Coordinator"}}


def coordinator_deployment(
    job: JobRef, spec: FederatedJobSpec, settings: OperatorSettings
) -> Obj:
    """Deployment `<job>-coordinator`: one replica running `fedkube coordinator`."""
    port = spec.coordinator.port
    volumes, mounts = _coordinator_volumes(job, spec)
    ports = [{"name": "grpc", "containerPort": port, "protocol": "TCP"}]
    if settings.coordinator_metrics_port:
        ports.append({"name": "metrics", "containerPort": settings.coordinator_metrics_port,
                      "protocol": "TCP"})
    container: Obj = {
        "name": COORDINATOR,
        "image": image_of(spec, settings),
        "imagePullPolicy": settings.image_pull_policy,
        "command": coordinator_command(spec, settings),
        "ports": ports,
        "env": _common_env(job),
        "volumeMounts": mounts,
        "readinessProbe": {**_coordinator_probe(spec), "initialDelaySeconds": 2,
                           "periodSeconds": 5},
        # Generous: loading a dataset and building the model can take a while on a busy node.
        "livenessProbe": {**_coordinator_probe(spec), "initialDelaySeconds": 15,
                          "periodSeconds": 10, "failureThreshold": 6},
        "securityContext": _container_security_context(),
    }
    if spec.coordinator.resources is not None:
        container["resources"] = spec.coordinator.resources.to_wire()
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(coordinator_name(job.name), job, COORDINATOR),
        "spec": {
            "replicas": 1,
            # Never two coordinators at once: agents would split between two round engines.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector_labels(job, COORDINATOR)},
            "template": {
                "metadata": {"labels": labels(job, COORDINATOR)},
                "spec": {
                    "serviceAccountName": coordinator_name(job.name),
                    "automountServiceAccountToken": True,
                    "enableServiceLinks": False,
                    "securityContext": _pod_security_context(),
                    **_pull_secrets(settings),
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def coordinator_service(job: JobRef, spec: FederatedJobSpec, settings: OperatorSettings) -> Obj:
    """ClusterIP Service `<job>-coordinator` in front of the gRPC port."""
    ports = [{"name": "grpc", "port": spec.coordinator.port, "targetPort": "grpc",
              "protocol": "TCP", "appProtocol": "grpc"}]
    if settings.coordinator_metrics_port:
        ports.append({"name": "metrics", "port": settings.coordinator_metrics_port,
                      "targetPort": "metrics", "protocol": "TCP"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(coordinator_name(job.name), job, COORDINATOR),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(job, COORDINATOR),
            "ports": ports,
        },
    }


# ---------------------------------------------------------------- coordinator RBAC


def coordinator_rules(job: JobRef) -> list[Obj]:
    """What the coordinator's status writer needs, and nothing more: read its own job and
    write its status; register ClientNodes; post Events."""
    return [
        {"apiGroups": [API_GROUP], "resources": ["federatedjobs"],
         "resourceNames": [job.name], "verbs": ["get"]},
        {"apiGroups": [API_GROUP], "resources": ["federatedjobs/status"],
         "resourceNames": [job.name], "verbs": ["get", "patch"]},
        {"apiGroups": [API_GROUP], "resources": ["clientnodes"],
         "verbs": ["get", "list", "create", "patch"]},
        {"apiGroups": [API_GROUP], "resources": ["clientnodes/status"],
         "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    ]


def coordinator_service_account(job: JobRef) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(coordinator_name(job.name), job, COORDINATOR),
    }


def coordinator_role(job: JobRef) -> Obj:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(coordinator_name(job.name), job, COORDINATOR),
        "rules": coordinator_rules(job),
    }


def coordinator_role_binding(job: JobRef) -> Obj:
    name = coordinator_name(job.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(name, job, COORDINATOR),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": job.namespace}],
    }


# -------------------------------------------------------------------------- agents


def agent_pod(job: JobRef, spec: FederatedJobSpec, index: int, settings: OperatorSettings) -> Obj:
    """Pod `<job>-agent-<index>`: a simulated client holding partition `index`."""
    if not 0 <= index < spec.simulation.clients:
        raise ValueError(f"agent index {index} outside 0..{spec.simulation.clients - 1}")
    name = agent_pod_name(job.name, index)
    command = [
        "fedkube", "agent",
        "--coordinator", coordinator_endpoint(job, spec),
        "--simulated-index", str(index),
        "--node-id", name,
        "--device", "cpu",
    ]
    env = _common_env(job)
    tmp, tmp_mount = _tmp_volume()
    volumes, mounts = [tmp], [tmp_mount]
    if spec.coordinator.join_token_secret:
        env.append({"name": "FEDKUBE_JOIN_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": spec.coordinator.join_token_secret, "key": "token"}}})
    if spec.coordinator.tls_secret:
        # Only the CA certificate: the server's private key stays with the coordinator.
        volumes.append({"name": "tls-ca", "secret": {
            "secretName": spec.coordinator.tls_secret,
            "items": [{"key": "ca.crt", "path": "ca.crt"}],
        }})
        mounts.append({"name": "tls-ca", "mountPath": TLS_DIR, "readOnly": True})
        command += ["--tls-ca", f"{TLS_DIR}/ca.crt"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(name, job, AGENT),
        "spec": {
            "restartPolicy": "OnFailure",
            # Agents only talk gRPC to the coordinator, never to the Kubernetes API.
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": _pod_security_context(),
            **_pull_secrets(settings),
            "containers": [{
                "name": AGENT,
                "image": image_of(spec, settings),
                "imagePullPolicy": settings.image_pull_policy,
                "command": command,
                "env": env,
                "volumeMounts": mounts,
                "resources": agent_resources(spec, settings).to_wire(),
                "securityContext": _container_security_context(),
            }],
            "volumes": volumes,
        },
    }


def agent_pods(job: JobRef, spec: FederatedJobSpec, settings: OperatorSettings) -> list[Obj]:
    return [agent_pod(job, spec, i, settings) for i in range(spec.simulation.clients)]


# ------------------------------------------------------------------------ together


def job_children(job: JobRef, spec: FederatedJobSpec, settings: OperatorSettings) -> list[Obj]:
    """Everything a job owns, in creation order: RBAC and config before the pods that
    need them, the coordinator before its agents."""
    return [
        coordinator_service_account(job),
        coordinator_role(job),
        coordinator_role_binding(job),
        spec_config_map(job, spec),
        coordinator_service(job, spec, settings),
        coordinator_deployment(job, spec, settings),
        *agent_pods(job, spec, settings),
    ]


def running_children(job: JobRef, spec: FederatedJobSpec, settings: OperatorSettings) -> list[Obj]:
    """The children removed when the job finishes: everything that runs or routes to
    what runs. The ConfigMap (what ran) and the RBAC objects (cheap, inert) stay until
    the job itself is deleted."""
    return [
        coordinator_deployment(job, spec, settings),
        coordinator_service(job, spec, settings),
        *agent_pods(job, spec, settings),
    ]


# ------------------------------------------------------------ reading children back


# Waiting reasons after which a container will not start without someone fixing something.
_STUCK_REASONS = frozenset({
    "CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})


@dataclass(frozen=True)
class CoordinatorHealth:
    """What the coordinator's Deployment and pods say: `ready` when a pod serves gRPC,
    `failure` (a sentence) when it is failing rather than merely starting."""

    ready: bool
    failure: str | None


def _pod_failure(pod: Obj) -> str | None:
    name = pod.get("metadata", {}).get("name", "?")
    status = pod.get("status") or {}
    if status.get("phase") == "Failed":
        why = status.get("reason") or status.get("message") or "no reason given"
        return f"pod {name} failed: {why}"
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _STUCK_REASONS:
            detail = f": {waiting['message']}" if waiting.get("message") else ""
            return f"pod {name}: container {container.get('name')} {waiting['reason']}{detail}"
        last = (container.get("lastState") or {}).get("terminated") or {}
        if (container.get("restartCount", 0) > 0 and not container.get("ready")
                and last.get("exitCode", 0) != 0):
            return (f"pod {name}: container {container.get('name')} restarted "
                    f"{container['restartCount']} time(s), last exit code {last['exitCode']}")
    return None


def _pod_ready(pod: Obj) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def coordinator_health(deployment: Obj | None, pods: list[Obj]) -> CoordinatorHealth:
    """Judge the coordinator from its Deployment (None: missing) and its pods."""
    if deployment is None:
        return CoordinatorHealth(ready=False, failure="the coordinator Deployment is missing")
    ready = any(_pod_ready(p) for p in pods) or (
        (deployment.get("status") or {}).get("readyReplicas", 0) >= 1)
    failures = [f for f in map(_pod_failure, pods) if f]
    for condition in (deployment.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == (
                "ProgressDeadlineExceeded"):
            failures.append(f"deployment: {condition.get('message') or 'progress deadline exceeded'}")
    # A ready pod next to a failed one (an old pod left behind) is not a failing job.
    return CoordinatorHealth(ready=ready, failure=None if ready else "; ".join(failures) or None)


# ------------------------------------------------------------------- spec changes

# What a running job may change (listed once, in spec.py), as spelled in the manifest.
MUTABLE_FIELDS = frozenset(path.removeprefix("spec.") for path in mutable_field_paths())


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_leaves(sub, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def changed_fields(running: FederatedJobSpec, requested: FederatedJobSpec) -> list[str]:
    """Dotted paths (`spec.data.partition`) whose values differ, defaults included, so a
    field spelled out with its default value does not count as a change."""
    old = _leaves(running.model_dump(by_alias=True, mode="json"), "spec")
    new = _leaves(requested.model_dump(by_alias=True, mode="json"), "spec")
    return sorted(path for path in old.keys() | new.keys() if old.get(path) != new.get(path))


def immutable_changes(running: FederatedJobSpec, requested: FederatedJobSpec) -> list[str]:
    mutable = {f"spec.{name}" for name in MUTABLE_FIELDS}
    return [path for path in changed_fields(running, requested) if path not in mutable]


def with_mutable_fields(running: FederatedJobSpec, requested: FederatedJobSpec) -> FederatedJobSpec:
    """The running spec with the mutable fields taken from `requested`, validated again."""
    return with_mutable_edits(running, requested)
