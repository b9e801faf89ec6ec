"""Who asked the test API server for what, and whether Kubernetes RBAC would have let them.

The emulator enforces no RBAC, so a rule missing from the chart's ClusterRole or from the
Role the operator gives each job's coordinator would only fail on a real cluster. This
records every request as an :class:`Access` (user, verb, API group, resource, subresource,
namespace, name) when it arrives and decides it as kube-apiserver's RBAC authorizer would,
from the Roles, ClusterRoles and their bindings stored at that moment, plus grants a test
states itself (the operator run as a plain process has no binding in the store: it is
granted the chart's rendered ClusterRole).

Identities are bearer tokens, as service account tokens are on a real cluster:
:func:`service_account_token` names a service account (the local kubelet hands each pod
one for its ``serviceAccountName``, none when ``automountServiceAccountToken`` is false);
:data:`ADMIN_TOKEN` (the test's own kubeconfig: kubectl, helm, the test's clients) and
:data:`KUBELET_TOKEN` are unrestricted, as cluster-admin and the node are; so are kubectl
and helm, which send no token over plain HTTP (client-go will not) and are known by their
User-Agent; any other client without a token is ``system:anonymous``, granted nothing. Discovery and other non-resource
URLs (``/api``, ``/version``, ``/openapi``) are not recorded: every authenticated user may
read them on a real cluster (``system:discovery``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import kmock

if TYPE_CHECKING:
    from .apiserver import ApiServer

ADMIN_TOKEN = "emulator-token"
KUBELET_TOKEN = "local-kubelet-token"
ADMIN_USER = "kubernetes-admin"
KUBELET_USER = "system:node:local"
ANONYMOUS = "system:anonymous"
_SERVICE_ACCOUNT = "serviceaccount:"
_RBAC = "rbac.authorization.k8s.io"

Rule = Mapping[str, Any]


def service_account_token(namespace: str, name: str) -> str:
    return f"{_SERVICE_ACCOUNT}{namespace}:{name}"


def service_account_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


# Go clients (client-go) send no bearer token over plain HTTP, so the admin's own CLIs
# arrive without one; they are known by their User-Agent instead.
ADMIN_CLIENTS = ("kubectl/", "Helm/")


def user_of(token: str | None, user_agent: str = "") -> str:
    if not token:
        return ADMIN_USER if user_agent.startswith(ADMIN_CLIENTS) else ANONYMOUS
    if token == ADMIN_TOKEN:
        return ADMIN_USER
    if token == KUBELET_TOKEN:
        return KUBELET_USER
    if token.startswith(_SERVICE_ACCOUNT):
        namespace, _, name = token.removeprefix(_SERVICE_ACCOUNT).partition(":")
        return service_account_user(namespace, name)
    return f"token:{token}"


@dataclasses.dataclass(frozen=True)
class Access:
    """One request as RBAC sees it."""

    user: str
    verb: str
    group: str
    resource: str
    subresource: str | None = None
    namespace: str | None = None
    name: str | None = None

    @property
    def rule_resource(self) -> str:
        """The resource as RBAC rules name it: ``pods``, ``federatedjobs/status``."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    def __str__(self) -> str:
        where = f" in {self.namespace}" if self.namespace else " (cluster-wide)"
        named = f" {self.name!r}" if self.name else ""
        return (f"{self.user}: {self.verb} {self.group or 'core'}/{self.rule_resource}"
                f"{named}{where}")


def _verb(method: str, named: bool, params: Mapping[str, str]) -> str:
    if method == "GET":
        if params.get("watch") in ("true", "1"):
            return "watch"
        return "get" if named else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if named else "deletecollection"}.get(method, method.lower())


def _header(headers: Mapping[str, str], name: str) -> str:
    return next((value for key, value in headers.items() if key.lower() == name), "")


def _token(headers: Mapping[str, str]) -> str | None:
    value = _header(headers, "authorization")
    return value.removeprefix("Bearer ").strip() if value.startswith("Bearer ") else None


def access_of(request: kmock.Request) -> Access | None:
    """The Access a request asks for; None for discovery and other non-resource URLs."""
    resource = request.resource
    if resource is None or not resource.plural or resource.version is None:
        return None
    named = request.name is not None
    method = str(request.method.value if hasattr(request.method, "value") else request.method)
    return Access(user=user_of(_token(request.headers), _header(request.headers, "user-agent")),
                  verb=_verb(method.upper(), named, request.params),
                  group=resource.group or "", resource=resource.plural,
                  subresource=request.subresource, namespace=request.namespace,
                  name=request.name)


# ------------------------------------------------------------------------ rules


def rule_allows(rule: Rule, access: Access) -> bool:
    """Whether one PolicyRule covers the access (wildcards and resourceNames as RBAC has
    them; a rule with resourceNames never covers list, watch, create or deletecollection)."""
    groups, resources, verbs = (rule.get(k) or [] for k in ("apiGroups", "resources", "verbs"))
    if "*" not in verbs and access.verb not in verbs:
        return False
    if "*" not in groups and access.group not in groups:
        return False
    wanted = access.rule_resource
    sub_wildcard = f"*/{access.subresource}" if access.subresource else None
    if "*" not in resources and wanted not in resources and sub_wildcard not in resources:
        return False
    names = rule.get("resourceNames") or []
    return not names or access.name in names


def rules_allow(rules: Iterable[Rule], access: Access) -> bool:
    return any(rule_allows(rule, access) for rule in rules)


def _subject_matches(subject: Mapping[str, Any], user: str, binding_namespace: str | None,
                     ) -> bool:
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return user == service_account_user(str(namespace), str(name))
    if kind == "User":
        return user == name
    if kind == "Group":
        if user == ANONYMOUS:
            return name == "system:unauthenticated"
        if name == "system:authenticated":
            return True
        if user.startswith("system:serviceaccount:"):
            namespace = user.split(":")[2]
            return name in ("system:serviceaccounts", f"system:serviceaccounts:{namespace}")
    return False


def stored_rules(server: ApiServer, access: Access) -> list[Rule]:
    """The rules the stored bindings give ``access.user`` where ``access`` acts:
    ClusterRoleBindings everywhere, RoleBindings of ``access.namespace`` only there."""

    def stored(plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        key = kmock.resource(_RBAC, "v1", plural)
        return server.list(server.served[key], namespace) if key in server.served else []

    def role_rules(ref: Mapping[str, Any], namespace: str | None) -> list[Rule]:
        if ref.get("kind") == "ClusterRole":
            roles = [r for r in stored("clusterroles") if r["metadata"]["name"] == ref.get("name")]
        else:
            roles = [r for r in stored("roles", namespace)
                     if r["metadata"]["name"] == ref.get("name")]
        return [rule for role in roles for rule in role.get("rules") or []]

    rules: list[Rule] = []
    for binding in stored("clusterrolebindings"):
        if any(_subject_matches(s, access.user, None) for s in binding.get("subjects") or []):
            rules += role_rules(binding.get("roleRef") or {}, None)
    if access.namespace:
        for binding in stored("rolebindings", access.namespace):
            if any(_subject_matches(s, access.user, access.namespace)
                   for s in binding.get("subjects") or []):
                rules += role_rules(binding.get("roleRef") or {}, access.namespace)
    return rules


# ------------------------------------------------------------------- the audit


@dataclasses.dataclass(frozen=True)
class Decision:
    access: Access
    allowed: bool


def is_service_account(user: str) -> bool:
    return user.startswith("system:serviceaccount:")


class RequestAudit:
    """An observer of :class:`~k8s.apiserver.ApiServer` requests (``server.observers``):
    records each one with the decision RBAC would make at that moment.

    ``grants`` gives users rules of their own, on top of what the store binds to them
    (e.g. the operator process: the chart's ClusterRole). :data:`ADMIN_USER` and
    :data:`KUBELET_USER` are not restricted. :meth:`denied` reports the users ``judged``
    selects, by default service accounts: what fedkube runs in a cluster (operator and
    coordinators) runs as one, while a test's own raw HTTP calls carry no token at all.
    """

    UNRESTRICTED = frozenset({ADMIN_USER, KUBELET_USER})

    def __init__(self, server: ApiServer, grants: Mapping[str, Sequence[Rule]] | None = None,
                 *, judged: Callable[[str], bool] = is_service_account) -> None:
        self.server = server
        self.grants = {user: list(rules) for user, rules in (grants or {}).items()}
        self.judged = judged
        self.decisions: list[Decision] = []
        # The last rules seen bound to each (user, namespace): a job's deletion collects its
        # coordinator's Role while the pod is still stopping, and a last Event refused then
        # is a race a real cluster has too, not a missing rule.
        self._last_rules: dict[tuple[str, str | None], list[Rule]] = {}

    def __call__(self, request: kmock.Request) -> None:
        access = access_of(request)
        if access is None:
            return
        key = (access.user, access.namespace)
        bound = stored_rules(self.server, access) or self._last_rules.get(key, [])
        if bound:
            self._last_rules[key] = bound
        allowed = access.user in self.UNRESTRICTED or rules_allow(
            [*self.grants.get(access.user, []), *bound], access)
        self.decisions.append(Decision(access, allowed))

    def denied(self) -> list[Access]:
        """Each distinct access that RBAC would have refused, in order of first sight."""
        return list(dict.fromkeys(d.access for d in self.decisions
                                  if not d.allowed and self.judged(d.access.user)))

    def by(self, user: str) -> list[Access]:
        return [d.access for d in self.decisions if d.access.user == user]

    def report(self) -> str:
        denied = self.denied()
        if not denied:
            return "every request was allowed"
        lines = [f"  {access}" for access in denied]
        return (f"{len(denied)} request(s) that RBAC would refuse on a real cluster (add "
                "the rule to operator/rbac/operator-role.yaml and sync the chart, or to "
                "operator/resources.py's coordinator_rules):\n" + "\n".join(lines))
