"""The Kubernetes emulator and the local kubelet behave as kube-apiserver and a kubelet do,
as far as kubectl, the kubernetes client and kopf can tell."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from typing import Any

import kopf
import kubernetes.client
import pytest
from k8s import machinery, schema
from k8s.apiserver import KubeApi
from k8s.kopf_thread import OperatorThread, login_to
from k8s.kubelet import LocalKubelet, Rewriter, expand_references, resolve_command
from kubernetes.client.exceptions import ApiException

Kubectl = Callable[..., "subprocess.CompletedProcess[str]"]

WIDGETS_CRD = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
    - name: v1
      served: true
      storage: true
      subresources: {status: {}}
      additionalPrinterColumns:
        - {name: Phase, type: string, jsonPath: .status.phase}
        - {name: Size, type: integer, jsonPath: .spec.size}
        - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [size]
              properties:
                size: {type: integer, minimum: 1}
                color: {type: string, enum: [blue, red], default: blue}
            status:
              type: object
              x-kubernetes-preserve-unknown-fields: true
"""
WIDGETS = "example.com/v1/widgets"


def widget(name: str, size: int = 1, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "example.com/v1", "kind": "Widget",
            "metadata": {"name": name, **meta}, "spec": {"size": size}}


# ------------------------------------------------------------------- kubectl


def test_kubectl_applies_gets_and_deletes_a_configmap(kubectl: Kubectl, kube_api: KubeApi) -> None:
    manifest = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {a: '1'}\n"
    dry = kubectl("apply", "--dry-run=server", "-f", "-", input=manifest)
    assert "configmap/settings created (server dry run)" in dry.stdout, dry.stderr
    assert kube_api.get("configmaps", "settings") is None
    created = kubectl("apply", "-f", "-", input=manifest)
    assert created.returncode == 0, created.stderr
    assert "configmap/settings created" in created.stdout

    changed = kubectl("apply", "-f", "-", input=manifest.replace("'1'", "'2'"))
    assert "configmap/settings configured" in changed.stdout, changed.stderr
    stored = kube_api.get("configmaps", "settings")
    assert stored is not None and stored["data"] == {"a": "2"}
    assert "kubectl.kubernetes.io/last-applied-configuration" in stored["metadata"]["annotations"]

    listed = kubectl("get", "cm")
    assert listed.stdout.split()[:2] == ["NAME", "AGE"] and "settings" in listed.stdout

    deleted = kubectl("delete", "cm", "settings")
    assert deleted.returncode == 0, deleted.stderr
    assert kube_api.get("configmaps", "settings") is None
    missing = kubectl("get", "cm", "settings")
    assert missing.returncode == 1
    assert 'configmaps "settings" not found' in missing.stderr


def test_kubectl_shows_a_crds_printer_columns(kubectl: Kubectl, kube_api: KubeApi) -> None:
    assert kubectl("apply", "-f", "-", input=WIDGETS_CRD).returncode == 0
    applied = kubectl("apply", "-f", "-", input="apiVersion: example.com/v1\nkind: Widget\n"
                      "metadata: {name: w1}\nspec: {size: 3}\n")
    assert "widget.example.com/w1 created" in applied.stdout, applied.stderr
    kube_api.patch(WIDGETS, "w1", {"status": {"phase": "Running"}}, subresource="status")

    table = kubectl("get", "wd")  # the short name, found through discovery
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "SIZE", "AGE"]
    assert row.split()[:3] == ["w1", "Running", "3"]

    resources = kubectl("api-resources", "--api-group", "example.com")
    assert "widgets" in resources.stdout and "Widget" in resources.stdout


def test_the_crd_schema_defaults_and_validates(kubectl: Kubectl, kube_api: KubeApi) -> None:
    kube_api.apply(WIDGETS_CRD)
    kube_api.apply(widget("w1", size=2))
    assert kube_api.get(WIDGETS, "w1")["spec"] == {"size": 2, "color": "blue"}

    refused = kubectl("apply", "-f", "-", input="apiVersion: example.com/v1\nkind: Widget\n"
                      "metadata: {name: w2}\nspec: {size: 0, color: green}\n")
    assert refused.returncode == 1
    assert 'The Widget "w2" is invalid' in refused.stderr
    assert "spec.size: Invalid value: 0" in refused.stderr
    assert "spec.color: Unsupported value" in refused.stderr
    assert kube_api.get(WIDGETS, "w2") is None


def test_kubectl_watches_the_table_and_strict_validation_refuses_unknown_fields(
    kubectl: Kubectl, kube_api: KubeApi,
) -> None:
    kube_api.apply(WIDGETS_CRD)
    kube_api.apply(widget("w1", size=3))
    results: list[subprocess.CompletedProcess[str]] = []
    watcher = threading.Thread(target=lambda: results.append(
        kubectl("get", "wd", "--watch", "--request-timeout=2s")))
    watcher.start()

    def watching() -> bool:
        assert any(r.params.get("watch") == "true" for r in list(kube_api.server))
        return True

    _eventually(watching)
    kube_api.patch(WIDGETS, "w1", {"status": {"phase": "Up"}}, subresource="status")
    watcher.join()
    rows = [line.split()[:3] for line in results[0].stdout.splitlines()]
    assert rows[0] == ["NAME", "PHASE", "SIZE"] and rows[1][:2] == ["w1", "3"]  # no phase yet
    assert rows[-1] == ["w1", "Up", "3"]

    unknown = kubectl("apply", "-f", "-", input="apiVersion: example.com/v1\nkind: Widget\n"
                      "metadata: {name: w2}\nspec: {size: 3, extra: 1}\n")
    assert unknown.returncode == 1
    assert 'strict decoding error: unknown field "spec.extra"' in unknown.stderr
    lenient = kubectl("apply", "--validate=false", "-f", "-", input="apiVersion: example.com/v1"
                      "\nkind: Widget\nmetadata: {name: w2}\nspec: {size: 3, extra: 1}\n")
    assert lenient.returncode == 0, lenient.stderr
    assert kube_api.get(WIDGETS, "w2")["spec"] == {"size": 3, "color": "blue"}  # pruned


def test_deleting_a_crd_stops_serving_its_resource(kubectl: Kubectl, kube_api: KubeApi) -> None:
    kube_api.apply(WIDGETS_CRD)
    kube_api.apply(widget("w1"))
    assert kubectl("delete", "crd", "widgets.example.com").returncode == 0
    assert kube_api.server.objects[WIDGETS, "default", "w1"].deleted
    gone = kubectl("get", "widgets")
    assert gone.returncode == 1 and "NotFound" in gone.stderr
    groups = kubernetes.client.ApisApi(kube_api.api_client).get_api_versions().groups
    assert "example.com" not in {g.name for g in groups}
    assert "apps" in {g.name for g in groups}


# ----------------------------------------------------------- kubernetes client


def test_label_and_field_selectors_filter_lists(kube_api: KubeApi) -> None:
    for name, labels in [("a", {"app": "web", "tier": "front"}), ("b", {"app": "web"}),
                         ("c", {"app": "db", "tier": "back"}), ("d", {})]:
        kube_api.apply({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": name, "labels": labels}})
    core = kubernetes.client.CoreV1Api(kube_api.api_client)

    def names(**query: str) -> list[str]:
        listed = core.list_namespaced_config_map("default", **query)
        return [cm.metadata.name for cm in listed.items]

    assert names(label_selector="app=web") == ["a", "b"]
    assert names(label_selector="app!=web") == ["c", "d"]
    assert names(label_selector="app in (db, cache),tier") == ["c"]
    assert names(label_selector="app notin (db)") == ["a", "b", "d"]
    assert names(label_selector="tier") == ["a", "c"]
    assert names(label_selector="!tier") == ["b", "d"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.name!=b,metadata.namespace=default") == ["a", "c", "d"]
    with pytest.raises(ApiException) as bad:
        names(label_selector="app in (web")
    assert bad.value.status == 400


def test_a_watch_resumes_after_a_resource_version(kube_api: KubeApi) -> None:
    core = kubernetes.client.CoreV1Api(kube_api.api_client)
    first = kube_api.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "w"},
                            "data": {"n": "0"}})[0]
    since = first["metadata"]["resourceVersion"]
    kube_api.patch("configmaps", "w", {"data": {"n": "1"}})
    kube_api.patch("configmaps", "w", {"data": {"n": "1"}})  # a no-op: no event, no version
    kube_api.patch("configmaps", "w", {"data": {"n": "2"}})
    kube_api.delete("configmaps", "w")

    stream = kubernetes.watch.Watch().stream(core.list_namespaced_config_map, "default",
                                             resource_version=since, timeout_seconds=5)
    events = []
    for event in stream:
        events.append((event["type"], event["object"].data["n"],
                       int(event["object"].metadata.resource_version)))
        if len(events) == 3:
            break
    assert [e[:2] for e in events] == [("MODIFIED", "1"), ("MODIFIED", "2"), ("DELETED", "2")]
    versions = [int(since)] + [e[2] for e in events]
    assert versions == sorted(set(versions))  # strictly increasing, one per real change


def test_a_watch_sees_objects_enter_and_leave_its_selector(kube_api: KubeApi) -> None:
    core = kubernetes.client.CoreV1Api(kube_api.api_client)
    since = kube_api.apply({"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"name": "m", "labels": {"on": "no"}}})[0]
    kube_api.patch("configmaps", "m", {"metadata": {"labels": {"on": "yes"}}})
    kube_api.patch("configmaps", "m", {"metadata": {"labels": {"on": "no"}}})
    stream = kubernetes.watch.Watch().stream(
        core.list_namespaced_config_map, "default", label_selector="on=yes",
        resource_version=since["metadata"]["resourceVersion"], timeout_seconds=5)
    seen = [event["type"] for _, event in zip(range(2), stream, strict=False)]
    assert seen == ["ADDED", "DELETED"]


def test_a_watch_can_stream_the_initial_state_up_to_a_bookmark(kube_api: KubeApi) -> None:
    for name in ("x", "y"):
        kube_api.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}})
    url = (f"{kube_api.url}/api/v1/namespaces/default/configmaps?watch=true"
           "&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=10")
    events = []
    with urllib.request.urlopen(url, timeout=10) as stream:
        for line in stream:
            events.append(json.loads(line))
            if events[-1]["type"] == "BOOKMARK":
                break
    assert [(e["type"], e["object"]["metadata"].get("name")) for e in events] == [
        ("ADDED", "x"), ("ADDED", "y"), ("BOOKMARK", None)]
    bookmark = events[-1]["object"]["metadata"]
    assert bookmark["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert int(bookmark["resourceVersion"]) == kube_api.server.resource_version


def test_a_failed_json_patch_test_is_422_and_changes_nothing(kube_api: KubeApi) -> None:
    stored = kube_api.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "p"},
                             "data": {"k": "v"}})[0]
    core = kubernetes.client.CoreV1Api(kube_api.api_client)
    stale = [{"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
             {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]}]
    with pytest.raises(ApiException) as failed:
        core.patch_namespaced_config_map("p", "default", stale)
    assert failed.value.status == 422
    assert kube_api.get("configmaps", "p") == stored

    fresh = [{**stale[0], "value": stored["metadata"]["resourceVersion"]}, stale[1]]
    patched = core.patch_namespaced_config_map("p", "default", fresh)
    assert patched.metadata.finalizers == ["x/y"]


def test_put_with_a_stale_resource_version_is_a_conflict(kube_api: KubeApi) -> None:
    core = kubernetes.client.CoreV1Api(kube_api.api_client)
    body = kube_api.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "r"}})[0]
    kube_api.patch("configmaps", "r", {"data": {"k": "newer"}})
    with pytest.raises(ApiException) as conflict:
        core.replace_namespaced_config_map("r", "default", {**body, "data": {"k": "old"}})
    assert conflict.value.status == 409
    current = kube_api.get("configmaps", "r")
    replaced = core.replace_namespaced_config_map("r", "default", {**current, "data": {"k": "3"}})
    assert replaced.data == {"k": "3"}


def test_status_and_spec_are_written_separately(kube_api: KubeApi) -> None:
    kube_api.apply(WIDGETS_CRD)
    created = kube_api.apply({**widget("s", size=1), "status": {"phase": "Forged"}})[0]
    assert "status" not in created  # ignored on create, as for any status subresource
    assert created["metadata"]["generation"] == 1

    with_status = kube_api.patch(WIDGETS, "s", {"status": {"phase": "Running"},
                                                "spec": {"size": 9}}, subresource="status")
    assert with_status["status"] == {"phase": "Running"} and with_status["spec"]["size"] == 1
    assert with_status["metadata"]["generation"] == 1

    with_spec = kube_api.patch(WIDGETS, "s", {"status": {"phase": "Lost"}, "spec": {"size": 2}})
    assert with_spec["status"] == {"phase": "Running"} and with_spec["spec"]["size"] == 2
    assert with_spec["metadata"]["generation"] == 2

    labelled = kube_api.patch(WIDGETS, "s", {"metadata": {"labels": {"x": "y"}}})
    assert labelled["metadata"]["generation"] == 2  # metadata is not the spec
    assert int(labelled["metadata"]["resourceVersion"]) > int(
        with_spec["metadata"]["resourceVersion"])

    api = kubernetes.client.CustomObjectsApi(kube_api.api_client)
    status = api.get_namespaced_custom_object_status("example.com", "v1", "default", "widgets", "s")
    assert status["status"] == {"phase": "Running"}


def test_deleting_an_owner_collects_its_dependents(kube_api: KubeApi) -> None:
    def config_map(name: str, owner: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
        refs = [{"apiVersion": "v1", "kind": "ConfigMap", "name": owner["metadata"]["name"],
                 "uid": owner["metadata"]["uid"]}] if owner else []
        return kube_api.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": name, "ownerReferences": refs, **meta}})[0]

    root = config_map("root")
    child = config_map("child", root, finalizers=["example.com/hold"])
    config_map("grandchild", child)
    config_map("bystander")

    kube_api.delete("configmaps", "root")
    held = kube_api.get("configmaps", "child")
    assert held is not None and held["metadata"]["deletionTimestamp"]
    assert kube_api.get("configmaps", "grandchild") is not None  # its owner is not gone yet

    kube_api.patch("configmaps", "child", {"metadata": {"finalizers": None}})
    assert kube_api.get("configmaps", "child") is None
    assert kube_api.get("configmaps", "grandchild") is None
    assert kube_api.get("configmaps", "bystander") is not None

    config_map("late", root)  # created after its owner went: collected at once
    assert kube_api.get("configmaps", "late") is None

    shared = config_map("shared", config_map("owner-a"))
    owner_b = config_map("owner-b")
    kube_api.patch("configmaps", "shared", {"metadata": {"ownerReferences": [
        *shared["metadata"]["ownerReferences"],
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner-b",
         "uid": owner_b["metadata"]["uid"]}]}})
    kube_api.delete("configmaps", "owner-a")  # one owner left: kept, without the dead reference
    assert [r["name"] for r in kube_api.get("configmaps", "shared")["metadata"][
        "ownerReferences"]] == ["owner-b"]
    kube_api.delete("configmaps", "owner-b")
    assert kube_api.get("configmaps", "shared") is None

    config_map("kept", config_map("parent"))
    core = kubernetes.client.CoreV1Api(kube_api.api_client)
    core.delete_namespaced_config_map("parent", "default", propagation_policy="Orphan")
    assert kube_api.get("configmaps", "kept")["metadata"]["ownerReferences"] == []


def test_deleting_a_namespace_deletes_what_is_in_it(kube_api: KubeApi) -> None:
    kube_api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}})
    kube_api.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}},
                   namespace="team")
    kube_api.delete("namespaces", "team")
    assert kube_api.get("configmaps", "c", namespace="team") is None
    assert kube_api.get("namespaces", "team") is None
    with pytest.raises(ApiException) as missing:
        kubernetes.client.CoreV1Api(kube_api.api_client).create_namespaced_config_map(
            "team", {"metadata": {"name": "late"}})
    assert missing.value.status == 404


def test_an_injected_fault_leaves_the_state_unchanged(kube_api: KubeApi) -> None:
    import kmock

    kube_api.server["patch", kmock.resource("v1/configmaps")] << 500
    kube_api.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "f"}})
    core = kubernetes.client.CoreV1Api(kube_api.api_client)
    with pytest.raises(ApiException) as failed:
        core.patch_namespaced_config_map("f", "default", {"data": {"k": "v"}})
    assert failed.value.status == 500
    assert "data" not in kube_api.get("configmaps", "f")


# ---------------------------------------------------------------------- kopf


def test_a_kopf_operator_reconciles_and_finalizes(kube_api: KubeApi) -> None:
    kube_api.apply(WIDGETS_CRD)
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(login_to(kube_api))
    deleted = threading.Event()

    @kopf.on.create("example.com", "v1", "widgets", registry=registry)
    def created(spec: dict[str, Any], patch: kopf.Patch, **_: Any) -> None:
        patch.status["phase"] = "Ready"
        patch.status["doubled"] = spec["size"] * 2

    @kopf.on.delete("example.com", "v1", "widgets", registry=registry)
    def removed(**_: Any) -> None:
        deleted.set()

    with OperatorThread(registry=registry):
        kube_api.apply(widget("k1", size=21))
        ready = kube_api.wait_for(WIDGETS, "k1", lambda w: w.get("status", {}).get("phase"))
        assert ready["status"]["doubled"] == 42
        assert ready["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]

        kube_api.delete(WIDGETS, "k1")
        kube_api.wait_gone(WIDGETS, "k1")
        assert deleted.is_set()


# -------------------------------------------------------------------- kubelet


def test_the_kubelet_runs_a_pod_with_a_configmap_volume(
    kube_api: KubeApi, local_kubelet: LocalKubelet, kubectl: Kubectl,
) -> None:
    kube_api.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "reader"}, "spec": {
        "restartPolicy": "Never",
        "containers": [{"name": "main", "image": "fedkube",
                        "command": ["python", "-c", "print(open('/etc/cfg/x').read())"],
                        "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}]}],
        "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}]}})
    waiting = kube_api.wait_for("pods", "reader", lambda p: p["status"].get("containerStatuses"))
    assert waiting["status"]["phase"] == "Pending"  # until its ConfigMap exists
    assert waiting["status"]["containerStatuses"][0]["state"] == {
        "waiting": {"reason": "ContainerCreating"}}
    kube_api.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
                    "data": {"x": "hello from a ConfigMap"}})

    pod = kube_api.wait_for("pods", "reader", lambda p: p["status"]["phase"] in (
        "Succeeded", "Failed"), timeout=20)
    assert pod["status"]["phase"] == "Succeeded", local_kubelet.logs("reader")
    assert pod["status"]["podIP"] == "127.0.0.1"
    (container,) = pod["status"]["containerStatuses"]
    assert container["state"]["terminated"]["exitCode"] == 0
    assert "hello from a ConfigMap" in local_kubelet.logs("reader")
    assert "hello from a ConfigMap" in kubectl("logs", "reader").stdout


def test_the_kubelet_fills_env_and_restarts_by_policy(
    kube_api: KubeApi, local_kubelet: LocalKubelet,
) -> None:
    kube_api.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                    "stringData": {"token": "t0ken"}})
    kube_api.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "coord"},
                    "spec": {"selector": {"app": "c"},
                             "ports": [{"port": 80, "targetPort": 8080}]}})
    script = ("import os, sys; print(os.environ['ME'], os.environ['TOKEN'], os.environ['TARGET'], "
              "sys.argv[1]); sys.exit(3)")
    kube_api.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "env"}, "spec": {
        "restartPolicy": "OnFailure",
        "containers": [{"name": "main", "command": ["python", "-c", script],
                        "args": ["$(ME)@coord.default.svc:80"],
                        "env": [{"name": "ME", "valueFrom": {"fieldRef": {
                                    "fieldPath": "metadata.name"}}},
                                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {
                                    "name": "s", "key": "token"}}},
                                {"name": "TARGET", "value": "coord:80"}]}]}})

    restarted = kube_api.wait_for("pods", "env", lambda p: any(
        c["restartCount"] >= 1 for c in p["status"].get("containerStatuses", [])), timeout=20)
    (status,) = restarted["status"]["containerStatuses"]
    assert status["lastState"]["terminated"]["exitCode"] == 3
    assert restarted["status"]["phase"] == "Running"
    first_line = local_kubelet.logs("env").splitlines()[0]
    assert first_line == "env t0ken 127.0.0.1:8080 env@127.0.0.1:8080"


def test_the_kubelet_runs_a_deployment_and_kills_its_processes(
    kube_api: KubeApi, local_kubelet: LocalKubelet,
) -> None:
    kube_api.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                    "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "d"}},
                             "template": {"metadata": {"labels": {"app": "d"}}, "spec": {
                                 "containers": [{"name": "sleeper", "command": [
                                     "python", "-c", SLEEPER]}]}}}})

    def running_pod() -> dict[str, Any]:
        pods = kube_api.list("pods", "default", label_selector="app=d")
        live = [p for p in pods if p["status"]["phase"] == "Running"]
        assert len(live) == 1
        return live[0]

    first = _eventually(running_pod)
    assert first["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
    pid = int(_eventually(lambda: local_kubelet.logs(first["metadata"]["name"]).split()[0]))
    kube_api.wait_for("deployments", "d", lambda d: d.get("status", {}).get("readyReplicas") == 1)

    kube_api.delete("pods", first["metadata"]["name"])
    second = _eventually(running_pod)
    assert second["metadata"]["name"] != first["metadata"]["name"]
    _eventually(lambda: _gone(pid))
    second_pid = int(_eventually(lambda: local_kubelet.logs(second["metadata"]["name"]).split()[0]))

    kube_api.delete("deployments", "d")
    assert kube_api.list("pods", "default", label_selector="app=d") == []
    _eventually(lambda: _gone(second_pid))


SLEEPER = "import os, time; print(os.getpid(), flush=True); time.sleep(120)"


def test_the_kubelet_kills_a_container_that_ignores_sigterm(
    kube_api: KubeApi, local_kubelet: LocalKubelet,
) -> None:
    stubborn = ("import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print(os.getpid(), flush=True); time.sleep(120)")
    kube_api.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stubborn"}, "spec": {
        "terminationGracePeriodSeconds": 1,
        "containers": [{"name": "main", "command": ["python", "-c", stubborn]}]}})
    pid = int(_eventually(lambda: local_kubelet.logs("stubborn").split()[0]))
    kube_api.delete("pods", "stubborn")
    _eventually(lambda: _gone(pid), timeout=5)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    raise AssertionError(f"process {pid} is still alive")


def _eventually(check: Any, timeout: float = 15.0) -> Any:
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    while True:
        try:
            return check()
        except (AssertionError, IndexError, ValueError, KeyError):
            if datetime.datetime.now() > deadline:
                raise
        threading.Event().wait(0.05)


# ------------------------------------------------------------- pure machinery


def test_merge_patches_follow_rfc_7386_and_kubectls_strategic_subset() -> None:
    target = {"a": {"b": 1, "c": 2}, "l": [1, 2]}
    assert machinery.merge_patch(target, {"a": {"b": None, "d": 3}, "l": [3]}) == {
        "a": {"c": 2, "d": 3}, "l": [3]}
    assert target == {"a": {"b": 1, "c": 2}, "l": [1, 2]}  # not mutated

    pod = {"containers": [{"name": "a", "image": "1", "env": [{"name": "X", "value": "1"}]},
                          {"name": "b", "image": "1"}]}
    patch = {"$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
             "containers": [{"name": "a", "image": "2", "env": [{"name": "Y", "value": "2"}]},
                            {"name": "b", "$patch": "delete"}]}
    assert machinery.strategic_merge_patch(pod, patch) == {"containers": [
        {"name": "a", "image": "2", "env": [{"name": "X", "value": "1"},
                                            {"name": "Y", "value": "2"}]}]}


def test_label_selector_grammar() -> None:
    parsed = machinery.parse_label_selector("a=1,b!=2, c in (x, y),!d,e, f notin (z)")
    assert [(r.key, r.op, r.values) for r in parsed] == [
        ("a", "=", ("1",)), ("b", "!=", ("2",)), ("c", "in", ("x", "y")), ("d", "!exists", ()),
        ("e", "exists", ()), ("f", "notin", ("z",))]
    assert machinery.labels_match(parsed, {"a": "1", "c": "y", "e": ""})
    assert not machinery.labels_match(parsed, {"a": "1", "c": "y", "e": "", "d": "1"})
    with pytest.raises(ValueError):
        machinery.parse_label_selector("a in x")


def test_jsonpath_and_tables_render_printer_columns() -> None:
    obj = {"metadata": {"name": "j", "creationTimestamp": "2024-01-01T00:00:00Z"},
           "status": {"conditions": [{"type": "A", "status": "False"},
                                     {"type": "Ready", "status": "True"}],
                      "clients": {"registered": 3}, "ok": True}}
    assert machinery.jsonpath(obj, '.status.conditions[?(@.type=="Ready")].status') == ["True"]
    assert machinery.jsonpath(obj, "{.status.conditions[*].type}") == ["A", "Ready"]
    assert machinery.jsonpath(obj, ".status.missing.deeper") == []
    columns = [{"name": "Clients", "type": "integer", "jsonPath": ".status.clients.registered"},
               {"name": "Ok", "type": "boolean", "jsonPath": ".status.ok"},
               machinery.AGE_COLUMN]
    now = datetime.datetime(2024, 1, 3, 1, 0, tzinfo=datetime.UTC)
    table = machinery.table([obj], columns, now=now)
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Clients", "Ok", "Age"]
    assert table["rows"][0]["cells"] == ["j", 3, True, "2d1h"]
    assert [machinery.human_duration(s) for s in (5, 200, 3600 * 5 + 60, 86400 * 3)] == [
        "5s", "3m20s", "5h1m", "3d"]


def test_schema_admission_prunes_defaults_and_names_fields() -> None:
    spec_schema = {"type": "object", "properties": {"spec": {
        "type": "object", "required": ["rounds"], "properties": {
            "rounds": {"type": "integer", "minimum": 1},
            "mode": {"type": "string", "enum": ["sync", "async"], "default": "sync"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}},
            "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}}}
    good = schema.admit(spec_schema, {"metadata": {"name": "x"}, "spec": {
        "rounds": 2, "junk": 1, "extra": {"kept": 1}, "tags": None}})
    assert good.errors == () and good.unknown == ("spec.junk",)
    assert good.object["spec"] == {"rounds": 2, "extra": {"kept": 1}, "mode": "sync"}

    bad = schema.admit(spec_schema, {"spec": {"rounds": "2", "mode": "x", "tags": ["long"]}})
    assert bad.errors == (
        ('spec.rounds: Invalid value: "string": spec.rounds in body must be of type integer: '
         '"string"'),
        'spec.mode: Unsupported value: "x": supported values: "sync", "async"',
        'spec.tags[0]: Invalid value: "long": spec.tags[0] in body may not be longer than 3')
    assert schema.admit(spec_schema, {"spec": {}}).errors == ("spec.rounds: Required value",)


def test_the_kubelets_rewriting_rules() -> None:
    rewrite = Rewriter("/r", ("/etc/cfg", "/tmp"), {"s.ns.svc": {80: 8080}}, {"s": {80: 8080}})
    assert rewrite("open('/etc/cfg/x')") == "open('/r/etc/cfg/x')"
    assert rewrite("--out=/tmp") == "--out=/r/tmp"
    assert rewrite("/etc/cfgother /tmpfile") == "/etc/cfgother /tmpfile"
    assert rewrite("dns:///s.ns.svc:80 http://s:80/x s.ns.svc") == (
        "dns:///127.0.0.1:8080 http://127.0.0.1:8080/x 127.0.0.1")
    assert rewrite("s") == "s" and rewrite("s", whole_value_hosts=True) == "127.0.0.1"
    assert expand_references("$(A)-$(B)-$$(A)", {"A": "1"}) == "1-$(B)-$(A)"
    assert resolve_command(["fedkube", "agent"])[:4] == [sys.executable, "-P", "-m",
                                                         "fedkube.runtime.cli"]
    assert resolve_command([], entrypoint=("fedkube",))[-1] == "fedkube.runtime.cli"
