"""Server-side apply in the Kubernetes emulator behaves as kube-apiserver's does, as far as
fedkube's writers, kubectl and the kubernetes client can tell: field managers, list-maps
merged by key, removal of what a manager stops applying, conflicts and force."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from fedkube.runtime.kube.client import APPLY_PATCH, KubeClient, object_path
from k8s import apply as ssa
from k8s.apiserver import KubeApi
from kubernetes.client.exceptions import ApiException
from support import REPO

Kubectl = Callable[..., "subprocess.CompletedProcess[str]"]
NS = "default"
JOB = {"apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
       "metadata": {"name": "j", "namespace": NS}}


@pytest.fixture
def client(kube_api: KubeApi) -> KubeClient:
    for crd in sorted((REPO / "crds").glob("*.yaml")):
        kube_api.apply_file(crd)
    kube_api.apply({**JOB, "spec": {"model": "mlp"}})
    return KubeClient(kube_api.api_client)


def _status(client: KubeClient, manager: str, status: dict[str, Any], *,
            force: bool = False) -> dict[str, Any]:
    return client.apply({**JOB, "status": status}, field_manager=manager, force=force,
                        subresource="status")


def _managed(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["manager"]: e for e in obj["metadata"].get("managedFields") or []}


def _condition(type_: str, status: str = "True", **extra: Any) -> dict[str, Any]:
    return {"type": type_, "status": status, **extra}


def test_apply_creates_an_object_and_records_its_manager(kube_api: KubeApi) -> None:
    client = KubeClient(kube_api.api_client)
    created = client.apply({"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"name": "c", "namespace": NS, "labels": {"a": "1"}},
                            "data": {"k": "v"}}, field_manager="me")
    assert created["data"] == {"k": "v"} and created["metadata"]["uid"]
    (entry,) = created["metadata"]["managedFields"]
    assert (entry["manager"], entry["operation"], entry["fieldsType"]) == (
        "me", "Apply", "FieldsV1")
    assert entry["fieldsV1"] == {"f:data": {"f:k": {}},
                                 "f:metadata": {"f:labels": {"f:a": {}}}}
    # The same apply again changes nothing: no new resourceVersion.
    again = client.apply({"apiVersion": "v1", "kind": "ConfigMap",
                          "metadata": {"name": "c", "namespace": NS, "labels": {"a": "1"}},
                          "data": {"k": "v"}}, field_manager="me")
    assert again["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


def test_two_managers_share_the_conditions_list_by_type(client: KubeClient) -> None:
    _status(client, "operator", {"endpoint": "e:1", "conditions": [_condition("Ready")]})
    _status(client, "coordinator", {"phase": "Running", "conditions": [
        _condition("Converged", "False")]})
    # Each apply is the whole of what its manager says: the other's entries stay.
    job = _status(client, "operator", {"endpoint": "e:1", "conditions": [
        _condition("Ready", "False", reason="Starting")]})
    status = job["status"]
    assert [(c["type"], c["status"]) for c in status["conditions"]] == [
        ("Ready", "False"), ("Converged", "False")]
    assert (status["endpoint"], status["phase"]) == ("e:1", "Running")
    managed = _managed(job)
    assert managed["operator"]["subresource"] == "status"
    assert managed["operator"]["fieldsV1"]["f:status"]["f:conditions"] == {
        'k:{"type":"Ready"}': {".": {}, "f:type": {}, "f:status": {}, "f:reason": {}}}
    assert set(managed["coordinator"]["fieldsV1"]["f:status"]) == {"f:phase", "f:conditions"}


def test_what_a_manager_stops_applying_is_removed_unless_another_owns_it(
        client: KubeClient) -> None:
    _status(client, "operator", {"endpoint": "e:1", "conditions": [
        _condition("Ready"), _condition("Degraded")]})
    _status(client, "coordinator", {"phase": "Running", "message": "going"})
    _status(client, "coordinator", {"phase": "Running", "message": "going",
                                    "conditions": [_condition("Degraded")]})  # shared now
    job = _status(client, "operator", {"conditions": [_condition("Ready")]})
    status = job["status"]
    assert "endpoint" not in status  # nobody else owned it
    assert [c["type"] for c in status["conditions"]] == ["Ready", "Degraded"]  # still owned
    job = _status(client, "coordinator", {"phase": "Succeeded"})
    assert "message" not in job["status"]
    assert [c["type"] for c in job["status"]["conditions"]] == ["Ready"]


def test_a_field_owned_by_another_manager_conflicts_unless_forced(client: KubeClient) -> None:
    _status(client, "coordinator", {"phase": "Running"})
    with pytest.raises(ApiException) as refused:
        _status(client, "operator", {"phase": "Failed"})
    assert refused.value.status == 409
    body = json.loads(refused.value.body)
    assert body["reason"] == "Conflict"
    assert body["details"]["causes"] == [{"type": "FieldManagerConflict", "field": ".status.phase",
                                          "message": 'conflict with "coordinator"'}]
    # The same value is no conflict: the field is shared.
    shared = _status(client, "operator", {"phase": "Running"})
    assert {"coordinator", "operator"} <= set(_managed(shared))
    # Forced, the field moves to the applier.
    taken = _status(client, "operator", {"phase": "Failed"}, force=True)
    assert taken["status"]["phase"] == "Failed"
    assert "coordinator" not in _managed(taken)  # it owned nothing else


def test_apply_needs_a_field_manager_and_honours_a_resource_version(
        client: KubeClient) -> None:
    with pytest.raises(ApiException) as missing:
        client.request("PATCH", object_path("fedkube.io/v1alpha1", "FederatedJob", NS, "j",
                                            "status"),
                       body={**JOB, "status": {}}, content_type=APPLY_PATCH)
    assert missing.value.status == 400 and "fieldManager" in missing.value.body
    current = client.get("fedkube.io/v1alpha1", "FederatedJob", NS, "j")
    assert current is not None
    stale = {**JOB, "metadata": {**JOB["metadata"], "resourceVersion": "1"}, "status": {}}
    with pytest.raises(ApiException) as conflict:
        client.apply(stale, field_manager="me", subresource="status")
    assert conflict.value.status == 409
    with pytest.raises(ApiException) as items:
        _status(client, "me", {"conditions": [{"status": "True"}]})
    assert items.value.status == 422 and ".status.conditions" in items.value.body


def test_kubectl_server_side_apply_conflicts_and_forces(kube_api: KubeApi, kubectl: Kubectl,
                                                        tmp_path: Any) -> None:
    manifest = tmp_path / "cm.yaml"
    manifest.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n"
                        "data: {k: one}\n")
    first = kubectl("apply", "--server-side", "-f", str(manifest))
    assert first.returncode == 0, first.stderr
    manifest.write_text(manifest.read_text().replace("one", "two"))
    refused = kubectl("apply", "--server-side", "--field-manager=other", "-f", str(manifest))
    assert refused.returncode != 0 and "conflict" in refused.stderr.lower(), refused.stderr
    forced = kubectl("apply", "--server-side", "--field-manager=other", "--force-conflicts",
                     "-f", str(manifest))
    assert forced.returncode == 0, forced.stderr
    assert kube_api.get("v1/configmaps", "c", NS)["data"] == {"k": "two"}


# ------------------------------------------------------------------ pure machinery


def test_field_sets_encode_as_fields_v1_and_back() -> None:
    keys = ssa.list_keys_from_schema({"type": "object", "properties": {"status": {
        "type": "object", "properties": {"conditions": {
            "type": "array", "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"], "items": {"type": "object"}}}}}})
    config = {"apiVersion": "v", "kind": "K", "metadata": {"name": "n"},
              "status": {"phase": "Running", "tags": ["a", "b"],
                         "conditions": [{"type": "Ready", "status": "True"}]}}
    fields = ssa.fields_of(config, keys)
    assert fields == {("f:status", "f:phase"), ("f:status", "f:tags"),
                      ("f:status", "f:conditions", 'k:{"type":"Ready"}'),
                      ("f:status", "f:conditions", 'k:{"type":"Ready"}', "f:type"),
                      ("f:status", "f:conditions", 'k:{"type":"Ready"}', "f:status")}
    assert ssa.decode(ssa.encode(fields)) == fields
    assert ssa.show(("f:status", "f:conditions", 'k:{"type":"Ready"}', "f:status")) == (
        '.status.conditions[type="Ready"].status')


def test_a_condition_of_the_same_type_from_two_managers_conflicts_on_its_fields() -> None:
    keys = ssa.list_keys_from_schema({"type": "object", "properties": {"status": {
        "type": "object", "properties": {"conditions": {
            "type": "array", "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"], "items": {"type": "object"}}}}}})
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    obj = ssa.apply({"apiVersion": "v"}, ready, manager="operator", subresource="status",
                    force=False, keys=keys, now="t1")
    not_ready = {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}
    with pytest.raises(ssa.ApplyError) as refused:
        ssa.apply(obj, not_ready, manager="coordinator", subresource="status", force=False,
                  keys=keys, now="t2")
    assert refused.value.code == 409
    assert [c["field"] for c in refused.value.causes] == [
        '.status.conditions[type="Ready"].status']
    forced = ssa.apply(obj, not_ready, manager="coordinator", subresource="status",
                       force=True, keys=keys, now="t2")
    assert forced["status"]["conditions"] == [{"type": "Ready", "status": "False"}]
    owners = {e["manager"]: ssa.decode(e["fieldsV1"]) for e in forced["metadata"]["managedFields"]}
    status_field = ("f:status", "f:conditions", 'k:{"type":"Ready"}', "f:status")
    assert status_field in owners["coordinator"] and status_field not in owners["operator"]
