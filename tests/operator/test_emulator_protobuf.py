"""The emulator's decoding of the protobuf bodies helm's typed clients send, checked
against bodies encoded by the protobuf library itself from Kubernetes' own field numbers."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from k8s import protobuf
from k8s.apiserver import KubeApi

_F = descriptor_pb2.FieldDescriptorProto


def _classes() -> dict[str, type]:
    """runtime.Unknown, TypeMeta, ObjectMeta (the fields decoded) and ConfigMap, as in
    k8s.io/apimachinery and k8s.io/api generated.proto."""
    file = descriptor_pb2.FileDescriptorProto(name="k8s_test.proto", package="k8stest")

    def message(name: str, *fields: tuple[str, int, int, str | None, bool]) -> None:
        msg = file.message_type.add(name=name)
        for field_name, number, kind, type_name, repeated in fields:
            label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
            field = msg.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = f".k8stest.{type_name}"

    string, bytes_, msg_ = _F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_MESSAGE
    message("Entry", ("key", 1, string, None, False), ("value", 2, string, None, False))
    message("TypeMeta", ("apiVersion", 1, string, None, False), ("kind", 2, string, None, False))
    message("Unknown", ("typeMeta", 1, msg_, "TypeMeta", False), ("raw", 2, bytes_, None, False))
    message("ObjectMeta", ("name", 1, string, None, False), ("namespace", 3, string, None, False),
            ("labels", 11, msg_, "Entry", True))
    message("ConfigMap", ("metadata", 1, msg_, "ObjectMeta", False),
            ("data", 2, msg_, "Entry", True))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"k8stest.{name}"))
            for name in ("Entry", "TypeMeta", "Unknown", "ObjectMeta", "ConfigMap")}


def _config_map_body() -> bytes:
    m = _classes()
    config_map = m["ConfigMap"](
        metadata=m["ObjectMeta"](name="sh.helm.release.v1.fedkube.v1", namespace="fedkube",
                                 labels=[m["Entry"](key="owner", value="helm")]),
        data=[m["Entry"](key="release", value="H4sIAAAA")])
    unknown = m["Unknown"](typeMeta=m["TypeMeta"](apiVersion="v1", kind="ConfigMap"),
                           raw=config_map.SerializeToString())
    return protobuf.MAGIC + unknown.SerializeToString()


def test_a_protobuf_config_map_decodes_to_its_json_object() -> None:
    assert protobuf.to_json_object(_config_map_body()) == {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "sh.helm.release.v1.fedkube.v1", "namespace": "fedkube",
                     "labels": {"owner": "helm"}},
        "data": {"release": "H4sIAAAA"}}


def test_the_emulator_stores_a_protobuf_create(tmp_path: Path) -> None:
    with KubeApi(tmp_path / "api") as api:
        api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "fedkube"}})
        request = urllib.request.Request(
            f"{api.url}/api/v1/namespaces/fedkube/configmaps", data=_config_map_body(),
            method="POST", headers={"Content-Type": protobuf.CONTENT_TYPE,
                                    "Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 201
            created = json.loads(reply.read())
        stored = api.get("v1/configmaps", "sh.helm.release.v1.fedkube.v1", "fedkube")
        assert stored is not None and stored["data"] == {"release": "H4sIAAAA"}
        assert created["metadata"]["uid"] == stored["metadata"]["uid"]
