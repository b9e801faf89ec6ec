"""The operator's pure builders: what a FederatedJob's children look like."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fedkube.operator import resources as r
from fedkube.operator.settings import OperatorSettings
from fedkube.runtime.spec import FederatedJobSpec, ManifestError, parse_job, parse_job_spec

JOB = r.JobRef(name="digits", namespace="team-a")
SETTINGS = OperatorSettings(image="registry.local/fedkube:test")


def _spec(**overrides: Any) -> FederatedJobSpec:
    return parse_job_spec({"model": "mlp", "rounds": 3, **overrides})


def _by_kind(objs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for obj in objs:
        out.setdefault(obj["kind"], []).append(obj)
    return out


def _container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_children_of_a_simulated_job() -> None:
    spec = _spec(simulation={"clients": 3})
    children = r.job_children(JOB, spec, SETTINGS)
    kinds = [c["kind"] for c in children]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service",
                     "Deployment", "Pod", "Pod", "Pod"]
    names = [c["metadata"]["name"] for c in children]
    assert names[:6] == ["digits-coordinator"] * 3 + ["digits-spec"] + ["digits-coordinator"] * 2
    assert names[6:] == ["digits-agent-0", "digits-agent-1", "digits-agent-2"]
    for child in children:
        meta = child["metadata"]
        assert meta["namespace"] == "team-a"
        assert "ownerReferences" not in meta  # the handler adopts them
        assert meta["labels"]["app.kubernetes.io/name"] == "fedkube"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "fedkube-operator"
        assert meta["labels"]["fedkube.io/job"] == "digits"
        assert meta["labels"]["app.kubernetes.io/component"] in ("coordinator", "agent")


def test_no_agent_pods_without_simulation() -> None:
    kinds = [c["kind"] for c in r.job_children(JOB, _spec(), SETTINGS)]
    assert "Pod" not in kinds


def test_config_map_holds_a_manifest_the_runtime_loads() -> None:
    spec = _spec(clientsPerRound=2, simulation={"clients": 3}, privacy={
        "mode": "local", "targetEpsilon": 3.0})
    cm = r.spec_config_map(JOB, spec)
    assert cm["metadata"]["name"] == "digits-spec"
    manifest = yaml.safe_load(cm["data"]["job.yaml"])
    job = parse_job(manifest)
    assert (job.metadata.name, job.metadata.namespace) == ("digits", "team-a")
    assert job.spec == spec


def test_coordinator_deployment() -> None:
    spec = _spec(coordinator={"port": 6000, "resources": {"limits": {"cpu": "2"}}})
    dep = r.coordinator_deployment(JOB, spec, SETTINGS)
    assert dep["metadata"]["name"] == "digits-coordinator"
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    template = dep["spec"]["template"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    pod = template["spec"]
    assert pod["serviceAccountName"] == "digits-coordinator"
    container = _container(pod)
    assert container["name"] == "coordinator"
    assert container["image"] == "registry.local/fedkube:test"
    assert container["command"] == [
        "fedkube", "coordinator", "--job", "/etc/fedkube/job.yaml", "--port", "6000",
        "--kube", "--output", "/var/lib/fedkube"]
    assert container["ports"] == [{"name": "grpc", "containerPort": 6000, "protocol": "TCP"}]
    health = {"port": 6000, "service": "fedkube.v1.Coordinator"}
    assert container["readinessProbe"]["grpc"] == health
    assert container["livenessProbe"]["grpc"] == health
    assert container["resources"] == {"limits": {"cpu": "2"}}
    env = _env(container)
    assert env["FEDKUBE_JOB_NAME"] == "digits"
    assert env["FEDKUBE_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/fedkube"]]["configMap"] == {"name": "digits-spec"}
    assert volumes[mounts["/var/lib/fedkube"]] == {"name": "state", "emptyDir": {}}
    assert "/tmp" in mounts


def test_coordinator_is_hardened() -> None:
    dep = r.coordinator_deployment(JOB, _spec(), SETTINGS)
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = _container(pod)["securityContext"]
    assert ctx == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                   "capabilities": {"drop": ["ALL"]}}


def test_checkpoint_claim_replaces_empty_dir() -> None:
    dep = r.coordinator_deployment(JOB, _spec(coordinator={"checkpointVolumeClaim": "ckpt"}),
                                   SETTINGS)
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"] == {"name": "state", "persistentVolumeClaim": {"claimName": "ckpt"}}


def test_spec_image_wins_over_the_operator_default() -> None:
    dep = r.coordinator_deployment(JOB, _spec(coordinator={"image": "mine:1"}), SETTINGS)
    assert _container(dep["spec"]["template"]["spec"])["image"] == "mine:1"
    assert r.image_of(_spec(), SETTINGS) == "registry.local/fedkube:test"


def test_service_routes_the_grpc_port_to_the_coordinator() -> None:
    spec = _spec(coordinator={"port": 6000})
    svc = r.coordinator_service(JOB, spec, SETTINGS)
    dep = r.coordinator_deployment(JOB, spec, SETTINGS)
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"][0] == {"name": "grpc", "port": 6000, "targetPort": "grpc",
                                      "protocol": "TCP", "appProtocol": "grpc"}
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    agent_labels = r.agent_pod(JOB, _spec(simulation={"clients": 1}), 0, SETTINGS)[
        "metadata"]["labels"]
    assert not svc["spec"]["selector"].items() <= agent_labels.items()


def test_endpoint_names_the_service() -> None:
    assert r.coordinator_endpoint(JOB, _spec()) == "digits-coordinator.team-a.svc:50051"


def test_agent_pods() -> None:
    spec = _spec(simulation={"clients": 2})
    pods = r.agent_pods(JOB, spec, SETTINGS)
    assert [p["metadata"]["name"] for p in pods] == ["digits-agent-0", "digits-agent-1"]
    pod = pods[1]["spec"]
    assert pod["restartPolicy"] == "OnFailure"
    assert pod["automountServiceAccountToken"] is False
    container = _container(pod)
    assert container["command"] == [
        "fedkube", "agent", "--coordinator", "digits-coordinator.team-a.svc:50051",
        "--simulated-index", "1", "--node-id", "digits-agent-1", "--device", "cpu"]
    assert "FEDKUBE_JOIN_TOKEN" not in _env(container)
    with pytest.raises(ValueError, match="outside"):
        r.agent_pod(JOB, spec, 2, SETTINGS)


def test_join_token_reaches_coordinator_as_file_and_agents_as_env() -> None:
    spec = _spec(simulation={"clients": 1}, coordinator={"joinTokenSecret": "fj-token"})
    dep = r.coordinator_deployment(JOB, spec, SETTINGS)
    pod = dep["spec"]["template"]["spec"]
    command = _container(pod)["command"]
    assert command[command.index("--join-token-file") + 1] == "/etc/fedkube-token/token"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["join-token"]["secret"]["secretName"] == "fj-token"
    mounts = {m["name"]: m["mountPath"] for m in _container(pod)["volumeMounts"]}
    assert mounts["join-token"] == "/etc/fedkube-token"
    agent = _container(r.agent_pod(JOB, spec, 0, SETTINGS)["spec"])
    assert _env(agent)["FEDKUBE_JOIN_TOKEN"] == {
        "secretKeyRef": {"name": "fj-token", "key": "token"}}


def test_tls_secret_gives_the_coordinator_its_key_and_agents_only_the_ca() -> None:
    spec = _spec(simulation={"clients": 1}, coordinator={"tlsSecret": "fj-tls"})
    pod = r.coordinator_deployment(JOB, spec, SETTINGS)["spec"]["template"]["spec"]
    command = _container(pod)["command"]
    assert command[command.index("--tls-cert") + 1] == "/etc/fedkube-tls/tls.crt"
    assert command[command.index("--tls-key") + 1] == "/etc/fedkube-tls/tls.key"
    agent_pod = r.agent_pod(JOB, spec, 0, SETTINGS)["spec"]
    agent_command = _container(agent_pod)["command"]
    assert agent_command[agent_command.index("--tls-ca") + 1] == "/etc/fedkube-tls/ca.crt"
    (secret_volume,) = [v for v in agent_pod["volumes"] if "secret" in v]
    assert secret_volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]


def test_client_ca_secret_mounts_only_the_ca_into_the_coordinator() -> None:
    spec = _spec(coordinator={"tlsSecret": "fj-tls", "clientCaSecret": "fj-client-ca"})
    filled = r.with_operator_defaults(spec, SETTINGS)
    deployment = r.coordinator_deployment(JOB, filled, SETTINGS)
    pod = deployment["spec"]["template"]["spec"]
    command = _container(pod)["command"]
    assert command[command.index("--tls-client-ca") + 1] == "/etc/fedkube-client-ca/ca.crt"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["client-ca"]["secret"] == {
        "secretName": "fj-client-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    mounts = {m["name"]: m for m in _container(pod)["volumeMounts"]}
    assert mounts["client-ca"] == {"name": "client-ca", "mountPath": "/etc/fedkube-client-ca",
                                   "readOnly": True}
    kubernetes_validate.validate(deployment, "1.34.0", strict=True)
    # The flags are the CLI's own.
    from fedkube.runtime.cli import build_parser

    parsed = build_parser().parse_args(command[1:])
    assert (parsed.tls_cert, parsed.tls_client_ca) == (
        "/etc/fedkube-tls/tls.crt", "/etc/fedkube-client-ca/ca.crt")
    # Without one, no flag and no volume.
    plain = r.coordinator_command(_spec(coordinator={"tlsSecret": "fj-tls"}), SETTINGS)
    assert "--tls-client-ca" not in plain


@pytest.mark.parametrize(("spec", "settings", "complaint"), [
    ({"coordinator": {"clientCaSecret": "ca"}}, SETTINGS, "needs spec.coordinator.tlsSecret"),
    ({"coordinator": {"tlsSecret": "s", "clientCaSecret": "ca"}, "simulation": {"clients": 2}},
     SETTINGS, "spec.simulation.clients"),
    ({"simulation": {"clients": 1}}, OperatorSettings(default_tls_secret="s",
                                                      default_client_ca_secret="ca"),
     "spec.simulation.clients"),
])
def test_mutual_tls_that_cannot_run_is_refused_naming_the_field(
        spec: dict[str, Any], settings: OperatorSettings, complaint: str) -> None:
    with pytest.raises(ManifestError, match="spec.coordinator.clientCaSecret") as refused:
        r.with_operator_defaults(_spec(**spec), settings)
    assert complaint in str(refused.value)


def test_metrics_port_is_opt_in() -> None:
    assert "--metrics-port" not in r.coordinator_command(_spec(), SETTINGS)
    settings = OperatorSettings(coordinator_metrics_port=9400)
    command = r.coordinator_command(_spec(), settings)
    assert command[command.index("--metrics-port") + 1] == "9400"
    ports = r.coordinator_service(JOB, _spec(), settings)["spec"]["ports"]
    assert [p["name"] for p in ports] == ["grpc", "metrics"]


def test_coordinator_rbac_is_least_privilege() -> None:
    role = r.coordinator_role(JOB)
    grants = {(g, res, v) for rule in role["rules"] for g in rule["apiGroups"]
              for res in rule["resources"] for v in rule["verbs"]}
    assert grants == {
        ("fedkube.io", "federatedjobs", "get"),
        ("fedkube.io", "federatedjobs/status", "get"),
        ("fedkube.io", "federatedjobs/status", "patch"),
        ("fedkube.io", "clientnodes", "get"),
        ("fedkube.io", "clientnodes", "list"),
        ("fedkube.io", "clientnodes", "create"),
        ("fedkube.io", "clientnodes", "patch"),
        ("fedkube.io", "clientnodes/status", "get"),
        ("fedkube.io", "clientnodes/status", "patch"),
        ("", "events", "create"),
    }
    job_rules = [rule for rule in role["rules"] if "federatedjobs" in rule["resources"][0]]
    assert all(rule["resourceNames"] == ["digits"] for rule in job_rules)
    binding = r.coordinator_role_binding(JOB)
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "digits-coordinator", "namespace": "team-a"}]


def test_running_children_leave_the_config_map() -> None:
    spec = _spec(simulation={"clients": 2})
    kinds = sorted(c["kind"] for c in r.running_children(JOB, spec, SETTINGS))
    assert kinds == ["Deployment", "Pod", "Pod", "Service"]


def test_builders_do_not_mutate_the_spec() -> None:
    spec = _spec(simulation={"clients": 2}, coordinator={"joinTokenSecret": "t", "tlsSecret": "s"})
    before = copy.deepcopy(spec.model_dump())
    first = r.job_children(JOB, spec, SETTINGS)
    r.job_children(JOB, spec, SETTINGS)[0]["metadata"]["labels"]["x"] = "y"
    assert spec.model_dump() == before
    assert "x" not in first[0]["metadata"]["labels"]
    assert r.job_children(JOB, spec, SETTINGS) == first


@pytest.mark.parametrize("secure", [False, True])
def test_children_are_valid_kubernetes_objects(secure: bool) -> None:
    coordinator = ({"joinTokenSecret": "t", "tlsSecret": "s", "checkpointVolumeClaim": "c",
                    "resources": {"requests": {"memory": "1Gi"}}} if secure else {})
    spec = _spec(simulation={"clients": 2}, coordinator=coordinator)
    settings = OperatorSettings(coordinator_metrics_port=9400 if secure else 0)
    for child in r.job_children(JOB, spec, settings):
        kubernetes_validate.validate(child, "1.34.0", strict=True)


def test_settings_from_env() -> None:
    settings = OperatorSettings.from_env({
        "FEDKUBE_IMAGE": "x:1", "FEDKUBE_OFFLINE_AFTER_SECONDS": "2.5",
        "FEDKUBE_COORDINATOR_METRICS_PORT": "9400"})
    assert (settings.image, settings.offline_after_seconds, settings.coordinator_metrics_port) == (
        "x:1", 2.5, 9400)
    assert OperatorSettings.from_env({}) == OperatorSettings()
    with pytest.raises(ValueError, match="offline_after_seconds"):
        OperatorSettings.from_env({"FEDKUBE_OFFLINE_AFTER_SECONDS": "0"})


# ------------------------------------------------------------------ RBAC YAML files

RBAC = Path(__file__).resolve().parents[2] / "operator" / "rbac"


def _grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, res, v) for rule in rules for g in rule["apiGroups"]
            for res in rule["resources"] for v in rule["verbs"]}


def test_coordinator_role_template_mirrors_the_builder() -> None:
    documents = list(yaml.safe_load_all((RBAC / "coordinator-role.yaml").read_text()))
    role = next(d for d in documents if d["kind"] == "Role")
    built = r.coordinator_role(r.JobRef(name="JOB_NAME", namespace="NAMESPACE"))
    assert role["rules"] == built["rules"]
    assert role["metadata"] == built["metadata"]
    assert {d["kind"] for d in documents} == {"Role", "ServiceAccount", "RoleBinding"}


def test_operator_role_covers_what_it_creates_and_what_it_grants() -> None:
    (role,) = yaml.safe_load_all((RBAC / "operator-role.yaml").read_text())
    kubernetes_validate.validate(role, "1.34.0", strict=True)
    grants = _grants(role["rules"])
    spec = _spec(simulation={"clients": 1}, coordinator={"joinTokenSecret": "t"})
    for child in r.job_children(JOB, spec, SETTINGS):
        group = child["apiVersion"].rpartition("/")[0]
        assert (group, f"{child['kind'].lower()}s", "create") in grants, child["kind"]
    for child in r.running_children(JOB, spec, SETTINGS):
        group = child["apiVersion"].rpartition("/")[0]
        assert (group, f"{child['kind'].lower()}s", "delete") in grants, child["kind"]
    # RBAC refuses to let a subject grant what it does not hold (no escalate verb here).
    assert _grants(r.coordinator_rules(JOB)) <= grants
    assert not any("*" in rule["verbs"] or "*" in rule["resources"] for rule in role["rules"])
    assert not any(v in {"escalate", "bind", "impersonate"} for _, _, v in grants)
    assert ("", "secrets", "get") not in grants  # secrets are mounted, never read


# ------------------------------------------------------------- coordinator health


def _pod(name: str = "digits-coordinator-abc", *, phase: str = "Running", ready: bool = False,
         waiting: str | None = None, restarts: int = 0, last_exit: int | None = None,
         ) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "coordinator", "ready": ready, "restartCount": restarts,
                                 "state": {"waiting": {"reason": waiting}} if waiting else {}}
    if last_exit is not None:
        container["lastState"] = {"terminated": {"exitCode": last_exit}}
    return {"metadata": {"name": name}, "status": {
        "phase": phase, "containerStatuses": [container],
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


DEPLOYMENT: dict[str, Any] = {"metadata": {"name": "digits-coordinator"}, "status": {}}


def test_health_of_a_serving_coordinator() -> None:
    assert r.coordinator_health(DEPLOYMENT, [_pod(ready=True)]) == r.CoordinatorHealth(True, None)


def test_health_of_a_starting_coordinator_is_not_a_failure() -> None:
    assert r.coordinator_health(DEPLOYMENT, []) == r.CoordinatorHealth(False, None)
    assert r.coordinator_health(DEPLOYMENT, [_pod(phase="Pending")]).failure is None


@pytest.mark.parametrize(("pod", "expected"), [
    (_pod(phase="Failed"), "failed"),
    (_pod(waiting="CrashLoopBackOff"), "CrashLoopBackOff"),
    (_pod(waiting="ImagePullBackOff"), "ImagePullBackOff"),
    (_pod(restarts=2, last_exit=1), "restarted 2 time(s), last exit code 1"),
])
def test_health_of_a_failing_coordinator(pod: dict[str, Any], expected: str) -> None:
    health = r.coordinator_health(DEPLOYMENT, [pod])
    assert not health.ready
    assert health.failure is not None and expected in health.failure
    assert "digits-coordinator-abc" in health.failure


def test_health_without_a_deployment() -> None:
    health = r.coordinator_health(None, [])
    assert not health.ready and health.failure is not None and "missing" in health.failure


def test_a_ready_pod_outweighs_a_leftover_failed_one() -> None:
    health = r.coordinator_health(DEPLOYMENT, [_pod("old", phase="Failed"), _pod(ready=True)])
    assert health == r.CoordinatorHealth(True, None)


def test_a_stuck_rollout_is_a_failure() -> None:
    deployment = {"status": {"conditions": [{"type": "Progressing", "status": "False",
                                             "reason": "ProgressDeadlineExceeded",
                                             "message": "took too long"}]}}
    assert "took too long" in (r.coordinator_health(deployment, []).failure or "")


# ------------------------------------------------------------------- spec changes


def test_mutable_changes_are_not_refused() -> None:
    running = _spec(simulation={"clients": 4}, clientsPerRound=2)
    requested = _spec(simulation={"clients": 4}, clientsPerRound=3, rounds=8)
    assert r.changed_fields(running, requested) == ["spec.clientsPerRound", "spec.rounds"]
    assert r.immutable_changes(running, requested) == []
    effective = r.with_mutable_fields(running, requested)
    assert (effective.rounds, effective.clients_per_round) == (8, 3)


def test_immutable_changes_are_named_and_not_applied() -> None:
    running = _spec(simulation={"clients": 4})
    requested = _spec(simulation={"clients": 4}, model="cnn8", rounds=5,
                      data={"partition": "dirichlet"})
    assert r.immutable_changes(running, requested) == ["spec.data.partition", "spec.model"]
    effective = r.with_mutable_fields(running, requested)
    assert effective.model == "mlp" and effective.data.partition == "iid"
    assert effective.rounds == 5


def test_spelling_out_a_default_is_no_change() -> None:
    assert r.changed_fields(_spec(), _spec(optimizer="sgd", seed=0)) == []


def test_a_mutable_change_that_breaks_the_spec_is_refused() -> None:
    # Valid on its own, but simulation.clients cannot follow it to the running job.
    running = _spec(simulation={"clients": 2})
    requested = _spec(simulation={"clients": 8}, clientsPerRound=5)
    assert r.immutable_changes(running, requested) == ["spec.simulation.clients"]
    with pytest.raises(ManifestError, match="clientsPerRound"):
        r.with_mutable_fields(running, requested)


# ----------------------------------------------------------- operator-wide defaults

ADMIN = OperatorSettings.from_env({
    "FEDKUBE_IMAGE_PULL_SECRETS": "regcred, mirror",
    "FEDKUBE_COORDINATOR_TLS_SECRET": "fedkube-tls",
    "FEDKUBE_COORDINATOR_JOIN_TOKEN_SECRET": "fedkube-token",
    "FEDKUBE_COORDINATOR_CLIENT_CA_SECRET": "fedkube-client-ca",
    "FEDKUBE_COORDINATOR_RESOURCES": '{"requests": {"cpu": "500m"}, "limits": {"memory": "4Gi"}}',
})


def test_settings_read_the_charts_variables() -> None:
    assert ADMIN.image_pull_secrets == ("regcred", "mirror")
    assert (ADMIN.default_tls_secret, ADMIN.default_join_token_secret) == (
        "fedkube-tls", "fedkube-token")
    assert ADMIN.default_coordinator_resources is not None
    assert ADMIN.default_coordinator_resources.to_wire() == {
        "requests": {"cpu": "500m"}, "limits": {"memory": "4Gi"}}
    with pytest.raises(ValueError, match="FEDKUBE_COORDINATOR_RESOURCES"):
        OperatorSettings.from_env({"FEDKUBE_COORDINATOR_RESOURCES": '{"requests": {"cpu": 1}}'})


def test_operator_defaults_fill_only_what_the_job_leaves_unset() -> None:
    filled = r.with_operator_defaults(_spec(), ADMIN)
    assert (filled.coordinator.tls_secret, filled.coordinator.join_token_secret,
            filled.coordinator.client_ca_secret) == (
        "fedkube-tls", "fedkube-token", "fedkube-client-ca")
    assert filled.coordinator.resources == ADMIN.default_coordinator_resources
    own = _spec(coordinator={"tlsSecret": "mine", "resources": {"limits": {"cpu": "1"}}})
    kept = r.with_operator_defaults(own, ADMIN)
    assert kept.coordinator.tls_secret == "mine"
    assert kept.coordinator.resources is not None
    assert kept.coordinator.resources.to_wire() == {"limits": {"cpu": "1"}}
    assert kept.coordinator.join_token_secret == "fedkube-token"
    assert own.coordinator.join_token_secret is None  # the input is not modified
    assert r.with_operator_defaults(_spec(), SETTINGS) == _spec(
        simulation={"resources": SETTINGS.default_agent_resources.to_wire()})


def test_defaults_do_not_count_as_spec_changes() -> None:
    running = r.with_operator_defaults(_spec(), ADMIN)
    requested = r.with_operator_defaults(_spec(rounds=9), ADMIN)
    assert r.immutable_changes(running, requested) == []


def test_pull_secrets_reach_every_pod() -> None:
    spec = _spec(simulation={"clients": 1})
    pods = [r.coordinator_deployment(JOB, spec, ADMIN)["spec"]["template"]["spec"],
            r.agent_pod(JOB, spec, 0, ADMIN)["spec"]]
    for pod in pods:
        assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    assert "imagePullSecrets" not in r.agent_pod(JOB, spec, 0, SETTINGS)["spec"]


def test_agent_pods_get_requests_and_limits_from_the_job_or_the_operator() -> None:
    default = r.agent_pod(JOB, _spec(simulation={"clients": 1}), 0, SETTINGS)
    resources = default["spec"]["containers"][0]["resources"]
    assert resources == SETTINGS.default_agent_resources.to_wire()
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    admin = OperatorSettings.from_env({"FEDKUBE_AGENT_RESOURCES": '{"limits": {"cpu": "3"}}'})
    assert r.agent_pod(JOB, _spec(simulation={"clients": 1}), 0, admin)[
        "spec"]["containers"][0]["resources"] == {"limits": {"cpu": "3"}}
    own = _spec(simulation={"clients": 2, "resources": {"requests": {"memory": "3Gi"}}})
    for pod in r.agent_pods(JOB, r.with_operator_defaults(own, admin), admin):
        assert pod["spec"]["containers"][0]["resources"] == {"requests": {"memory": "3Gi"}}
    with pytest.raises(ValueError, match="FEDKUBE_AGENT_RESOURCES"):
        OperatorSettings.from_env({"FEDKUBE_AGENT_RESOURCES": "{not json"})
