"""The request audit that stands in for RBAC enforcement (tests/k8s/audit.py): real HTTP
requests with service account tokens, decided from the Roles and bindings in the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.config
import pytest
from fedkube.operator import resources
from k8s import audit
from k8s.apiserver import KubeApi
from kubernetes.client.exceptions import ApiException

NS = "default"


def _client_as(api: KubeApi, path: Path, token: str | None) -> kubernetes.client.ApiClient:
    return kubernetes.config.new_client_from_config(
        config_file=str(api.write_kubeconfig(path, token=token)))


def _get_config_map(client: kubernetes.client.ApiClient, name: str) -> None:
    # The emulator answers whatever RBAC says: only the audit knows.
    with pytest.raises(ApiException, match="Not Found"):
        kubernetes.client.CoreV1Api(client).read_namespaced_config_map(name, NS)


@pytest.fixture
def api(tmp_path: Path) -> Any:
    # Its own server, not `kube_api`: these tests make refused requests on purpose.
    with KubeApi(tmp_path / "api") as server:
        server.audit = audit.RequestAudit(server.server)
        server.server.observers.append(server.audit)
        yield server


def test_an_unbound_service_account_is_refused_and_a_role_binding_allows(api: Any,
                                                                        tmp_path: Path) -> None:
    user = audit.service_account_user(NS, "reader")
    client = _client_as(api, tmp_path / "reader", audit.service_account_token(NS, "reader"))
    _get_config_map(client, "settings")
    assert [str(a) for a in api.audit.denied()] == [
        f"{user}: get core/configmaps 'settings' in {NS}"]
    api.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "read"},
               "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"],
                          "resourceNames": ["settings"]}]})
    api.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "read"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                           "name": "read"},
               "subjects": [{"kind": "ServiceAccount", "name": "reader"}]})
    _get_config_map(client, "settings")
    _get_config_map(client, "other")  # resourceNames: only `settings`
    # A workload's Role collected before the workload stops (a job being deleted) still
    # counts: a request refused then is a race, not a missing rule.
    api.delete("rbac.authorization.k8s.io/v1/roles", "read")
    _get_config_map(client, "settings")
    decisions = [(d.access.name, d.allowed) for d in api.audit.decisions]
    assert decisions == [("settings", False), ("settings", True), ("other", False),
                         ("settings", True)]
    assert "'other' in default" in api.audit.report()
    client.close()


def test_cluster_roles_bind_everywhere_and_roles_only_in_their_namespace(api: Any) -> None:
    api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}})
    rules = [{"apiGroups": ["fedkube.io"], "resources": ["federatedjobs/status"],
              "verbs": ["patch"]}]
    api.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "w", "namespace": "team-a"}, "rules": rules})
    api.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "w", "namespace": "team-a"},
               "roleRef": {"kind": "Role", "name": "w"},
               "subjects": [{"kind": "ServiceAccount", "name": "c", "namespace": "team-a"}]})
    user = audit.service_account_user("team-a", "c")
    server = api.server

    def allowed(namespace: str | None, subresource: str | None = "status") -> bool:
        access = audit.Access(user, "patch", "fedkube.io", "federatedjobs", subresource,
                              namespace, "j")
        return audit.rules_allow(api.call(audit.stored_rules, server, access), access)

    assert allowed("team-a") and not allowed(NS) and not allowed(None)
    assert not allowed("team-a", subresource=None)  # the object itself is another resource


def test_the_operator_grants_each_coordinator_what_its_status_writer_uses(
        api: Any, tmp_path: Path) -> None:
    # One call of each kind the writer makes, with the pod's credentials.
    ref = resources.JobRef(name="digits", namespace=NS)
    for obj in (resources.coordinator_service_account(ref), resources.coordinator_role(ref),
                resources.coordinator_role_binding(ref)):
        api.apply(obj)
    token = audit.service_account_token(NS, resources.coordinator_name("digits"))
    client = _client_as(api, tmp_path / "coordinator", token)
    custom = kubernetes.client.CustomObjectsApi(client)
    for call in (lambda: custom.get_namespaced_custom_object_status(
                     "fedkube.io", "v1alpha1", NS, "federatedjobs", "digits"),
                 lambda: custom.list_namespaced_custom_object(
                     "fedkube.io", "v1alpha1", NS, "clientnodes"),
                 lambda: custom.get_namespaced_custom_object(
                     "fedkube.io", "v1alpha1", NS, "federatedjobs", "someone-else")):
        try:
            call()
        except ApiException:
            pass  # no CRDs here: the decision is what is tested
    decisions = [(d.access.verb, d.access.rule_resource, d.allowed)
                 for d in api.audit.decisions]
    assert decisions == [("get", "federatedjobs/status", True),
                         ("list", "clientnodes", True),
                         ("get", "federatedjobs", False)]  # not its own job
    client.close()


def test_admin_tools_and_the_test_itself_are_not_judged(api: Any, tmp_path: Path) -> None:
    admin = _client_as(api, tmp_path / "admin", audit.ADMIN_TOKEN)
    anonymous = _client_as(api, tmp_path / "anonymous", None)
    _get_config_map(admin, "x")
    _get_config_map(anonymous, "x")
    users = [(d.access.user, d.allowed) for d in api.audit.decisions]
    assert users == [(audit.ADMIN_USER, True), (audit.ANONYMOUS, False)]
    assert api.audit.denied() == []  # anonymous: a test's raw call, not a workload
    assert audit.user_of(None, "kubectl/v1.37.1 (linux/amd64)") == audit.ADMIN_USER
    assert audit.user_of(None, "Helm/3.17.2") == audit.ADMIN_USER
    admin.close()
    anonymous.close()
