"""The few Kubernetes API calls fedkube makes, on plain dicts.

Builders elsewhere return manifests as dicts; this client sends them as JSON through the
`kubernetes` package's transport (auth, TLS, kubeconfig) without converting them into
its model classes. Paths follow from apiVersion and kind, as the API server's own REST
mapping does for the kinds we touch. The coordinator (with its job's ServiceAccount) and
the operator both use it; kopf is not needed here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import kubernetes
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

Obj = dict[str, Any]

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"  # a JSON body is valid YAML


def connect() -> ApiClient:
    """A transport configured from the pod's service account, or else from KUBECONFIG."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return ApiClient()


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    """`/api/v1/namespaces/ns/configmaps`, `/apis/apps/v1/namespaces/ns/deployments`, ...

    Every kind fedkube touches pluralises by a trailing "s" (lowercased), which is what
    the API server's default REST mapping does for them."""
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{root}/namespaces/{namespace}/{kind.lower()}s"


def object_path(api_version: str, kind: str, namespace: str, name: str,
                subresource: str | None = None) -> str:
    path = f"{collection_path(api_version, kind, namespace)}/{name}"
    return f"{path}/{subresource}" if subresource else path


class KubeClient:
    """get, list, create, delete, merge patch and server-side apply of plain dicts.

    Non-2xx replies raise the `kubernetes` client's ApiException (its `status` is the
    HTTP code); `get` and `delete` turn 404 into None/False, `create` 409 into False."""

    def __init__(self, api: ApiClient | None = None, *, timeout_seconds: float = 30.0) -> None:
        self.api = api if api is not None else connect()
        self._timeout = timeout_seconds

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = JSON,
    ) -> Obj:
        """One API call; the decoded JSON reply."""
        headers = {"Accept": JSON}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, payload, _ = self.api.param_serialize(
            method=method, resource_path=path, query_params=query or [], header_params=headers,
            body=dict(body) if body is not None else None, auth_settings=["BearerToken"],
        )
        response = self.api.call_api(method, url, header_params=headers, body=payload,
                                     _request_timeout=self._timeout)
        data = response.read()
        if not 200 <= response.status <= 299:
            ApiException.from_response(http_resp=response,
                                       body=data.decode("utf-8", "replace"), data=None)
        return json.loads(data) if data else {}

    def get(self, api_version: str, kind: str, namespace: str, name: str,
            subresource: str | None = None) -> Obj | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", object_path(api_version, kind, namespace, name,
                                                   subresource))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str,
             selector: Mapping[str, str]) -> list[Obj]:
        """Objects of `kind` in `namespace` whose labels match all of `selector`.

        The selector goes to the server and is checked again here: an API server that
        ignores labelSelector must not widen what the caller acts on."""
        query = [("labelSelector", ",".join(f"{k}={v}" for k, v in selector.items()))]
        items = self.request("GET", collection_path(api_version, kind, namespace),
                             query=query).get("items", [])
        return [item for item in items
                if selector.items() <= (item.get("metadata", {}).get("labels") or {}).items()]

    def create(self, obj: Mapping[str, Any]) -> bool:
        """Create `obj`; True if created, False if it already existed (idempotent retries)."""
        meta = obj["metadata"]
        try:
            self.request("POST", collection_path(obj["apiVersion"], obj["kind"],
                                                 meta["namespace"]), body=obj)
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        return True

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete with background propagation (a Deployment's ReplicaSets and pods
        follow); True if it was there."""
        try:
            self.request("DELETE", object_path(api_version, kind, namespace, name),
                         body={"kind": "DeleteOptions", "apiVersion": "v1",
                               "propagationPolicy": "Background"})
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def merge_patch(self, api_version: str, kind: str, namespace: str, name: str,
                    patch: Mapping[str, Any], subresource: str | None = None) -> Obj:
        return self.request("PATCH", object_path(api_version, kind, namespace, name,
                                                 subresource),
                            body=patch, content_type=MERGE_PATCH)

    def apply(self, obj: Mapping[str, Any], *, field_manager: str, force: bool = False,
              subresource: str | None = None) -> Obj:
        """Server-side apply of `obj` (apiVersion, kind, metadata.name/namespace and the
        fields this manager owns, nothing else): the server merges it, records
        `field_manager` as the owner of those fields and removes fields this manager
        applied before but left out now. Without `force`, a field another manager owns
        with a different value is a 409 conflict; with it, ownership moves to us."""
        meta = obj["metadata"]
        query = [("fieldManager", field_manager)]
        if force:
            query.append(("force", "true"))
        return self.request(
            "PATCH", object_path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"],
                                 subresource),
            body=obj, query=query, content_type=APPLY_PATCH)
