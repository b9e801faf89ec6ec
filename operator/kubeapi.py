"""The few Kubernetes API calls the handlers make, on plain dicts.

The builders in resources.py return manifests as dicts; this module sends them as JSON
through the `kubernetes` client's transport (auth, TLS, kubeconfig) without converting
them into the client's model classes. Paths follow from apiVersion and kind, as the API
server's own REST mapping does for the kinds we create.
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


def connect() -> ApiClient:
    """A client configured from the pod's service account, or else from KUBECONFIG."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return ApiClient()


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    """`/api/v1/namespaces/ns/configmaps`, `/apis/apps/v1/namespaces/ns/deployments`, ...

    Every kind fedkube creates pluralises by a trailing "s" (lowercased), which is what
    the API server's default REST mapping does for them."""
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{root}/namespaces/{namespace}/{kind.lower()}s"


def object_path(api_version: str, kind: str, namespace: str, name: str) -> str:
    return f"{collection_path(api_version, kind, namespace)}/{name}"


def request(
    api: ApiClient,
    method: str,
    path: str,
    *,
    body: Mapping[str, Any] | None = None,
    query: list[tuple[str, str]] | None = None,
    content_type: str = JSON,
) -> Obj:
    """One API call; the decoded JSON reply. Non-2xx replies raise the client's
    ApiException subclasses (NotFoundException, ConflictException, ...)."""
    headers = {"Accept": JSON}
    if body is not None:
        headers["Content-Type"] = content_type
    method, url, headers, payload, _ = api.param_serialize(
        method=method, resource_path=path, query_params=query or [], header_params=headers,
        body=dict(body) if body is not None else None, auth_settings=["BearerToken"],
    )
    response = api.call_api(method, url, header_params=headers, body=payload,
                            _request_timeout=30)
    data = response.read()
    if not 200 <= response.status <= 299:
        ApiException.from_response(http_resp=response, body=data.decode("utf-8", "replace"),
                                   data=None)
    return json.loads(data) if data else {}


def create(api: ApiClient, obj: Mapping[str, Any]) -> bool:
    """Create `obj`; True if created, False if it already existed (idempotent retries)."""
    meta = obj["metadata"]
    try:
        request(api, "POST", collection_path(obj["apiVersion"], obj["kind"], meta["namespace"]),
                body=obj)
    except ApiException as error:
        if error.status == 409:
            return False
        raise
    return True


def get(api: ApiClient, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
    """The object, or None when it does not exist."""
    try:
        return request(api, "GET", object_path(api_version, kind, namespace, name))
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def merge_patch(
    api: ApiClient, api_version: str, kind: str, namespace: str, name: str,
    patch: Mapping[str, Any],
) -> Obj:
    return request(api, "PATCH", object_path(api_version, kind, namespace, name), body=patch,
                   content_type=MERGE_PATCH)


def delete(api: ApiClient, api_version: str, kind: str, namespace: str, name: str) -> bool:
    """Delete with background propagation (a Deployment's ReplicaSets and pods follow);
    True if it was there."""
    try:
        request(api, "DELETE", object_path(api_version, kind, namespace, name),
                body={"kind": "DeleteOptions", "apiVersion": "v1",
                      "propagationPolicy": "Background"})
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def list_objects(
    api: ApiClient, api_version: str, kind: str, namespace: str, selector: Mapping[str, str],
) -> list[Obj]:
    """Objects of `kind` in `namespace` whose labels match all of `selector`.

    The selector goes to the server and is checked again here: an API server that
    ignores labelSelector (as bare emulators do) must not widen what the caller acts on."""
    query = [("labelSelector", ",".join(f"{k}={v}" for k, v in selector.items()))]
    items = request(api, "GET", collection_path(api_version, kind, namespace),
                    query=query).get("items", [])
    return [
        item for item in items
        if selector.items() <= (item.get("metadata", {}).get("labels") or {}).items()
    ]
