"""The few Kubernetes protobuf bodies that clients send no matter what: client-go's typed
clients (helm's release storage: ConfigMaps or Secrets, and the DeleteOptions of their
deletion; the Namespace of ``--create-namespace``) encode request bodies as ``application/vnd.kubernetes.protobuf`` and never fall
back to JSON. This turns such a body into the JSON object it stands for, so the emulator
can serve it as it serves JSON; other kinds stay unsupported (415).

The envelope is ``k8s\\x00`` + ``runtime.Unknown`` {typeMeta=1 {apiVersion=1, kind=2},
raw=2, contentEncoding=3, contentType=4}; field numbers of the kinds below are those of
``k8s.io/api/core/v1/generated.proto`` and ``apimachinery/.../meta/v1/generated.proto``.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Callable
from typing import Any

MAGIC = b"k8s\x00"
CONTENT_TYPE = "application/vnd.kubernetes.protobuf"

Fields = dict[int, list[Any]]  # field number -> values (int for varints, bytes otherwise)


class UnsupportedBody(ValueError):
    """A protobuf body this module cannot turn into JSON (kind unknown, or malformed)."""


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data):
            raise UnsupportedBody("truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def fields(data: bytes) -> Fields:
    """The fields of one message, in wire order."""
    out: Fields = {}
    at = 0
    while at < len(data):
        tag, at = _varint(data, at)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, at = _varint(data, at)
        elif wire_type == 2:
            length, at = _varint(data, at)
            value, at = data[at:at + length], at + length
        elif wire_type == 1:
            value, at = int.from_bytes(data[at:at + 8], "little"), at + 8
        elif wire_type == 5:
            value, at = int.from_bytes(data[at:at + 4], "little"), at + 4
        else:
            raise UnsupportedBody(f"wire type {wire_type} is not supported")
        out.setdefault(number, []).append(value)
    return out


def _text(message: Fields, number: int) -> str | None:
    values = message.get(number)
    return values[-1].decode() if values else None


def _map(message: Fields, number: int, decode_value: Callable[[bytes], Any]) -> dict[str, Any]:
    entries = {}
    for entry in message.get(number, []):
        parts = fields(entry)
        key = parts.get(1, [b""])[-1].decode()
        entries[key] = decode_value(parts.get(2, [b""])[-1])
    return entries


def _time(data: bytes) -> str:
    seconds = fields(data).get(1, [0])[-1]
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def object_meta(data: bytes) -> dict[str, Any]:
    message = fields(data)
    meta: dict[str, Any] = {}
    for number, key in ((1, "name"), (2, "generateName"), (3, "namespace"), (5, "uid"),
                        (6, "resourceVersion")):
        value = _text(message, number)
        if value:
            meta[key] = value
    if message.get(8):
        meta["creationTimestamp"] = _time(message[8][-1])
    for number, key in ((11, "labels"), (12, "annotations")):
        mapping = _map(message, number, bytes.decode)
        if mapping:
            meta[key] = mapping
    if message.get(14):
        meta["finalizers"] = [value.decode() for value in message[14]]
    if message.get(13):
        raise UnsupportedBody("ownerReferences in protobuf bodies are not decoded")
    return meta


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _config_map(message: Fields) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": object_meta(message.get(1, [b""])[-1])}
    if message.get(2):
        obj["data"] = _map(message, 2, bytes.decode)
    if message.get(3):
        obj["binaryData"] = _map(message, 3, _b64)
    if message.get(4):
        obj["immutable"] = bool(message[4][-1])
    return obj


def _secret(message: Fields) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": object_meta(message.get(1, [b""])[-1])}
    if message.get(2):
        obj["data"] = _map(message, 2, _b64)
    if message.get(3):
        obj["type"] = _text(message, 3)
    if message.get(4):
        obj["stringData"] = _map(message, 4, bytes.decode)
    if message.get(5):
        obj["immutable"] = bool(message[5][-1])
    return obj


def _namespace(message: Fields) -> dict[str, Any]:
    # spec (finalizers) and status are the server's to set.
    return {"metadata": object_meta(message.get(1, [b""])[-1])}


def _delete_options(message: Fields) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    if message.get(1):
        obj["gracePeriodSeconds"] = message[1][-1]
    if message.get(2):
        pre = fields(message[2][-1])
        obj["preconditions"] = {k: v for k, v in (("uid", _text(pre, 1)),
                                                  ("resourceVersion", _text(pre, 2))) if v}
    if message.get(4):
        obj["propagationPolicy"] = _text(message, 4)
    if message.get(5):
        obj["dryRun"] = [value.decode() for value in message[5]]
    return obj


_KINDS: dict[str, Callable[[Fields], dict[str, Any]]] = {
    "ConfigMap": _config_map, "Secret": _secret, "Namespace": _namespace,
    "DeleteOptions": _delete_options,
}


def to_json_object(body: bytes) -> dict[str, Any]:
    """The JSON object a protobuf request body stands for; UnsupportedBody otherwise."""
    if not body.startswith(MAGIC):
        raise UnsupportedBody("not a Kubernetes protobuf envelope (no k8s\\0 prefix)")
    unknown = fields(body[len(MAGIC):])
    type_meta = fields(unknown.get(1, [b""])[-1])
    api_version, kind = _text(type_meta, 1) or "", _text(type_meta, 2) or ""
    if kind not in _KINDS:
        raise UnsupportedBody(f"protobuf bodies of kind {kind!r} are not emulated")
    obj = _KINDS[kind](fields(unknown.get(2, [b""])[-1]))
    return {"apiVersion": api_version or "v1", "kind": kind, **obj}
