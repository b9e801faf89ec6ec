"""Server-side apply for the test API server: field ownership per field manager.

What kube-apiserver does (structured-merge-diff), as far as fedkube's writers need it:

- an apply names the fields its manager owns from now on: every leaf of the applied
  configuration, and every item of a list-map (``x-kubernetes-list-type: map`` in the
  CRD schema, merged by ``x-kubernetes-list-map-keys``); other lists are atomic;
- a field another manager owns with a different value is a conflict (409) unless the
  apply is forced, which moves the field to the applier; equal values are shared;
- fields the manager applied before and leaves out now are removed, unless another
  manager still owns them (or something inside them);
- ownership is kept in ``metadata.managedFields`` in the real ``FieldsV1`` encoding
  (``f:<field>``, ``k:<keys as JSON>``, ``.`` for an item itself), one entry per
  manager and subresource, so ``kubectl get -o yaml --show-managed-fields`` reads it.

Gaps: writes other than apply (merge/JSON patch, PUT) keep managedFields as they were
instead of recording an ``Update`` manager; ``apiVersion``, ``kind``, name and namespace
are never owned; lists of built-in kinds are atomic (no schema to say otherwise).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

Path = tuple[str, ...]  # "f:<field>" and 'k:{"type":"Ready"}' elements
ListKeys = Callable[[Path], tuple[str, ...] | None]
_UNOWNED: frozenset[Path] = frozenset({
    ("f:apiVersion",), ("f:kind",), ("f:metadata", "f:name"), ("f:metadata", "f:namespace"),
    ("f:metadata", "f:resourceVersion"), ("f:metadata", "f:managedFields"),
})
_MISSING = object()


class ApplyError(Exception):
    """An apply the server refuses: `code` is the HTTP status, `causes` the conflicts."""

    def __init__(self, code: int, message: str, causes: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.code = code
        self.causes = causes or []


@dataclasses.dataclass
class Entry:
    """One managedFields entry: what a manager owns through one operation and subresource."""

    manager: str
    operation: str
    subresource: str
    api_version: str
    time: str
    fields: set[Path]

    def to_wire(self) -> dict[str, Any]:
        entry = {"manager": self.manager, "operation": self.operation,
                 "apiVersion": self.api_version, "time": self.time, "fieldsType": "FieldsV1",
                 "fieldsV1": encode(self.fields)}
        if self.subresource:
            entry["subresource"] = self.subresource
        return entry

    @classmethod
    def from_wire(cls, entry: Mapping[str, Any]) -> Entry:
        return cls(entry.get("manager", ""), entry.get("operation", "Update"),
                   entry.get("subresource", ""), entry.get("apiVersion", ""),
                   entry.get("time", ""), decode(entry.get("fieldsV1") or {}))


# ------------------------------------------------------------------------ field sets


def list_keys_from_schema(schema: Mapping[str, Any] | None) -> ListKeys:
    """The map keys of the list at a path, from a CRD's openAPIV3Schema (None: atomic)."""

    def keys(path: Path) -> tuple[str, ...] | None:
        node: Any = schema
        for element in path:
            if not isinstance(node, Mapping):
                return None
            if element.startswith("f:"):
                child = (node.get("properties") or {}).get(element[2:])
                extra = node.get("additionalProperties")
                node = child if child is not None else extra if isinstance(extra, Mapping) else None
            else:
                node = node.get("items")
        if isinstance(node, Mapping) and node.get("x-kubernetes-list-type") == "map":
            return tuple(node.get("x-kubernetes-list-map-keys") or ())
        return None

    return keys


def item_key(item: Any, keys: tuple[str, ...], where: Path) -> str:
    if not isinstance(item, Mapping) or any(k not in item for k in keys):
        raise ApplyError(422, f"{show(where)}: every item of this list needs the key field(s) "
                         f"{', '.join(keys)}")
    return "k:" + json.dumps({k: item[k] for k in keys}, separators=(",", ":"), sort_keys=True)


def fields_of(value: Any, keys: ListKeys, prefix: Path = ()) -> set[Path]:
    """Every field an applied configuration sets (leaves, and list-map items)."""
    if isinstance(value, Mapping) and value:
        found: set[Path] = set()
        for name, child in value.items():
            found |= fields_of(child, keys, (*prefix, f"f:{name}"))
        return found - _UNOWNED
    map_keys = keys(prefix) if isinstance(value, list) and value else None
    if map_keys:
        found = set()
        for item in value:
            at = (*prefix, item_key(item, map_keys, prefix))
            found |= {at} | fields_of(item, keys, at)
        return found
    return {prefix}


def encode(fields: set[Path]) -> dict[str, Any]:
    """FieldsV1: a tree of elements, ``{}`` at owned leaves, ``"."`` for an owned item."""
    tree: dict[str, Any] = {}
    for path in fields:
        node = tree
        for element in path:
            node = node.setdefault(element, {})
        if path and path[-1].startswith("k:"):
            node["."] = {}
    return tree


def decode(tree: Mapping[str, Any], prefix: Path = ()) -> set[Path]:
    found: set[Path] = set()
    for element, child in tree.items():
        if element == ".":
            found.add(prefix)
        elif child:
            found |= decode(child, (*prefix, element))
        else:
            found.add((*prefix, element))
    return found


def show(path: Path) -> str:
    """`.status.conditions[type="Ready"].status`, as kube-apiserver names a field."""
    text = ""
    for element in path:
        if element.startswith("f:"):
            text += f".{element[2:]}"
        else:
            text += "[" + ",".join(f"{k}={json.dumps(v)}"
                                   for k, v in json.loads(element[2:]).items()) + "]"
    return text or "."


# -------------------------------------------------------------------- object editing


def value_at(obj: Any, path: Path) -> Any:
    node = obj
    for element in path:
        if element.startswith("f:"):
            if not isinstance(node, Mapping) or element[2:] not in node:
                return _MISSING
            node = node[element[2:]]
        else:
            wanted = json.loads(element[2:])
            items = node if isinstance(node, list) else []
            node = next((i for i in items if isinstance(i, Mapping)
                         and all(i.get(k, _MISSING) == v for k, v in wanted.items())), _MISSING)
            if node is _MISSING:
                return _MISSING
    return node


def remove_at(obj: Any, path: Path) -> None:
    parent = value_at(obj, path[:-1])
    element = path[-1]
    if element.startswith("f:"):
        if isinstance(parent, dict):
            parent.pop(element[2:], None)
    elif isinstance(parent, list):
        item = value_at(obj, path)
        parent[:] = [i for i in parent if i is not item]


def merge(current: Any, config: Any, keys: ListKeys, prefix: Path = ()) -> Any:
    """`config` merged into `current`: maps field by field, list-maps item by key, the rest
    replaced."""
    if isinstance(config, Mapping) and isinstance(current, Mapping):
        merged = dict(current)
        for name, child in config.items():
            at = (*prefix, f"f:{name}")
            merged[name] = merge(current[name], child, keys, at) if name in current else \
                copy.deepcopy(child)
        return merged
    map_keys = keys(prefix) if isinstance(config, list) and isinstance(current, list) else None
    if map_keys:
        merged_list = list(current)
        index = {item_key(i, map_keys, prefix): n for n, i in enumerate(merged_list)}
        for item in config:
            key = item_key(item, map_keys, prefix)
            if key in index:
                merged_list[index[key]] = merge(merged_list[index[key]], item, keys,
                                                (*prefix, key))
            else:
                index[key] = len(merged_list)
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(config)


# ------------------------------------------------------------------------- the apply


def apply(
    current: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    manager: str,
    subresource: str,
    force: bool,
    keys: ListKeys,
    now: str,
) -> dict[str, Any]:
    """The object after `manager` applies `config` (already cut to what the subresource
    may touch), with its managedFields; ApplyError(409) on conflicts without `force`."""
    entries = [Entry.from_wire(e) for e in current.get("metadata", {}).get("managedFields") or []]
    mine = fields_of(config, keys)
    own = next((e for e in entries if e.operation == "Apply" and e.manager == manager
                and e.subresource == subresource), None)
    others = [e for e in entries if e is not own]
    conflicts = [(entry, path) for entry in others for path in sorted(mine & entry.fields)
                 if not path[-1].startswith("k:")
                 and value_at(current, path) != value_at(config, path)]
    if conflicts and not force:
        causes = [{"type": "FieldManagerConflict", "field": show(path),
                   "message": f'conflict with "{entry.manager}"'} for entry, path in conflicts]
        listed = "\n".join(f"- {c['message']}: {c['field']}" for c in causes)
        raise ApplyError(409, f"Apply failed with {len(causes)} conflict(s):\n{listed}", causes)
    for entry, path in conflicts:
        entry.fields.discard(path)  # forced: the field is the applier's now

    obj = copy.deepcopy(dict(current))
    still_owned = set().union(*(e.fields for e in others)) if others else set()
    # Outermost first: an item removed whole takes its fields with it.
    for path in sorted((own.fields if own else set()) - mine, key=len):
        if not any(o[:len(path)] == path for o in still_owned):
            remove_at(obj, path)
    obj = merge(obj, config, keys)

    if own is None:
        own = Entry(manager, "Apply", subresource, str(current.get("apiVersion", "")), now, set())
        entries.append(own)
    if own.fields != mine:
        own.fields, own.time = mine, now
    obj.setdefault("metadata", {})["managedFields"] = [
        e.to_wire() for e in entries if e.fields]
    return obj
