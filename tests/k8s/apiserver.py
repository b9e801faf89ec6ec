"""A Kubernetes API server for tests: kmock 0.8's emulator, extended until kopf, kubectl and
the ``kubernetes`` client cannot tell it from kube-apiserver in what fedkube's tests do.

:class:`ApiServer` subclasses ``kmock.KubernetesEmulator`` and keeps kmock's HTTP handling,
request log (``list(server)``, or a filtered view such as ``list(server['patch'])``), object
histories (``server.objects[...]``) and its DSL, so a test can still inject faults:
``server['patch', kmock.resource('v1/pods')] << 500``.
What it adds, as kube-apiserver does it:

- metadata: a global, monotonic ``resourceVersion``; ``uid``; ``creationTimestamp``;
  ``generation`` bumped when anything but metadata and status changes; ``generateName``;
- writes: POST, PUT (optimistic concurrency on ``resourceVersion``: 409), PATCH as JSON
  merge patch, JSON patch (a failed ``test`` op is 422, which kopf's finalizer patches rely
  on) and strategic merge patch (see :func:`machinery.strategic_merge_patch`), server-side
  apply with ``fieldManager``, ``force``, per-manager field ownership in
  ``metadata.managedFields``, list-maps merged by key, removal of fields a manager stops
  applying and 409 conflicts (see :mod:`tests.k8s.apply`); no-op writes change nothing and
  send no event; ``dryRun``;
- the ``status`` subresource: ``.../status`` reads and writes touch only ``status``; writes
  to the main object keep the stored status, for every resource that has the subresource;
- deletion: ``deletionTimestamp`` while ``finalizers`` remain, removal once they are gone;
  garbage collection of dependents by ``ownerReferences`` (cascading; ``Orphan`` honoured);
  deleting a namespace deletes its content, deleting a CRD deletes its objects, and both
  wait until that content is gone;
- reads: label selectors (``=``, ``!=``, ``in``, ``notin``, exists) and field selectors on
  list, watch and deletecollection; watches that send ADDED/MODIFIED/DELETED, resume after
  any ``resourceVersion`` (the whole history is kept: there is no 410 Gone), honour
  ``sendInitialEvents`` with its closing bookmark and ``timeoutSeconds``, and turn an object
  that starts or stops matching a selector into ADDED or DELETED;
- ``Accept: application/json;as=Table;g=meta.k8s.io;v=v1`` on get, list and watch: a Table
  built from the CRD's ``additionalPrinterColumns`` (JSONPath), which ``kubectl get`` prints;
- discovery (``/api``, ``/apis``, ``/api/v1``, ``/apis/<group>[/<version>]``) of built-in
  kinds and of every CRD, served as soon as the CRD is created and gone when it is deleted;
- CRD ``openAPIV3Schema``: objects are pruned, defaulted and validated (422 names the field),
  see :mod:`tests.k8s.schema`; ``pods/log`` served through a reader a kubelet provides.

Departures from kmock, each because kmock 0.8 is in the way:

- kmock's URL parser fails on the ``namespaces`` resource itself (``/api/v1/namespaces``
  raises, ``/api/v1/namespaces/x`` reads as namespace ``x``); :func:`parse_path` replaces
  it in ``kmock._internal.parsing`` (kmock is pinned exactly, ``kmock==0.8``);
- the emulator applies writes as naive merges in ``_handle`` before any reaction runs; here
  writes happen in the fallback handlers, so a reaction that intercepts a write (an injected
  500) leaves the state unchanged, as a failing API server would;
- kmock's buses stream only from the moment of subscription; resumable watches need the
  history, so changes are kept in a log (:attr:`ApiServer.changes`);
- ``kmock.Server`` patches aiohttp's resolver process-wide, which stacks badly with kopf
  and the kubelet running their own aiohttp clients in other threads; the server here
  listens through a plain ``aiohttp.web`` runner on 127.0.0.1 instead.

Known gaps against a real cluster: no authentication or RBAC enforcement (Roles are stored,
not applied; :mod:`tests.k8s.audit`, an observer in :attr:`ApiServer.observers`, decides
each request as RBAC would, for tests to assert on); no admission webhooks; no CEL
``x-kubernetes-validations`` or ``format`` checks; no pagination (``limit`` is ignored: one
page); writes other than server-side apply leave managedFields as they were (no ``Update``
managers); no watch compaction (never 410 Gone); each served version
of a CRD is a separate store (no conversion); no ``scale`` subresource; Foreground deletion
acts as Background and pods go at once (no graceful deletion); protobuf and CBOR bodies
are refused with 415, so kubectl's typed generators (``kubectl create deployment ...``)
fail while ``kubectl apply/create -f`` work (except the protobuf bodies helm's typed
clients send: ConfigMaps, Secrets, Namespaces, DeleteOptions, see :mod:`tests.k8s.protobuf`); and no scheduler, controllers or kubelet (see
:mod:`tests.k8s.kubelet` for a kubelet and a Deployment controller).

:class:`KubeApi` runs the server in its own thread and event loop, writes a kubeconfig for
it, and gives synchronous tests helpers (apply, get, wait_for...) that act on the store.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import copy
import dataclasses
import datetime
import json
import random
import re
import string
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Self, TypeVar

import aiohttp.web
import kmock
import kmock._internal.parsing as kmock_parsing
import kubernetes.client
import kubernetes.config
import multidict
import yaml

from . import apply as ssa
from . import audit, machinery, protobuf, schema

T = TypeVar("T")


# --------------------------------------------------------------------------- URL parsing


def parse_path(path: str) -> kmock_parsing.ParsedPath:
    """Split an API path into group, version, plural, namespace, name and subresource.

    ``/api/v1/namespaces/<n>`` names the namespace ``n`` itself; only after it does a further
    segment other than ``status``/``finalize`` start a namespaced resource.
    """
    parts = [p for p in path.strip("/").split("/") if p]
    if len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    elif len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) == 2 and parts[0] == "apis":
        return kmock_parsing.ParsedPath(group=parts[1])
    else:
        return kmock_parsing.ParsedPath()
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
        namespace, rest = rest[1], rest[2:]
    plural = rest[0] if rest else None
    name = rest[1] if len(rest) > 1 else None
    subresource = "/".join(rest[2:]) or None
    return kmock_parsing.ParsedPath(group, version, plural, namespace, name, subresource)


kmock_parsing.parse_path = parse_path


# ------------------------------------------------------------------------------ resources


@dataclasses.dataclass(frozen=True)
class ServedResource:
    """One served resource: what discovery says about it and how its objects behave."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    subresources: frozenset[str] = frozenset()
    columns: tuple[Mapping[str, Any], ...] = ()  # printer columns, Name excluded
    categories: tuple[str, ...] = ()
    singular: str = ""
    schema: Mapping[str, Any] | None = None  # the CRD's openAPIV3Schema
    crd: str | None = None  # name of the defining CRD; None for built-in kinds

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> kmock.resource:
        return kmock.resource(self.group, self.version, self.plural)

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    def names(self) -> set[str]:
        """Every name kubectl accepts for it: plural, singular, short names, kind."""
        return {self.plural, self.singular or self.kind.lower(), self.kind.lower(),
                *self.short_names}


def _column(name: str, path: str, type_: str = "string", priority: int = 0) -> dict[str, Any]:
    return {"name": name, "jsonPath": path, "type": type_, "priority": priority}


_AGE = machinery.AGE_COLUMN
_STATUS = frozenset({"status"})

BUILTIN_RESOURCES: tuple[ServedResource, ...] = (
    ServedResource("", "v1", "namespaces", "Namespace", False, ("ns",), _STATUS,
                   (_column("Status", ".status.phase"), _AGE)),
    ServedResource("", "v1", "pods", "Pod", True, ("po",), frozenset({"status", "log"}),
                   (_column("Status", ".status.phase"),
                    _column("Restarts", ".status.containerStatuses[*].restartCount", "integer"),
                    _AGE, _column("IP", ".status.podIP", priority=1)), ("all",)),
    ServedResource("", "v1", "services", "Service", True, ("svc",), _STATUS,
                   (_column("Type", ".spec.type"), _column("Ports", ".spec.ports[*].port"),
                    _AGE), ("all",)),
    ServedResource("", "v1", "configmaps", "ConfigMap", True, ("cm",), columns=(_AGE,)),
    ServedResource("", "v1", "secrets", "Secret", True, columns=(_column("Type", ".type"), _AGE)),
    ServedResource("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",),
                   columns=(_AGE,)),
    ServedResource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, ("pvc",),
                   _STATUS, (_column("Status", ".status.phase"), _AGE)),
    ServedResource("", "v1", "events", "Event", True, ("ev",),
                   columns=(_column("Reason", ".reason"), _column("Object", ".involvedObject.name"),
                            _column("Message", ".message"), _AGE)),
    ServedResource("apps", "v1", "deployments", "Deployment", True, ("deploy",), _STATUS,
                   (_column("Ready", ".status.readyReplicas", "integer"),
                    _column("Replicas", ".spec.replicas", "integer"), _AGE), ("all",)),
    ServedResource("rbac.authorization.k8s.io", "v1", "roles", "Role", True, columns=(_AGE,)),
    ServedResource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True,
                   columns=(_column("Role", ".roleRef.name"), _AGE)),
    ServedResource("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False,
                   columns=(_AGE,)),
    ServedResource("rbac.authorization.k8s.io", "v1", "clusterrolebindings",
                   "ClusterRoleBinding", False, columns=(_column("Role", ".roleRef.name"), _AGE)),
    ServedResource("coordination.k8s.io", "v1", "leases", "Lease", True,
                   columns=(_column("Holder", ".spec.holderIdentity"), _AGE)),
    ServedResource("apiextensions.k8s.io", "v1", "customresourcedefinitions",
                   "CustomResourceDefinition", False, ("crd", "crds"), _STATUS,
                   (_column("Created At", ".metadata.creationTimestamp"),)),
)
_CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
_NAMESPACES = kmock.resource("", "v1", "namespaces")
_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public")
EMULATED_VERSION = "v1.37.0"  # what /version reports (helm checks a chart's kubeVersion)


def served_from_crd(crd: Mapping[str, Any]) -> list[ServedResource]:
    """The resources a CustomResourceDefinition serves, one per served version."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    served = []
    for version in spec.get("versions") or []:
        if not version.get("served", True):
            continue
        columns = tuple(version.get("additionalPrinterColumns") or ()) or (_AGE,)
        served.append(ServedResource(
            group=spec["group"], version=version["name"], plural=names["plural"],
            kind=names["kind"], namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            short_names=tuple(names.get("shortNames") or ()),
            # Only the status subresource is emulated (no scale).
            subresources=frozenset((version.get("subresources") or {}).keys()) & _STATUS,
            columns=columns, categories=tuple(names.get("categories") or ()),
            singular=names.get("singular") or names["kind"].lower(),
            schema=(version.get("schema") or {}).get("openAPIV3Schema"),
            crd=crd["metadata"]["name"],
        ))
    return served


# ---------------------------------------------------------------------------------- errors


def api_error(code: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    """An error the client sees as a ``Status`` object, as kube-apiserver writes it."""
    return kmock.KubernetesError(status=code, reason=reason, message=message,
                                 details=details or {"causes": []})


def _not_found(res: ServedResource, name: str) -> kmock.KubernetesError:
    return api_error(404, "NotFound", f'{res.plural} "{name}" not found',
                     name=name, group=res.group, kind=res.plural)


def _conflict(res: ServedResource, name: str, why: str) -> kmock.KubernetesError:
    return api_error(409, "Conflict", f'Operation cannot be fulfilled on {res.plural} "{name}": '
                     f"{why}", name=name, group=res.group, kind=res.plural)


def _invalid(res: ServedResource, name: str, *problems: str) -> kmock.KubernetesError:
    """422 with one cause per ``"field.path: message"`` problem, which kubectl lists."""
    causes = []
    for problem in problems:
        field, _, message = problem.partition(": ")
        causes.append({"reason": "FieldValueInvalid", "field": field, "message": message}
                      if message else {"reason": "FieldValueInvalid", "message": problem})
    return api_error(422, "Invalid", f'{res.kind} "{name}" is invalid: {", ".join(problems)}',
                     name=name, group=res.group, kind=res.kind, causes=causes)


# ------------------------------------------------------------------------------- changes


@dataclasses.dataclass(frozen=True)
class Change:
    """One committed write: what a watch replays when it resumes after an older version."""

    rv: int
    resource: kmock.resource
    namespace: str | None
    name: str
    type: str  # ADDED, MODIFIED, DELETED
    object: dict[str, Any]
    previous: dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class _Filter:
    namespace: str | None
    name: str | None
    labels: tuple[machinery.Requirement, ...]
    fields: tuple[machinery.Requirement, ...]

    def matches(self, obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        return ((self.namespace is None or meta.get("namespace") == self.namespace)
                and (self.name is None or meta.get("name") == self.name)
                and machinery.labels_match(self.labels, meta.get("labels"))
                and machinery.fields_match(self.fields, obj))


def _now() -> str:
    return machinery.format_time(datetime.datetime.now(datetime.UTC))


def _spec_part(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


# ---------------------------------------------------------------------------- the server


class ApiServer(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with kube-apiserver's semantics (see the module docstring).

    The write operations (:meth:`create`, :meth:`update`, :meth:`delete`) and reads are plain
    methods: they run atomically on the server's event loop, which is what makes the global
    ``resourceVersion`` and the change log consistent without locks. HTTP handlers and
    :class:`KubeApi` call the same methods.
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[kmock.method.PUT] << self._serve_replace
        self.fallback[kmock.method.DELETE] << self._serve_delete_collection
        self.fallback["get", re.compile(r"/openapi/v3(/.*)?")] << self._serve_openapi
        self.fallback["get /apis/"] << self._serve_apis  # the python client's spelling
        self.fallback["get /api/"] << self._serve_api
        self.served: dict[kmock.resource, ServedResource] = {r.key: r for r in BUILTIN_RESOURCES}
        self.changes: list[Change] = []
        self.resource_version = 0
        self._uids: set[str] = set()  # of live objects, for the garbage collector
        self.log_reader: Callable[[str, str, str | None], str | None] | None = None
        self._changed = asyncio.Event()
        self._closing = False
        # Called with every request as it arrives, on the server's loop (see audit.py).
        self.observers: list[Callable[[kmock.Request], None]] = []
        for namespace in INITIAL_NAMESPACES:
            self.create(self.served[_NAMESPACES], None, {"metadata": {"name": namespace}})

    # ----------------------------------------------------------------- lookups

    def resolve(self, name: str | kmock.resource | ServedResource) -> ServedResource:
        """A served resource from ``'v1/pods'``, ``'fedkube.io/v1alpha1/federatedjobs'``, a
        plural, singular, short name or kind (``'fj'``, ``'FederatedJob'``)."""
        if isinstance(name, ServedResource):
            return name
        key = kmock.resource(name) if "/" in str(name) else None
        if isinstance(name, kmock.resource) or (key and key.version):
            key = name if isinstance(name, kmock.resource) else key
            if key in self.served:
                return self.served[key]
        else:
            for res in self.served.values():
                if str(name).lower() in res.names():
                    return res
        raise api_error(404, "NotFound", f"the server doesn't have a resource type {name!r}")

    def for_kind(self, api_version: str, kind: str) -> ServedResource:
        """The served resource of a manifest's ``apiVersion`` and ``kind``."""
        for res in self.served.values():
            if res.api_version == api_version and res.kind == kind:
                return res
        raise api_error(404, "NotFound", f'no matches for kind "{kind}" in version '
                        f'"{api_version}"')

    def get(self, res: ServedResource, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The stored object, or None."""
        key = (res.key, namespace if res.namespaced else None, name)
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key].raw
        return None

    def list(
        self,
        res: ServedResource,
        namespace: str | None = None,
        *,
        labels: tuple[machinery.Requirement, ...] = (),
        fields: tuple[machinery.Requirement, ...] = (),
    ) -> list[dict[str, Any]]:
        """Live objects of a resource (in a namespace, or all), sorted as etcd keys are."""
        select = _Filter(namespace if res.namespaced else None, None, labels, fields)
        found = [obj.raw for (key, _, _), obj in self.objects.items()
                 if key == res.key and not obj.deleted]
        found = [obj for obj in found if select.matches(obj)]
        return sorted(found, key=lambda o: (o["metadata"].get("namespace") or "",
                                            o["metadata"]["name"]))

    def _live(self) -> Iterable[tuple[ServedResource, dict[str, Any]]]:
        for (key, _, _), obj in list(self.objects.items()):
            if not obj.deleted and key in self.served:
                yield self.served[key], obj.raw

    # ------------------------------------------------------------------ writes

    def create(
        self, res: ServedResource, namespace: str | None, body: Any, *, dry_run: bool = False,
        strict: bool = False, managed_fields: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """POST: store a new object with server-set metadata; 409 if the name is taken.
        ``managed_fields`` (from a server-side apply) become its metadata.managedFields."""
        if not isinstance(body, Mapping):
            raise api_error(400, "BadRequest", "the body of the request must be a JSON object")
        obj = copy.deepcopy(dict(body))
        meta = obj["metadata"] = dict(obj.get("metadata") or {})
        namespace = self._namespace_of(res, namespace, meta.get("namespace"))
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            meta["name"] = meta["generateName"] + suffix
        name = meta.get("name")
        if not name:
            raise _invalid(res, "", "metadata.name: Required value: name or generateName is "
                           "required")
        if obj.get("kind", res.kind) != res.kind:
            raise api_error(400, "BadRequest", f"the kind {obj['kind']!r} of the object does not "
                            f"match the resource {res.plural!r}")
        if namespace is not None:
            ns = self.get(self.served[_NAMESPACES], None, namespace)
            if ns is None:
                raise api_error(404, "NotFound", f'namespaces "{namespace}" not found',
                                name=namespace, kind="namespaces")
            if ns["metadata"].get("deletionTimestamp"):
                raise api_error(403, "Forbidden", f'{res.plural} "{name}" is forbidden: unable to '
                                f"create new content in namespace {namespace} because it is "
                                "being terminated")
        if self.get(res, namespace, name) is not None:
            raise api_error(409, "AlreadyExists", f'{res.plural} "{name}" already exists',
                            name=name, group=res.group, kind=res.plural)
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        for system_field in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds",
                             "managedFields"):
            meta.pop(system_field, None)
        meta.update(name=name, uid=_uid(), creationTimestamp=_now(), generation=1)
        if managed_fields:
            meta["managedFields"] = managed_fields
        meta.pop("namespace", None)
        if namespace is not None:
            meta["namespace"] = namespace
        if res.has_status:
            obj.pop("status", None)
        obj = self._admit(res, obj, None, strict=strict)
        if dry_run:
            return obj
        stored = self._commit(res, "ADDED", obj, None)
        owners = {ref.get("uid") for ref in meta.get("ownerReferences") or []}
        if owners and not owners & self._uids:
            # Every owner is already gone: the garbage collector takes it, as it would soon.
            self._delete_quietly(res, stored)
        return stored

    def update(
        self,
        res: ServedResource,
        namespace: str | None,
        name: str,
        change: Callable[[dict[str, Any]], Any],
        *,
        subresource: str | None = None,
        dry_run: bool = False,
        strict: bool = False,
        applied: bool = False,
    ) -> dict[str, Any]:
        """PUT/PATCH: ``change`` maps a copy of the stored object to the wanted one.

        Writes to ``status`` keep everything else; writes to the main object keep the stored
        status when the resource has the status subresource; system metadata is kept, and
        so is metadata.managedFields unless the write is a server-side apply (``applied``),
        whose result carries the new ones.
        """
        namespace = namespace if res.namespaced else None
        current = self.get(res, namespace, name)
        if current is None:
            raise _not_found(res, name)
        if subresource not in (None, "status") or (subresource and not res.has_status):
            raise api_error(404, "NotFound", f"the server could not find the requested resource "
                            f"({res.plural}/{subresource})")
        wanted = change(copy.deepcopy(current))
        if not isinstance(wanted, dict):
            raise _invalid(res, name, "the result of the update is not an object")
        if subresource == "status" or res.has_status:
            source = wanted if subresource == "status" else current
            new = copy.deepcopy(current) if subresource == "status" else wanted
            new.pop("status", None)
            if source.get("status") is not None:
                new["status"] = source["status"]
        else:
            new = wanted
        meta = new["metadata"] = dict(new.get("metadata") or {})
        for system_field in ("name", "namespace", "uid", "creationTimestamp", "generation",
                             "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(system_field, None)
            if system_field in current["metadata"]:
                meta[system_field] = current["metadata"][system_field]
        meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        managed = ((wanted.get("metadata") or {}) if applied else current["metadata"]).get(
            "managedFields")
        meta.pop("managedFields", None)
        if managed:
            meta["managedFields"] = managed
        new["apiVersion"], new["kind"] = res.api_version, res.kind
        if _spec_part(new) != _spec_part(current):
            meta["generation"] = current["metadata"].get("generation", 0) + 1
        new = self._admit(res, new, current, strict=strict)
        if new == current or dry_run:
            return new
        stored = self._commit(res, "MODIFIED", new, current)
        done = stored["metadata"].get("deletionTimestamp") and not stored["metadata"].get(
            "finalizers")
        if done and not self._content_of(res, stored):
            self._remove(res, namespace, name)
        return stored

    def delete(
        self,
        res: ServedResource,
        namespace: str | None,
        name: str,
        *,
        propagation: str = "Background",
        preconditions: Mapping[str, str] | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """DELETE: mark while finalizers or content remain, else remove and collect dependents."""
        namespace = namespace if res.namespaced else None
        current = self.get(res, namespace, name)
        if current is None:
            raise _not_found(res, name)
        for field, wanted in (preconditions or {}).items():
            if wanted is not None and current["metadata"].get(field) != wanted:
                raise _conflict(res, name, f"Precondition failed: {field}: {wanted}")
        if dry_run:
            return current
        if propagation == "Orphan":
            self._orphan_dependents(current["metadata"]["uid"])
        content = self._content_of(res, current)
        if not current["metadata"].get("finalizers") and not content:
            return self._remove(res, namespace, name)
        marked = current
        if not current["metadata"].get("deletionTimestamp"):
            marked = copy.deepcopy(current)
            marked["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
            if res.key == _NAMESPACES:
                marked["status"] = {"phase": "Terminating"}
            marked = self._commit(res, "MODIFIED", marked, current)
        for content_res, obj in content:
            self._delete_quietly(content_res, obj)
        return self.get(res, namespace, name) or marked

    def _remove(self, res: ServedResource, namespace: str | None, name: str) -> dict[str, Any]:
        current = self.get(res, namespace, name)
        assert current is not None
        final = self._commit(res, "DELETED", copy.deepcopy(current), current)
        if res.key == _CRDS:
            for served in served_from_crd(current):
                self.served.pop(served.key, None)
        self._collect_dependents(current["metadata"]["uid"])
        self._release_containers()
        return final

    def _collect_dependents(self, uid: str) -> None:
        """The garbage collector: dependents whose owners are all gone are deleted; those
        with an owner left lose the reference to the one that went."""
        for res, obj in list(self._live()):
            refs = obj["metadata"].get("ownerReferences") or []
            if not any(ref.get("uid") == uid for ref in refs):
                continue
            kept = [ref for ref in refs if ref.get("uid") in self._uids]
            if not kept:
                self._delete_quietly(res, obj)
            elif self.get(res, obj["metadata"].get("namespace"), obj["metadata"]["name"]):
                self._set_owners(res, obj, kept)

    def _set_owners(self, res: ServedResource, obj: Mapping[str, Any],
                    refs: list[dict[str, Any]]) -> None:
        meta = obj["metadata"]
        self.update(res, meta.get("namespace"), meta["name"],
                    lambda o: {**o, "metadata": {**o["metadata"], "ownerReferences": refs}})

    def _delete_quietly(self, res: ServedResource, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        if self.get(res, meta.get("namespace"), meta["name"]) is not None:
            self.delete(res, meta.get("namespace"), meta["name"])

    def _content_of(
        self, res: ServedResource, obj: Mapping[str, Any],
    ) -> list[tuple[ServedResource, dict[str, Any]]]:
        """What must go before a namespace (its objects) or a CRD (its custom objects) can."""
        if res.key == _NAMESPACES:
            name = obj["metadata"]["name"]
            return [(r, o) for r, o in self._live() if o["metadata"].get("namespace") == name]
        if res.key == _CRDS:
            crd = obj["metadata"]["name"]
            return [(r, o) for r, o in self._live() if r.crd == crd]
        return []

    def _release_containers(self) -> None:
        for res in (self.served[_NAMESPACES], self.served[_CRDS]):
            for obj in self.list(res):
                meta = obj["metadata"]
                if (meta.get("deletionTimestamp") and not meta.get("finalizers")
                        and not self._content_of(res, obj)):
                    self._remove(res, None, meta["name"])

    def _orphan_dependents(self, uid: str) -> None:
        for res, obj in list(self._live()):
            refs = obj["metadata"].get("ownerReferences") or []
            if any(ref.get("uid") == uid for ref in refs):
                self._set_owners(res, obj, [ref for ref in refs if ref.get("uid") != uid])

    def _namespace_of(self, res: ServedResource, url_ns: str | None, body_ns: str | None,
                      ) -> str | None:
        if not res.namespaced:
            return None
        if url_ns and body_ns and url_ns != body_ns:
            raise api_error(400, "BadRequest", "the namespace of the provided object does not "
                            "match the namespace sent on the request")
        namespace = url_ns or body_ns
        if not namespace:
            raise api_error(400, "BadRequest", f"{res.plural} are namespaced: a namespace is "
                            "required")
        return namespace

    def _admit(self, res: ServedResource, obj: dict[str, Any], old: dict[str, Any] | None,
               *, strict: bool = False) -> dict[str, Any]:
        """Per-kind server behaviour: defaults, status the server owns, validation."""
        name = obj["metadata"]["name"]
        if res.key == kmock.resource("", "v1", "secrets") and "stringData" in obj:
            data = dict(obj.get("data") or {})
            for key, value in (obj.pop("stringData") or {}).items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            obj["data"] = data
        elif res.key == kmock.resource("", "v1", "pods") and old is None:
            obj["status"] = {"phase": "Pending"}
        elif res.key == _NAMESPACES and old is None:
            obj["status"] = {"phase": "Active"}
        elif res.key == _CRDS:
            obj = self._admit_crd(res, obj, old)
        if res.schema is not None:
            admitted = schema.admit(res.schema, obj)
            if admitted.errors:
                raise _invalid(res, name, *admitted.errors)
            if strict and admitted.unknown:
                fields = ", ".join(f'unknown field "{f}"' for f in admitted.unknown)
                raise api_error(400, "BadRequest", f"strict decoding error: {fields}")
            obj = admitted.object
        return obj

    def _admit_crd(self, res: ServedResource, crd: dict[str, Any], old: dict[str, Any] | None,
                   ) -> dict[str, Any]:
        spec, name = crd.get("spec") or {}, crd["metadata"]["name"]
        names = spec.get("names") or {}
        if not spec.get("group") or not names.get("plural") or not names.get("kind"):
            raise _invalid(res, name, "spec.group, spec.names.plural and spec.names.kind are "
                           "required")
        if name != f"{names['plural']}.{spec['group']}":
            raise _invalid(res, name, f"metadata.name: Invalid value: {name!r}: must be "
                           f"spec.names.plural+\".\"+spec.group")
        if not spec.get("versions"):
            raise _invalid(res, name, "spec.versions: Required value")
        accepted = {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                    "message": "no conflicts found", "lastTransitionTime": _now()}
        established = {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                       "message": "the initial names have been accepted",
                       "lastTransitionTime": _now()}
        previous = (old or {}).get("status") or {}
        crd["status"] = {
            "acceptedNames": names,
            "conditions": previous.get("conditions") or [accepted, established],
            "storedVersions": [v["name"] for v in spec["versions"] if v.get("storage")],
        }
        return crd

    def _commit(self, res: ServedResource, event: str, obj: dict[str, Any],
                previous: dict[str, Any] | None) -> dict[str, Any]:
        """Stamp the next resourceVersion, store, log the change and wake the watchers."""
        self.resource_version += 1
        obj["metadata"]["resourceVersion"] = str(self.resource_version)
        namespace, name = obj["metadata"].get("namespace"), obj["metadata"]["name"]
        key = (res.key, namespace, name)
        if event == "DELETED":
            self.objects[key].delete()
            self._uids.discard(obj["metadata"]["uid"])
        elif key in self.objects:
            self.objects[key].history.append(obj)
        else:
            self.objects[key] = obj
        if event == "ADDED":
            self._uids.add(obj["metadata"]["uid"])
        if res.key == _CRDS and event != "DELETED":
            for old in [r for r in self.served.values() if r.crd == name]:
                del self.served[old.key]
            self.served.update((r.key, r) for r in served_from_crd(obj))
        self.changes.append(Change(self.resource_version, res.key, namespace, name, event,
                                   obj, previous))
        self._changed.set()
        self._changed = asyncio.Event()
        return obj

    def close_watches(self) -> None:
        """End every open watch stream, so that the HTTP server can stop at once."""
        self._closing = True
        self._changed.set()

    # ------------------------------------------------------------------ watch

    async def watch(
        self,
        res: ServedResource,
        select: _Filter,
        *,
        since: int | None,
        initial_bookmark: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events: current objects as ADDED when ``since`` is None, then every change
        after ``since`` (or after now), re-typed as a selector sees it."""
        if since is None:
            start = len(self.changes)
            for obj in self.list(res, select.namespace, labels=select.labels,
                                 fields=select.fields):
                if select.matches(obj):
                    yield {"type": "ADDED", "object": obj}
            if initial_bookmark:
                yield {"type": "BOOKMARK", "object": {
                    "kind": res.kind, "apiVersion": res.api_version, "metadata": {
                        "resourceVersion": str(self.resource_version),
                        "annotations": {"k8s.io/initial-events-end": "true"}}}}
        else:
            start = bisect.bisect_right(self.changes, since, key=lambda c: c.rv)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        position = start
        while not self._closing:
            while position < len(self.changes):
                change = self.changes[position]
                position += 1
                if change.resource == res.key:
                    event = _as_seen(change, select)
                    if event is not None:
                        yield event
            changed = self._changed  # taken with no await since the last check: nothing missed
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return

    # ----------------------------------------------------------- HTTP handling

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        return await super().__call__(await _protobuf_as_json(raw_request))

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # Skip the emulator's own _handle (naive merges before dispatch): writes happen in the
        # fallbacks below, and only if no test-defined reaction intercepted the request first.
        for observe in self.observers:
            observe(request)
        return await kmock.RawHandler._handle(self, request)

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        # kmock decodes every body as text before any handler runs, so a binary body
        # (protobuf, CBOR) fails there; kube-apiserver would answer 415 to a type it does
        # not take, and clients then fall back to JSON.
        if isinstance(exc, UnicodeDecodeError):
            exc = _binary_body()
        return await super()._render_error(exc)

    def _request_resource(self, request: kmock.Request) -> ServedResource:
        if request.resource is None or request.resource not in self.served:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        return self.served[request.resource]

    def _filter(self, request: kmock.Request, res: ServedResource) -> _Filter:
        try:
            labels = machinery.parse_label_selector(request.params.get("labelSelector"))
            fields = machinery.parse_field_selector(request.params.get("fieldSelector"))
        except ValueError as exc:
            raise api_error(400, "BadRequest", str(exc)) from exc
        return _Filter(request.namespace if res.namespaced else None, request.name, labels,
                       fields)

    def _render(self, request: kmock.Request, res: ServedResource, objs: list[dict[str, Any]],
                ) -> dict[str, Any]:
        return machinery.table(
            objs, res.columns, include_object=request.params.get("includeObject",
                                                                 "PartialObjectMetadata"),
            resource_version=str(self.resource_version))

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        res = self._request_resource(request)
        select = self._filter(request, res)
        items = self.list(res, select.namespace, labels=select.labels, fields=select.fields)
        if _wants_table(request):
            return self._render(request, res, items)
        return {"apiVersion": res.api_version, "kind": f"{res.kind}List",
                "metadata": {"resourceVersion": str(self.resource_version)}, "items": items}

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[kmock.Payload]:
        res = self._request_resource(request)
        select = self._filter(request, res)
        params = request.params
        rv = params.get("resourceVersion")
        initial = params.get("sendInitialEvents") == "true"
        if rv not in (None, "") and not str(rv).isdigit():
            raise api_error(400, "BadRequest", f"invalid resourceVersion {rv!r}")
        since = None if initial or rv in (None, "", "0") else int(rv)
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        as_table = _wants_table(request)
        return kmock.Response(
            headers={"Content-Type": "application/json"},
            payload=self._stream_watch(request, res, select, since, initial, timeout, as_table))

    async def _stream_watch(self, request: kmock.Request, res: ServedResource, select: _Filter,
                            since: int | None, initial: bool, timeout: float | None,
                            as_table: bool) -> AsyncIterator[kmock.Payload]:
        yield b""  # send the headers now: a quiet watch must still look connected
        async for event in self.watch(res, select, since=since, initial_bookmark=initial,
                                      timeout=timeout):
            if as_table and event["type"] != "BOOKMARK":
                event = {"type": event["type"],
                         "object": self._render(request, res, [event["object"]])}
            yield event

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        res = self._request_resource(request)
        assert request.name is not None
        if request.subresource == "log" and res.key == kmock.resource("", "v1", "pods"):
            return self._pod_log(request)
        if request.subresource not in (None, "status") or (
                request.subresource == "status" and not res.has_status):
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        obj = self.get(res, request.namespace, request.name)
        if obj is None:
            raise _not_found(res, request.name)
        return self._render(request, res, [obj]) if _wants_table(request) else obj

    def _pod_log(self, request: kmock.Request) -> kmock.Payload:
        assert request.name is not None and request.namespace is not None
        pods = self.served[kmock.resource("", "v1", "pods")]
        if self.get(pods, request.namespace, request.name) is None:
            raise _not_found(pods, request.name)
        text = None
        if self.log_reader is not None:
            text = self.log_reader(request.namespace, request.name,
                                   request.params.get("container"))
        if text is None:
            raise api_error(400, "BadRequest", f'container in pod "{request.name}" is waiting '
                            "to start: no logs yet")
        return kmock.Response(headers={"Content-Type": "text/plain"}, payload=text.encode())

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        res = self._request_resource(request)
        if request.subresource is not None or request.name is not None:
            raise api_error(405, "MethodNotAllowed", "POST is only served on collections")
        _content_type(request)
        obj = self.create(res, request.namespace, request.data, **_write_options(request))
        return kmock.Response(status=201, payload=obj)

    async def _serve_update(self, request: kmock.Request) -> kmock.Payload:
        res = self._request_resource(request)
        assert request.name is not None
        patch_type = _content_type(request)
        if patch_type == "application/apply-patch+yaml":
            return self._server_side_apply(request, res)
        body = request.data
        if body is None:
            raise api_error(400, "BadRequest", "the patch is not valid JSON")

        def change(current: dict[str, Any]) -> Any:
            try:
                if patch_type == "application/json-patch+json":
                    return machinery.json_patch(current, body)
                _check_version(res, current, (body.get("metadata") or {}).get("resourceVersion")
                               if isinstance(body, Mapping) else None)
                if patch_type == "application/strategic-merge-patch+json":
                    return machinery.strategic_merge_patch(current, body)
                if patch_type == "application/merge-patch+json":
                    return machinery.merge_patch(current, body)
            except machinery.PatchError as exc:
                raise _invalid(res, current["metadata"]["name"], str(exc)) from exc
            raise api_error(415, "UnsupportedMediaType", f"the body of the request was in an "
                            f"unknown format - accepted media types include: "
                            f"application/json-patch+json, application/merge-patch+json, "
                            f"application/apply-patch+yaml (got {patch_type!r})")

        return self.update(res, request.namespace, request.name, change,
                           subresource=request.subresource, **_write_options(request))

    def _server_side_apply(self, request: kmock.Request, res: ServedResource) -> kmock.Payload:
        """PATCH with application/apply-patch+yaml: see :mod:`tests.k8s.apply`."""
        assert request.name is not None
        manager = request.params.get("fieldManager")
        if not manager:
            raise api_error(400, "BadRequest", "PATCH requests with apply-patch content type "
                            "must have fieldManager")
        try:
            # JSON first: it is valid YAML 1.2, but PyYAML's YAML 1.1 reads 1e-05 as a string.
            body = json.loads(request.text)
        except ValueError:
            body = None
        try:
            body = body if body is not None else yaml.safe_load(request.text)
        except yaml.YAMLError as exc:
            raise api_error(400, "BadRequest", f"the apply patch is not valid YAML: {exc}") from exc
        if not isinstance(body, Mapping) or not body.get("apiVersion") or not body.get("kind"):
            raise api_error(400, "BadRequest", "an apply patch is an object with apiVersion and "
                            "kind")
        subresource = request.subresource or ""
        config = self._apply_scope(res, body, subresource)
        keys = ssa.list_keys_from_schema(res.schema)
        force = request.params.get("force") == "true"

        def applied(current: Mapping[str, Any]) -> dict[str, Any]:
            try:
                return ssa.apply(current, config, manager=manager, subresource=subresource,
                                 force=force, keys=keys, now=_now())
            except ssa.ApplyError as exc:
                reason = "Conflict" if exc.code == 409 else "Invalid"
                raise api_error(exc.code, reason, str(exc), name=request.name, group=res.group,
                                kind=res.plural, causes=exc.causes) from exc

        current = self.get(res, request.namespace, request.name)
        if current is None:
            if subresource:
                raise _not_found(res, request.name)
            created = applied({"apiVersion": res.api_version, "kind": res.kind})
            managed = created["metadata"].pop("managedFields", None)
            obj = self.create(res, request.namespace, created,
                              managed_fields=managed, **_write_options(request))
            return kmock.Response(status=201, payload=obj)

        def change(current: dict[str, Any]) -> Any:
            _check_version(res, current, (body.get("metadata") or {}).get("resourceVersion"))
            return applied(current)

        return self.update(res, request.namespace, request.name, change,
                           subresource=request.subresource, applied=True,
                           **_write_options(request))

    @staticmethod
    def _apply_scope(res: ServedResource, body: Mapping[str, Any], subresource: str,
                     ) -> dict[str, Any]:
        """What an apply may touch: only ``status`` through the status subresource; all but
        ``status`` through the main resource when it has that subresource."""
        if subresource == "status":
            return {"status": copy.deepcopy(body.get("status") or {})}
        config = {k: copy.deepcopy(v) for k, v in body.items()
                  if not (k == "status" and res.has_status)}
        meta = config.get("metadata") or {}
        config["metadata"] = {k: v for k, v in meta.items() if k != "resourceVersion"}
        return config

    async def _serve_replace(self, request: kmock.Request) -> kmock.Payload:
        res = self._request_resource(request)
        if request.name is None:
            raise api_error(405, "MethodNotAllowed", "PUT is only served on objects")
        _content_type(request)
        body = request.data
        if not isinstance(body, Mapping):
            raise api_error(400, "BadRequest", "the body of the request must be a JSON object")

        def change(current: dict[str, Any]) -> Any:
            _check_version(res, current, (body.get("metadata") or {}).get("resourceVersion"))
            return copy.deepcopy(dict(body))

        return self.update(res, request.namespace, request.name, change,
                           subresource=request.subresource, **_write_options(request))

    async def _serve_delete(self, request: kmock.Request) -> kmock.Payload:
        res = self._request_resource(request)
        assert request.name is not None
        options = request.data if isinstance(request.data, Mapping) else {}
        propagation = options.get("propagationPolicy") or request.params.get(
            "propagationPolicy", "Background")
        return self.delete(res, request.namespace, request.name, propagation=propagation,
                           preconditions=options.get("preconditions"),
                           dry_run=_write_options(request)["dry_run"])

    async def _serve_delete_collection(self, request: kmock.Request) -> kmock.Payload:
        res = self._request_resource(request)
        if request.name is not None:
            raise api_error(405, "MethodNotAllowed", "unsupported DELETE")
        select = self._filter(request, res)
        deleted = []
        for obj in self.list(res, select.namespace, labels=select.labels, fields=select.fields):
            meta = obj["metadata"]
            if self.get(res, meta.get("namespace"), meta["name"]) is not None:
                deleted.append(self.delete(res, meta.get("namespace"), meta["name"],
                                           dry_run=_write_options(request)["dry_run"]))
        return {"apiVersion": res.api_version, "kind": f"{res.kind}List",
                "metadata": {"resourceVersion": str(self.resource_version)}, "items": deleted}

    # -------------------------------------------------------------- discovery

    async def _serve_api(self, request: kmock.Request) -> kmock.Payload:
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for res in self.served.values():
            if res.group and res.version not in groups.setdefault(res.group, []):
                groups[res.group].append(res.version)
        return groups

    @staticmethod
    def _group_info(group: str, versions: list[str]) -> dict[str, Any]:
        listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": listed, "preferredVersion": listed[0]}

    async def _serve_apis(self, request: kmock.Request) -> kmock.Payload:
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            self._group_info(g, v) for g, v in sorted(self._groups().items())]}

    async def _serve_group(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None
        versions = self._groups().get(request.resource.group or "")
        if not versions:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        return {"kind": "APIGroup", "apiVersion": "v1",
                **self._group_info(request.resource.group or "", versions)}

    async def _serve_version(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None
        group, version = request.resource.group, request.resource.version
        listed = [r for r in self.served.values() if (r.group, r.version) == (group, version)]
        if not listed:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        resources = []
        for res in listed:
            resources.append({
                "name": res.plural, "singularName": res.singular or res.kind.lower(),
                "namespaced": res.namespaced, "kind": res.kind, "verbs": _VERBS,
                "shortNames": list(res.short_names), "categories": list(res.categories)})
            for sub in sorted(res.subresources):
                resources.append({"name": f"{res.plural}/{sub}", "singularName": "",
                                  "namespaced": res.namespaced, "kind": res.kind,
                                  "verbs": ["get"] if sub == "log" else ["get", "patch", "update"]})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version,
                "resources": resources}

    async def _serve_openapi(self, request: kmock.Request) -> kmock.Payload:
        """Just enough OpenAPI v3 for kubectl to see that every kind takes ``fieldValidation``
        and ``dryRun``, so it leaves validation to the server instead of validating itself."""
        listed = {r.api_version: r.group for r in self.served.values()}
        roots = {v: f"apis/{v}" if g else f"api/{v}" for v, g in listed.items()}
        wanted = request.url.path.removeprefix("/openapi/v3").strip("/")
        if not wanted:
            return {"paths": {root: {"serverRelativeURL": f"/openapi/v3/{root}?hash="
                                     f"{self.resource_version}"} for root in roots.values()}}
        params = [{"name": p, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
                  for p in ("dryRun", "fieldManager", "fieldValidation")]
        paths = {}
        for res in self.served.values():
            if roots[res.api_version] != wanted:
                continue
            gvk = {"group": res.group, "version": res.version, "kind": res.kind}
            ns = "/namespaces/{namespace}" if res.namespaced else ""
            operation = {"x-kubernetes-group-version-kind": gvk, "parameters": params,
                         "responses": {}}
            paths[f"/{wanted}{ns}/{res.plural}/{{name}}"] = {"patch": operation, "put": operation}
            paths[f"/{wanted}{ns}/{res.plural}"] = {"post": operation}
        if not paths:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.37.0"},
                "paths": paths, "components": {"schemas": {}}}

    async def _serve_server_version(self, request: kmock.Request) -> kmock.Payload:
        # kmock says v1.26 (k3s); the chart requires >= 1.28 and kubectl here is 1.37.
        return {"major": "1", "minor": "37", "gitVersion": EMULATED_VERSION,
                "gitCommit": "0" * 40, "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25.0", "compiler": "gc",
                "platform": "linux/amd64"}

    async def _serve_root(self, request: kmock.Request) -> kmock.Payload:
        paths = {"/api", "/api/v1", "/apis", "/version"}
        for group, versions in self._groups().items():
            paths |= {f"/apis/{group}"} | {f"/apis/{group}/{v}" for v in versions}
        return {"paths": sorted(paths)}


def _uid() -> str:
    return str(uuid.uuid4())


def _binary_body() -> kmock.KubernetesError:
    return api_error(415, "UnsupportedMediaType", "the body of the request was in an unknown "
                     "format - accepted media types include: application/json (protobuf and "
                     "CBOR are not emulated: kubectl's typed generators such as `kubectl create "
                     "deployment` send protobuf; `kubectl create -f`/`apply -f` send JSON)")


async def _protobuf_as_json(raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.BaseRequest:
    """The request with a protobuf body that :mod:`tests.k8s.protobuf` knows (helm's release
    ConfigMaps and Secrets) re-encoded as JSON; any other request as it came (a protobuf
    body of another kind is then refused with 415)."""
    headers = raw_request.headers
    if headers.get("Content-Type", "").split(";")[0].strip() != protobuf.CONTENT_TYPE:
        return raw_request
    try:
        obj = protobuf.to_json_object(await raw_request.read())
    except protobuf.UnsupportedBody:
        return raw_request
    # In place (aiohttp cannot clone a request once read): read() serves this cached body,
    # and `headers` is cached per request.
    raw_request._read_bytes = json.dumps(obj).encode()
    raw_request._cache["headers"] = multidict.CIMultiDictProxy(multidict.CIMultiDict(
        {**headers, "Content-Type": "application/json"}))
    return raw_request


def _content_type(request: kmock.Request) -> str:
    headers = {k.lower(): v for k, v in request.headers.items()}
    content_type = headers.get("content-type", "").split(";")[0].strip()
    if "protobuf" in content_type or "cbor" in content_type:
        raise _binary_body()
    return content_type


def _wants_table(request: kmock.Request) -> bool:
    return any(k.lower() == "accept" and "as=Table" in v for k, v in request.headers.items())


def _write_options(request: kmock.Request) -> dict[str, bool]:
    return {"dry_run": request.params.get("dryRun") == "All",
            "strict": request.params.get("fieldValidation") == "Strict"}


def _check_version(res: ServedResource, current: Mapping[str, Any], wanted: str | None) -> None:
    """Optimistic concurrency: a write that names a resourceVersion must name the current one."""
    if wanted and wanted != current["metadata"]["resourceVersion"]:
        raise _conflict(res, current["metadata"]["name"], "the object has been modified; please "
                        "apply your changes to the latest version and try again")


def _as_seen(change: Change, select: _Filter) -> dict[str, Any] | None:
    """A change as a watch with this filter sees it (an object leaving the selection is
    DELETED for it, one entering it ADDED), or None when it sees nothing."""
    now, before = select.matches(change.object), select.matches(change.previous)
    if change.type == "MODIFIED":
        kind = ("MODIFIED" if now and before else "ADDED" if now else
                "DELETED" if before else None)
    else:
        kind = change.type if now else None
    return None if kind is None else {"type": kind, "object": change.object}


# ---------------------------------------------------------------- the synchronous facade


class KubeApi:
    """An :class:`ApiServer` on 127.0.0.1 (random port) in its own thread and event loop.

    Attributes: ``url``; ``kubeconfig`` (a file pointing at ``url``, context ``emulator``,
    namespace ``default``); ``api_client`` (a ``kubernetes.client.ApiClient`` from that
    kubeconfig); ``server`` (the :class:`ApiServer`, for kmock-style assertions such as
    ``server.objects['v1/pods', 'ns', 'name']`` and fault injection). The helpers act on the
    store directly, atomically, from any thread; ``resource`` arguments take anything
    :meth:`ApiServer.resolve` does (``'pods'``, ``'fj'``, ``'apps/v1/deployments'``).
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.kubeconfig = self.workdir / "kubeconfig"
        self.url = ""
        self.server: ApiServer
        self.api_client: kubernetes.client.ApiClient
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 10.0) -> KubeApi:
        self._thread = threading.Thread(target=self._run, name="kube-api", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._failure is not None:
            raise RuntimeError(f"the API server did not start: {self._failure!r}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_kubeconfig(self.kubeconfig, token=audit.ADMIN_TOKEN)
        self.api_client = kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
        return self

    def write_kubeconfig(self, path: Path, *, token: str | None,
                         namespace: str = "default") -> Path:
        """A kubeconfig for this server that authenticates with ``token`` (none: anonymous);
        see :mod:`tests.k8s.audit` for the identities tokens stand for."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token} if token else {}}],
            "contexts": [{"name": "emulator", "context": {
                "cluster": "emulator", "user": "tester", "namespace": namespace}}],
        }))
        return path

    def stop(self) -> None:
        if self._thread is None:
            return
        if hasattr(self, "api_client"):
            self.api_client.close()
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=15)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 -- surfaced by start() and stop()
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.server = ApiServer()
        async with self.server:
            # No access log: `server.requests` (kmock's request log) has every request.
            runner = aiohttp.web.ServerRunner(aiohttp.web.Server(self.server, access_log=None),
                                              shutdown_timeout=1.0, handle_signals=False)
            await runner.setup()
            site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}"
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                self.server.close_watches()
                await runner.cleanup()

    # ---------------------------------------------------------------- helpers

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the server's loop (atomically) and return its result."""
        assert self._loop is not None

        async def invoke() -> T:
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(invoke(), self._loop).result(timeout=30)

    def resource(self, resource: str | ServedResource) -> ServedResource:
        return self.call(self.server.resolve, resource)

    def apply(self, manifest: Mapping[str, Any] | str, namespace: str | None = None,
              ) -> list[dict[str, Any]]:
        """Create each document (YAML text or a dict), or merge it into the existing object,
        as ``kubectl apply`` would for a first-time or a plain change."""
        documents = ([manifest] if isinstance(manifest, Mapping)
                     else [d for d in yaml.safe_load_all(manifest) if d])
        return [self.call(self._apply_one, document, namespace) for document in documents]

    def apply_file(self, path: str | Path, namespace: str | None = None) -> list[dict[str, Any]]:
        """:meth:`apply` every document of a YAML file (a CRD file, a job manifest...)."""
        return self.apply(Path(path).read_text(), namespace)

    def _apply_one(self, document: Mapping[str, Any], namespace: str | None) -> dict[str, Any]:
        res = self.server.for_kind(document.get("apiVersion", ""), document.get("kind", ""))
        meta = document.get("metadata") or {}
        ns = (meta.get("namespace") or namespace or "default") if res.namespaced else None
        if meta.get("name") and self.server.get(res, ns, meta["name"]) is not None:
            return self.server.update(res, ns, meta["name"],
                                      lambda current: machinery.merge_patch(current, document))
        return self.server.create(res, ns, document)

    def get(self, resource: str | ServedResource, name: str, namespace: str | None = None,
            ) -> dict[str, Any] | None:
        """The object, or None (``namespace`` defaults to ``default`` for namespaced kinds)."""
        res = self.resource(resource)
        return self.call(self.server.get, res, _ns(res, namespace), name)

    def list(self, resource: str | ServedResource, namespace: str | None = None,
             label_selector: str = "") -> list[dict[str, Any]]:
        """Objects of a resource, in one namespace or (``namespace=None``) in all."""
        res = self.resource(resource)
        labels = machinery.parse_label_selector(label_selector)
        return self.call(self.server.list, res, namespace, labels=labels)

    def patch(self, resource: str | ServedResource, name: str, patch: Mapping[str, Any],
              namespace: str | None = None, subresource: str | None = None) -> dict[str, Any]:
        """A JSON merge patch of the object (or of its ``status`` subresource)."""
        res = self.resource(resource)
        return self.call(self.server.update, res, _ns(res, namespace), name,
                         lambda current: machinery.merge_patch(current, patch),
                         subresource=subresource)

    def delete(self, resource: str | ServedResource, name: str, namespace: str | None = None,
               ) -> dict[str, Any]:
        res = self.resource(resource)
        return self.call(self.server.delete, res, _ns(res, namespace), name)

    def wait_for(
        self,
        resource: str | ServedResource,
        name: str,
        predicate: Callable[[dict[str, Any]], Any] = bool,
        namespace: str | None = None,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """Poll until the object exists and ``predicate(obj)`` is true; return it.
        Raises ``TimeoutError`` with the last state seen."""
        res = self.resource(resource)
        return _poll(lambda: self.call(self.server.get, res, _ns(res, namespace), name),
                     lambda obj: obj is not None and predicate(obj), timeout,
                     f"{res.plural}/{name}")

    def wait_gone(self, resource: str | ServedResource, name: str, namespace: str | None = None,
                  timeout: float = 10.0) -> None:
        """Poll until the object no longer exists."""
        res = self.resource(resource)
        _poll(lambda: self.call(self.server.get, res, _ns(res, namespace), name),
              lambda obj: obj is None, timeout, f"{res.plural}/{name} to be gone")

    def events(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Kubernetes Events posted so far (by kopf, the operator, the kubelet)."""
        return self.list("v1/events", namespace)


def _ns(res: ServedResource, namespace: str | None) -> str | None:
    return (namespace or "default") if res.namespaced else None


def _poll(fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float,
          what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}; last seen: "
                               f"{json.dumps(value, indent=1, default=str)[:3000]}")
        threading.Event().wait(0.05)
