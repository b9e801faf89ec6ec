"""Pure pieces of Kubernetes API semantics, used by the test API server and the local kubelet.

Named after ``k8s.io/apimachinery``, where the real versions live. Every function here takes
plain JSON-like values and returns new ones; inputs are never mutated.

- patches: JSON merge patch (RFC 7386), JSON patch (RFC 6902, through ``jsonpatch``) and the
  subset of strategic merge patch that ``kubectl apply`` sends for built-in kinds;
- selectors: label selectors (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``) and
  field selectors (``=``, ``==``, ``!=`` on any dotted path, a superset of what the real
  server allows per kind);
- JSONPath for printer columns, a server-side ``Table`` and kubectl's human durations.
"""

from __future__ import annotations

import copy
import datetime
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jsonpatch


class PatchError(ValueError):
    """A patch that cannot be applied: the server answers 422 Unprocessable Entity."""


# ------------------------------------------------------------------------------ patches


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply a JSON merge patch (RFC 7386): objects merge, ``null`` deletes, the rest replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# List fields that strategic merge patch merges item by item, and the key that identifies an
# item (from the Go types' `patchMergeKey` tags). Other lists are replaced, as in merge patch.
_MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "env": "name", "volumes": "name", "volumeMounts": "name", "imagePullSecrets": "name",
    "ports": "containerPort", "volumeDevices": "devicePath", "hostAliases": "ip",
    "tolerations": "key", "conditions": "type", "ownerReferences": "uid",
}


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Apply the part of a strategic merge patch that ``kubectl apply`` produces.

    Dicts merge as in RFC 7386; lists named in ``_MERGE_KEYS`` merge by their key; the
    directives ``$patch`` (replace/delete/merge), ``$retainKeys``,
    ``$deleteFromPrimitiveList/<field>`` and ``$setElementOrder/<field>`` are honoured
    (the last one only as far as dropping it: order is cosmetic here).
    See https://github.com/kubernetes/community/blob/master/contributors/devel/sig-api-machinery/strategic-merge-patch.md
    """
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "delete":
        return None
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if not k.startswith("$")}
    result = dict(target) if isinstance(target, Mapping) else {}
    if "$retainKeys" in patch:
        retained = set(patch["$retainKeys"])
        result = {k: v for k, v in result.items() if k in retained}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [v for v in result.get(field) or [] if v not in value]
        elif key.startswith("$"):
            continue
        elif value is None:
            result.pop(key, None)
        elif isinstance(value, list) and key in _MERGE_KEYS and isinstance(result.get(key), list):
            result[key] = _merge_list(result[key], value, _MERGE_KEYS[key])
        else:
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    return result


def _merge_list(current: list[Any], patch: list[Any], merge_key: str) -> list[Any]:
    if not all(isinstance(item, Mapping) and merge_key in item for item in [*current, *patch]):
        return copy.deepcopy(patch)
    merged = {item[merge_key]: item for item in current}
    for item in patch:
        key = item[merge_key]
        if item.get("$patch") == "delete":
            merged.pop(key, None)
        else:
            merged[key] = strategic_merge_patch(merged.get(key), item)
    return list(merged.values())


def json_patch(target: Mapping[str, Any], operations: Sequence[Mapping[str, Any]]) -> Any:
    """Apply a JSON patch (RFC 6902); a failed ``test`` or a bad path raises :class:`PatchError`."""
    if not isinstance(operations, Sequence) or isinstance(operations, str | bytes):
        raise PatchError("a JSON patch must be a list of operations")
    try:
        return jsonpatch.apply_patch(copy.deepcopy(dict(target)), list(operations))
    except jsonpatch.JsonPatchTestFailed as exc:
        raise PatchError(f"the server rejected our request due to an error in our request: "
                         f"test operation failed: {exc}") from exc
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, KeyError,
            IndexError, TypeError) as exc:
        raise PatchError(f"invalid JSON patch: {exc}") from exc


# ---------------------------------------------------------------------------- selectors


@dataclass(frozen=True)
class Requirement:
    """One term of a selector: ``key op values`` (values empty for exists/!exists)."""

    key: str
    op: str  # one of: = != in notin exists !exists
    values: tuple[str, ...] = ()


_LABEL_TERM = re.compile(
    r"""\s*(?:
        (?P<not>!)\s*(?P<nkey>[\w./-]+)                                   # !key
      | (?P<skey>[\w./-]+)\s+(?P<setop>in|notin)\s*\((?P<set>[^)]*)\)   # key in (a, b)
      | (?P<key>[\w./-]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[\w.-]*))?   # key, key=v, key!=v
    )\s*(?:,|$)""",
    re.VERBOSE,
)


def parse_label_selector(text: str | None) -> tuple[Requirement, ...]:
    """Parse a ``labelSelector`` query string; an invalid one raises ``ValueError``."""
    terms: list[Requirement] = []
    text = (text or "").strip()
    pos = 0
    while pos < len(text):
        match = _LABEL_TERM.match(text, pos)
        if match is None or match.end() == pos:
            raise ValueError(f"unable to parse requirement: {text[pos:]!r}")
        pos = match.end()
        if match["nkey"]:
            terms.append(Requirement(match["nkey"], "!exists"))
        elif match["skey"]:
            values = tuple(v.strip() for v in match["set"].split(",") if v.strip())
            terms.append(Requirement(match["skey"], match["setop"], values))
        elif match["op"]:
            op = "=" if match["op"] == "==" else match["op"]
            terms.append(Requirement(match["key"], op, (match["value"],)))
        else:
            terms.append(Requirement(match["key"], "exists"))
    return tuple(terms)


def selector_from_spec(selector: Mapping[str, Any] | None) -> tuple[Requirement, ...]:
    """Requirements of a structured ``LabelSelector`` (``matchLabels`` + ``matchExpressions``)."""
    selector = selector or {}
    terms = [Requirement(k, "=", (str(v),)) for k, v in (selector.get("matchLabels") or {}).items()]
    ops = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!exists"}
    for expr in selector.get("matchExpressions") or []:
        values = tuple(expr.get("values") or ())
        terms.append(Requirement(expr["key"], ops[expr["operator"]], values))
    return tuple(terms)


def labels_match(requirements: Iterable[Requirement], labels: Mapping[str, str] | None) -> bool:
    """Whether a label set satisfies every requirement (an empty selector matches all)."""
    labels = labels or {}
    for req in requirements:
        present = req.key in labels
        if req.op in ("exists", "!exists"):
            ok = present == (req.op == "exists")
        else:
            # `!=` and `notin` also match objects without the label, as in Kubernetes.
            inside = present and labels[req.key] in req.values
            ok = inside if req.op in ("=", "in") else not inside
        if not ok:
            return False
    return True


def parse_field_selector(text: str | None) -> tuple[Requirement, ...]:
    """Parse a ``fieldSelector``: comma-separated ``path=value``, ``path==value``,
    ``path!=value``."""
    terms: list[Requirement] = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        match = re.fullmatch(r"([\w.]+)\s*(==|=|!=)\s*(.*)", part)
        if match is None:
            raise ValueError(f"invalid field selector: {part!r}")
        op = "!=" if match[2] == "!=" else "="
        terms.append(Requirement(match[1], op, (match[3],)))
    return tuple(terms)


def fields_match(requirements: Iterable[Requirement], obj: Mapping[str, Any]) -> bool:
    """Whether an object's fields (dotted paths, compared as strings) satisfy every term."""
    for req in requirements:
        value: Any = obj
        for part in req.key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        text = "" if value is None else _cell_text(value)
        if (text == req.values[0]) != (req.op == "="):
            return False
    return True


# ----------------------------------------------------------------------------- JSONPath

_PATH_TOKEN = re.compile(
    r"""\.(?P<field>[^.\[\]]+)
      | \[\s*(?P<index>-?\d+|\*)\s*\]
      | \[\s*['"](?P<quoted>[^'"]+)['"]\s*\]
      | \[\s*\?\(\s*@\.(?P<fpath>[\w.-]+)\s*(?P<fop>==|!=)\s*
           (?P<fval>"[^"]*"|'[^']*'|[^)\s]+)\s*\)\s*\]
    """,
    re.VERBOSE,
)


def jsonpath(obj: Any, expression: str) -> list[Any]:
    """Evaluate the JSONPath subset that printer columns use; return every match, in order.

    Supports ``.field``, ``['field']``, ``[n]``, ``[*]`` and ``[?(@.a.b=="v")]`` (``==``/``!=``),
    with or without kubectl's surrounding ``{...}``. A missing field yields no match.
    """
    expression = expression.strip()
    if expression.startswith("{") and expression.endswith("}"):
        expression = expression[1:-1]
    expression = expression.removeprefix("$")
    nodes: list[Any] = [obj]
    pos = 0
    while pos < len(expression):
        match = _PATH_TOKEN.match(expression, pos)
        if match is None:
            raise ValueError(f"unsupported JSONPath at {expression[pos:]!r} in {expression!r}")
        pos = match.end()
        nodes = [found for node in nodes for found in _step(node, match)]
    return nodes


def _step(node: Any, token: re.Match[str]) -> list[Any]:
    field = token["field"] or token["quoted"]
    if field is not None:
        if field == "*":
            return list(node.values()) if isinstance(node, Mapping) else list(node or [])
        return [node[field]] if isinstance(node, Mapping) and field in node else []
    if token["index"] is not None:
        if not isinstance(node, list):
            return []
        if token["index"] == "*":
            return list(node)
        index = int(token["index"])
        return [node[index]] if -len(node) <= index < len(node) else []
    wanted = token["fval"].strip("'\"")
    selected = []
    for item in node if isinstance(node, list) else []:
        values = jsonpath(item, "." + token["fpath"])
        equal = bool(values) and _cell_text(values[0]) == wanted
        if equal == (token["fop"] == "=="):
            selected.append(item)
    return selected


def _cell_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# ------------------------------------------------------------------------------- tables


def human_duration(seconds: float) -> str:
    """kubectl's ``HumanDuration`` (k8s.io/apimachinery/pkg/util/duration): 5s, 3m20s, 2d4h..."""
    s = int(seconds)
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes, hours, days = s // 60, s // 3600, s // 86400
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    return f"{days // 365}y"


def parse_time(text: str) -> datetime.datetime:
    """An RFC 3339 timestamp as Kubernetes writes it (``2024-01-02T03:04:05Z``)."""
    return datetime.datetime.fromisoformat(text)


def format_time(moment: datetime.datetime) -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes writes ``metav1.Time``."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


NAME_COLUMN = {
    "name": "Name", "type": "string", "format": "name", "priority": 0,
    "description": "Name must be unique within a namespace.",
}
AGE_COLUMN = {
    "name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp", "priority": 0,
    "description": "CreationTimestamp is a timestamp representing the server time when "
    "this object was created.",
}


def table_cell(obj: Mapping[str, Any], column: Mapping[str, Any], now: datetime.datetime) -> Any:
    """One cell as the CRD table converter renders it: dates as ages, several matches joined."""
    try:
        values = jsonpath(obj, column["jsonPath"])
    except ValueError:
        return None
    if not values:
        return None
    if len(values) > 1:
        return ",".join(_cell_text(v) for v in values)
    value = values[0]
    if column.get("type") == "date" and isinstance(value, str):
        try:
            return human_duration((now - parse_time(value)).total_seconds())
        except ValueError:
            return value
    if isinstance(value, dict | list):
        return str(value)
    return value


def table(
    objects: Iterable[Mapping[str, Any]],
    columns: Sequence[Mapping[str, Any]],
    *,
    include_object: str = "PartialObjectMetadata",
    resource_version: str = "",
    now: datetime.datetime | None = None,
) -> dict[str, Any]:
    """A ``meta.k8s.io/v1`` ``Table`` of objects: a Name column, then ``columns`` (JSONPath).

    ``include_object`` is the request's ``includeObject``: ``None``, ``Object`` or
    ``PartialObjectMetadata`` (the server's default), which is what kubectl reads namespaces from.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    definitions = [dict(NAME_COLUMN)] + [
        {
            "name": c["name"], "type": c.get("type", "string"), "format": c.get("format", ""),
            "description": c.get("description", ""), "priority": c.get("priority", 0),
        }
        for c in columns
    ]
    rows = []
    for obj in objects:
        row: dict[str, Any] = {
            "cells": [obj.get("metadata", {}).get("name")]
            + [table_cell(obj, c, now) for c in columns]
        }
        if include_object == "Object":
            row["object"] = copy.deepcopy(dict(obj))
        elif include_object != "None":
            row["object"] = {
                "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                "metadata": copy.deepcopy(obj.get("metadata", {})),
            }
        rows.append(row)
    return {
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": definitions, "rows": rows,
    }
