"""What kube-apiserver does with a CRD's structural ``openAPIV3Schema`` on every write.

In the order the API server applies them (see "Specifying a structural schema", "Field
pruning", "Defaulting" and "Validation" in
https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/):

1. prune fields the schema does not declare (unless ``x-kubernetes-preserve-unknown-fields``)
   and ``null`` values of fields that are not ``nullable``;
2. fill ``default`` values of absent properties (of objects that are present);
3. validate: ``type`` (with ``x-kubernetes-int-or-string``), ``required``, ``enum``,
   ``minimum``/``maximum`` (and their ``exclusive`` flags), ``minLength``/``maxLength``,
   ``pattern``, ``minItems``/``maxItems``, ``uniqueItems``, ``minProperties``/
   ``maxProperties``, and the value-only ``allOf``/``anyOf``/``oneOf``/``not``.

Messages follow the API server's field-path style, e.g.
``spec.rounds: Invalid value: 0: spec.rounds in body should be greater than or equal to 1``.
Not covered: ``format`` checks, CEL ``x-kubernetes-validations``, list-type/map-type rules.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_ROOT_FIELDS = ("apiVersion", "kind", "metadata")


@dataclass(frozen=True)
class Admission:
    """The object after pruning and defaulting, what validation found, and what was pruned."""

    object: dict[str, Any]
    errors: tuple[str, ...]
    unknown: tuple[str, ...]


def admit(schema: Mapping[str, Any], obj: Mapping[str, Any]) -> Admission:
    """Prune, default and validate a custom object against its CRD version's schema."""
    unknown: list[str] = []
    body = {k: v for k, v in obj.items() if k not in _ROOT_FIELDS}
    body = _prune_and_default(schema, body, "", unknown, root=True)
    result = {k: copy.deepcopy(obj[k]) for k in _ROOT_FIELDS if k in obj} | body
    errors: list[str] = []
    _validate(schema, body, "", errors, root=True)
    return Admission(result, tuple(errors), tuple(unknown))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _prune_and_default(node: Mapping[str, Any], value: Any, path: str, unknown: list[str],
                       *, root: bool = False) -> Any:
    if isinstance(value, dict) and _is_object(node):
        properties = node.get("properties") or {}
        additional = node.get("additionalProperties")
        keep_unknown = node.get("x-kubernetes-preserve-unknown-fields", False)
        result: dict[str, Any] = {}
        for key, item in value.items():
            sub = properties.get(key, additional if isinstance(additional, Mapping) else None)
            declared_null = item is None and sub is not None and not sub.get("nullable", False)
            if declared_null or (item is None and sub is None and not keep_unknown):
                continue  # nulls of non-nullable fields are dropped, not refused
            if sub is not None:
                result[key] = _prune_and_default(sub, item, _join(path, key), unknown)
            elif keep_unknown or additional is True:
                result[key] = copy.deepcopy(item)
            else:
                unknown.append(_join(path, key))
        for key, sub in properties.items():
            if key not in result and "default" in sub and not (root and key in _ROOT_FIELDS):
                result[key] = _prune_and_default(sub, copy.deepcopy(sub["default"]),
                                                 _join(path, key), unknown)
        return result
    if isinstance(value, list) and isinstance(node.get("items"), Mapping):
        return [_prune_and_default(node["items"], item, f"{path}[{i}]", unknown)
                for i, item in enumerate(value)]
    return copy.deepcopy(value)


def _is_object(node: Mapping[str, Any]) -> bool:
    return node.get("type") == "object" or "properties" in node or "additionalProperties" in node


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else json.dumps(value, default=str)


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
               bool: "boolean"}
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool)
    or isinstance(v, float) and v.is_integer(),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}


def _validate(node: Mapping[str, Any], value: Any, path: str, errors: list[str],
              *, root: bool = False) -> None:
    where = path or "<root>"
    if value is None:
        if not node.get("nullable", False):
            errors.append(f"{where}: Invalid value: \"null\": {where} in body must be of type "
                          f"{node.get('type', 'object')}: \"null\"")
        return
    expected = node.get("type")
    if node.get("x-kubernetes-int-or-string"):
        if not isinstance(value, str) and not _TYPES["integer"](value):
            errors.append(f"{where}: Invalid value: {_show(value)}: {where} in body must be of "
                          f"type integer or string")
            return
    elif expected in _TYPES and not _TYPES[expected](value):
        kind = _JSON_TYPES.get(type(value), type(value).__name__)
        errors.append(f"{where}: Invalid value: {_show(kind)}: {where} in body must be of type "
                      f"{expected}: {_show(kind)}")
        return
    _validate_value(node, value, where, errors)
    if isinstance(value, dict):
        properties = node.get("properties") or {}
        additional = node.get("additionalProperties")
        for key in node.get("required") or ():
            if key not in value and not (root and key in _ROOT_FIELDS):
                errors.append(f"{_join(path, key)}: Required value")
        for key, item in value.items():
            sub = properties.get(key, additional if isinstance(additional, Mapping) else None)
            if sub is not None:
                _validate(sub, item, _join(path, key), errors)
    elif isinstance(value, list) and isinstance(node.get("items"), Mapping):
        for i, item in enumerate(value):
            _validate(node["items"], item, f"{path}[{i}]", errors)


def _validate_value(node: Mapping[str, Any], value: Any, where: str, errors: list[str]) -> None:
    def invalid(message: str) -> None:
        errors.append(f"{where}: Invalid value: {_show(value)}: {where} in body {message}")

    if "enum" in node and value not in node["enum"]:
        supported = ", ".join(_show(v) for v in node["enum"])
        errors.append(f"{where}: Unsupported value: {_show(value)}: supported values: {supported}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in node:
            if node.get("exclusiveMinimum") is True and not value > node["minimum"]:
                invalid(f"should be greater than {node['minimum']}")
            elif value < node["minimum"]:
                invalid(f"should be greater than or equal to {node['minimum']}")
        if "maximum" in node:
            if node.get("exclusiveMaximum") is True and not value < node["maximum"]:
                invalid(f"should be less than {node['maximum']}")
            elif value > node["maximum"]:
                invalid(f"should be less than or equal to {node['maximum']}")
    if isinstance(value, str):
        if "minLength" in node and len(value) < node["minLength"]:
            invalid(f"should be at least {node['minLength']} chars long")
        if "maxLength" in node and len(value) > node["maxLength"]:
            invalid(f"may not be longer than {node['maxLength']}")
        if "pattern" in node and re.search(node["pattern"], value) is None:
            invalid(f"should match '{node['pattern']}'")
    if isinstance(value, list):
        if "minItems" in node and len(value) < node["minItems"]:
            invalid(f"should have at least {node['minItems']} items")
        if "maxItems" in node and len(value) > node["maxItems"]:
            invalid(f"should have at most {node['maxItems']} items")
        if node.get("uniqueItems") and len({json.dumps(v, sort_keys=True) for v in value}) < len(
                value):
            invalid("shouldn't contain duplicates")
    if isinstance(value, dict):
        if "minProperties" in node and len(value) < node["minProperties"]:
            invalid(f"should have at least {node['minProperties']} properties")
        if "maxProperties" in node and len(value) > node["maxProperties"]:
            invalid(f"should have at most {node['maxProperties']} properties")
    for sub in node.get("allOf") or ():
        _validate_value(sub, value, where, errors)
    branches = [_passes(sub, value) for sub in node.get("anyOf") or ()]
    if branches and not any(branches):
        invalid("must validate at least one schema (anyOf)")
    branches = [_passes(sub, value) for sub in node.get("oneOf") or ()]
    if branches and sum(branches) != 1:
        invalid("must validate one and only one schema (oneOf)")
    if "not" in node and _passes(node["not"], value):
        invalid("must not validate the schema (not)")


def _passes(node: Mapping[str, Any], value: Any) -> bool:
    found: list[str] = []
    _validate({"nullable": True, **node}, value, "x", found)
    return not found
