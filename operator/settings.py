"""The operator's own configuration: what a cluster admin sets (through the Helm chart's
environment), as opposed to what a FederatedJob's author sets in the spec."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedkube.runtime.spec import ResourceRequirements

DEFAULT_IMAGE = "fedkube:0.1.0"
# An agent pod imports torch (~400 MiB) and trains one partition of a small model on the
# CPU; without requests the scheduler would pack any number of them on one node.
DEFAULT_AGENT_RESOURCES = ResourceRequirements(
    requests={"cpu": "250m", "memory": "512Mi"}, limits={"memory": "2Gi"})


@dataclass(frozen=True)
class OperatorSettings:
    """Knobs of the operator. `from_env` reads them as FEDKUBE_* variables."""

    # Image of coordinator and agent pods when a job's spec.coordinator.image is unset.
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    # A ClientNode whose last heartbeat is older than this is marked Offline.
    offline_after_seconds: float = 30.0
    # How often job health (coordinator pod failing, children present) is checked.
    health_interval_seconds: float = 10.0
    # Port the coordinator serves Prometheus metrics on; 0 leaves metrics off.
    coordinator_metrics_port: int = 0
    # imagePullSecrets of coordinator and agent pods (names of Secrets in the job's namespace).
    image_pull_secrets: tuple[str, ...] = ()
    # Cluster-wide defaults for jobs whose spec.coordinator leaves these unset.
    default_tls_secret: str | None = None
    default_join_token_secret: str | None = None
    default_client_ca_secret: str | None = None  # mutual TLS (needs a TLS secret too)
    default_coordinator_resources: ResourceRequirements | None = None
    # Resources of agent pods (spec.simulation.clients) whose job sets none.
    default_agent_resources: ResourceRequirements = field(
        default_factory=lambda: DEFAULT_AGENT_RESOURCES.model_copy(deep=True))

    def __post_init__(self) -> None:
        if self.offline_after_seconds <= 0:
            raise ValueError(f"offline_after_seconds must be > 0, got {self.offline_after_seconds}")
        if self.health_interval_seconds <= 0:
            raise ValueError(
                f"health_interval_seconds must be > 0, got {self.health_interval_seconds}")
        if not 0 <= self.coordinator_metrics_port <= 65535:
            raise ValueError(f"coordinator_metrics_port out of range: {self.coordinator_metrics_port}")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise ValueError(f"image_pull_policy must be Always, IfNotPresent or Never, got "
                             f"{self.image_pull_policy!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        """Settings from the environment (as the Helm chart sets it); unset ones keep
        their defaults:

        FEDKUBE_IMAGE, FEDKUBE_IMAGE_PULL_POLICY, FEDKUBE_IMAGE_PULL_SECRETS (comma-separated),
        FEDKUBE_OFFLINE_AFTER_SECONDS, FEDKUBE_HEALTH_INTERVAL_SECONDS,
        FEDKUBE_COORDINATOR_METRICS_PORT, FEDKUBE_COORDINATOR_TLS_SECRET,
        FEDKUBE_COORDINATOR_JOIN_TOKEN_SECRET, FEDKUBE_COORDINATOR_CLIENT_CA_SECRET,
        FEDKUBE_COORDINATOR_RESOURCES (JSON),
        FEDKUBE_AGENT_RESOURCES (JSON)."""
        env = os.environ if environ is None else environ
        defaults = cls()
        agent_resources = _resources_from(env, "FEDKUBE_AGENT_RESOURCES")
        return cls(
            image=env.get("FEDKUBE_IMAGE") or defaults.image,
            image_pull_policy=env.get("FEDKUBE_IMAGE_PULL_POLICY") or defaults.image_pull_policy,
            offline_after_seconds=float(
                env.get("FEDKUBE_OFFLINE_AFTER_SECONDS") or defaults.offline_after_seconds),
            health_interval_seconds=float(
                env.get("FEDKUBE_HEALTH_INTERVAL_SECONDS") or defaults.health_interval_seconds),
            coordinator_metrics_port=int(
                env.get("FEDKUBE_COORDINATOR_METRICS_PORT") or defaults.coordinator_metrics_port),
            image_pull_secrets=tuple(
                name.strip() for name in env.get("FEDKUBE_IMAGE_PULL_SECRETS", "").split(",")
                if name.strip()),
            default_tls_secret=env.get("FEDKUBE_COORDINATOR_TLS_SECRET") or None,
            default_join_token_secret=env.get("FEDKUBE_COORDINATOR_JOIN_TOKEN_SECRET") or None,
            default_client_ca_secret=env.get("FEDKUBE_COORDINATOR_CLIENT_CA_SECRET") or None,
            default_coordinator_resources=_resources_from(env, "FEDKUBE_COORDINATOR_RESOURCES"),
            default_agent_resources=agent_resources or defaults.default_agent_resources,
        )


def _resources_from(env: Mapping[str, str], variable: str) -> ResourceRequirements | None:
    """The ResourceRequirements a variable holds as JSON, None when unset or empty."""
    value: Any = env.get(variable)
    if not value:
        return None
    try:
        return ResourceRequirements.model_validate(json.loads(value))
    except ValueError as error:  # JSON or validation: name the variable
        raise ValueError(f"{variable}: {error}") from None
