"""Kopf handlers: a FederatedJob becomes a coordinator (and simulated agents); ClientNodes
that stop heartbeating go Offline; finished jobs are cleaned up.

Who writes what in a job's status: the coordinator (through its KubernetesStatusSink)
owns phase from Running on, round, accuracy, loss, epsilon, clients, bytes and its own
conditions (Converged, BudgetExhausted). This operator owns endpoint, startTime,
completionTime, targetEpsilon and the conditions SpecAccepted, Insecure, Ready,
Degraded and SpecChangeRefused; it sets phase only to Pending (accepted) or Failed
(invalid spec). Both upsert conditions by type, never replacing the other's.

Run with `fedkube operator` (or `kopf run -m fedkube.operator.handlers`).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from typing import Any, Literal

import kopf
import yaml
from fedkube.runtime.spec import (
    API_GROUP,
    TERMINAL_PHASES,
    ClientPhase,
    Condition,
    ConditionType,
    FederatedJobSpec,
    ManifestError,
    Phase,
    Reason,
    parse_job,
    parse_job_spec,
    upsert_condition,
)
from kubernetes.client import ApiClient

from . import kubeapi
from . import resources as res
from .metrics import OperatorMetrics
from .settings import OperatorSettings

JOBS = "federatedjobs"
NODES = "clientnodes"
# Read once: kopf registers timer intervals when this module is imported.
SETTINGS = OperatorSettings.from_env()
# A stale node is noticed within this long after crossing the threshold.
NODE_CHECK_INTERVAL = min(10.0, max(0.5, SETTINGS.offline_after_seconds / 3))
# The reason of a SpecChangeRefused=False condition, once the spec runs as written.
_TERMINAL = frozenset(p.value for p in TERMINAL_PHASES)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _api(memo: kopf.Memo) -> ApiClient:
    return memo["api"]


def _metrics(memo: kopf.Memo) -> OperatorMetrics:
    return memo["metrics"]


def _set_condition(
    status: Mapping[str, Any],
    patch: kopf.Patch,
    *,
    type: str,
    value: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    generation: int | None = None,
    when: Callable[[Condition | None], bool] | None = None,
) -> bool:
    """Upsert one condition; True if that changes the status this handler was given.

    The upsert is not a merge patch of the list (which would overwrite conditions that a
    timer, another handler or the coordinator wrote meanwhile): it goes into `patch.fns`,
    which kopf applies to the freshest object as a JSON patch guarded by resourceVersion,
    retrying on conflict. `when`, given the condition of that type as it is then (or
    None), can leave it alone: e.g. not taking over a condition another writer set."""
    now = _now()

    def upsert(conditions: list[Any]) -> list[Condition]:
        current = [Condition.model_validate(c) for c in conditions]
        existing = next((c for c in current if c.type == type), None)
        if when is not None and not when(existing):
            return current
        return upsert_condition(current, type=type, status=value, reason=reason,
                                message=message, now=now, observed_generation=generation)

    def apply(body: dict[str, Any]) -> None:
        target = body.setdefault("status", {})
        target["conditions"] = [c.to_wire() for c in upsert(target.get("conditions") or [])]

    patch.fns.append(apply)
    before = [Condition.model_validate(c) for c in status.get("conditions") or []]
    return upsert(list(status.get("conditions") or [])) != before


def _present(condition: Condition | None) -> bool:
    return condition is not None


def _condition(status: Mapping[str, Any], type: str) -> Mapping[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type), None)


def _validate(name: str, spec: Mapping[str, Any]) -> FederatedJobSpec:
    if len(name) > res.MAX_JOB_NAME:
        raise ManifestError(
            f"metadata.name: at most {res.MAX_JOB_NAME} characters (the coordinator Service "
            f"is named {name}-coordinator, a DNS label of at most 63)")
    return parse_job_spec(spec)


# ------------------------------------------------------------------------- startup


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # The CRD's structural schema prunes unknown status fields, so kopf's bookkeeping
    # lives in annotations, under our own prefix.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.posting.reporting_component = "fedkube-operator"
    memo.setdefault("metrics", OperatorMetrics())
    memo.setdefault("api", kubeapi.connect())


# ----------------------------------------------------------------- FederatedJob life


@kopf.on.resume(API_GROUP, JOBS)
@kopf.on.create(API_GROUP, JOBS)
def create_job(
    spec: kopf.Spec, name: str, namespace: str, meta: kopf.Meta, status: kopf.Status,
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any,
) -> None:
    """Validate the spec, then create the job's children (idempotently: a resumed or
    retried handler finds some of them already there)."""
    if status.get("phase") in _TERMINAL:
        return  # a finished job resumed after an operator restart: nothing to run
    with _metrics(memo).reconciliation("create_job"):
        generation = meta.get("generation")
        try:
            job_spec = res.with_operator_defaults(_validate(name, spec), SETTINGS)
        except ManifestError as error:
            message = str(error)
            patch.status["phase"] = Phase.failed.value
            patch.status["message"] = message
            _set_condition(status, patch, type=ConditionType.SPEC_ACCEPTED, value="False",
                           reason=Reason.INVALID_SPEC, message=message, generation=generation)
            kopf.warn(body, reason=Reason.INVALID_SPEC, message=message)
            raise kopf.PermanentError(f"invalid FederatedJob spec: {message}") from None

        job = res.JobRef(name=name, namespace=namespace)
        children = res.job_children(job, job_spec, SETTINGS)
        kopf.adopt(children, owner=body)
        api = _api(memo)
        created = [f"{c['kind']}/{c['metadata']['name']}" for c in children
                   if kubeapi.create(api, c)]
        logger.info(f"children created: {', '.join(created) or 'none (all existed)'}")

        if not status.get("phase"):
            patch.status["phase"] = Phase.pending.value
        patch.status["endpoint"] = res.coordinator_endpoint(job, job_spec)
        patch.status["observedGeneration"] = generation
        if not status.get("startTime"):
            patch.status["startTime"] = _now()
        if job_spec.privacy.target_epsilon is not None:
            patch.status["targetEpsilon"] = job_spec.privacy.target_epsilon
        _set_condition(status, patch, type=ConditionType.SPEC_ACCEPTED, value="True",
                       reason=Reason.CREATED, message="spec validated; coordinator created",
                       generation=generation)
        coordinator = job_spec.coordinator
        if not coordinator.tls_secret and not coordinator.join_token_secret:
            _set_condition(status, patch, type=ConditionType.INSECURE, value="True",
                           reason=Reason.NO_TLS_OR_TOKEN,
                           message="neither spec.coordinator.tlsSecret nor joinTokenSecret is "
                           "set: any pod that reaches the Service can join, read the model and "
                           "send updates, and traffic is unencrypted; session credentials "
                           "still keep a joined node from being impersonated")
        if created:
            kopf.info(body, reason=Reason.CREATED, message=f"created {', '.join(created)}")


@kopf.on.update(API_GROUP, JOBS, field="spec")
def update_job(
    new: Mapping[str, Any], name: str, namespace: str, meta: kopf.Meta, status: kopf.Status,
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any,
) -> None:
    """Apply changes to rounds/clientsPerRound to the running job (its ConfigMap, which the
    coordinator re-reads); refuse the rest with a SpecChangeRefused condition."""
    if status.get("phase") in _TERMINAL:
        return
    with _metrics(memo).reconciliation("update_job"):
        generation = meta.get("generation")
        api = _api(memo)
        config_map = kubeapi.get(api, "v1", "ConfigMap", namespace, res.spec_config_map_name(name))
        if config_map is None:
            raise kopf.TemporaryError("the job's ConfigMap is not there yet", delay=10)
        running = parse_job(yaml.safe_load(config_map["data"][res.SPEC_KEY])).spec

        def refuse(reason: str, message: str) -> None:
            if _set_condition(status, patch, type=ConditionType.SPEC_CHANGE_REFUSED,
                              value="True", reason=reason, message=message,
                              generation=generation):
                kopf.warn(body, reason=reason, message=message)

        try:
            # The running spec carries the operator's defaults; compare like with like.
            requested = res.with_operator_defaults(parse_job_spec(new), SETTINGS)
            refused = res.immutable_changes(running, requested)
            effective = res.with_mutable_fields(running, requested)
        except ManifestError as error:
            refuse(Reason.INVALID_SPEC, f"the edited spec is invalid and was not applied: {error}")
            return

        if effective != running:
            job = res.JobRef(name=name, namespace=namespace)
            kubeapi.merge_patch(api, "v1", "ConfigMap", namespace, res.spec_config_map_name(name),
                                {"data": res.spec_config_map(job, effective)["data"]})
            applied = ", ".join(
                f"{field}={effective.model_dump(by_alias=True)[field]}"
                for field in sorted(res.MUTABLE_FIELDS))
            logger.info(f"applied to the running job: {applied}")
            kopf.info(body, reason=Reason.SPEC_CHANGE_APPLIED, message=f"now running with {applied}")
        patch.status["observedGeneration"] = generation
        if refused:
            refuse(Reason.IMMUTABLE_FIELD,
                   f"{', '.join(refused)} cannot change while the job runs (only "
                   f"{', '.join(f'spec.{f}' for f in sorted(res.MUTABLE_FIELDS))} can); "
                   "delete and re-create the job to change them")
        else:
            _set_condition(status, patch, type=ConditionType.SPEC_CHANGE_REFUSED, value="False",
                           reason=Reason.SPEC_CHANGE_APPLIED, message="the job runs its spec as written",
                           generation=generation, when=_present)


def _terminal(value: Any, **_: Any) -> bool:
    return value in _TERMINAL


@kopf.on.field(API_GROUP, JOBS, field="status.phase", new=_terminal)
def finish_job(
    new: str, spec: kopf.Spec, name: str, namespace: str, status: kopf.Status,
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any,
) -> None:
    """A finished job keeps its ConfigMap, ClientNodes and status.modelRef; what runs
    (coordinator, Service, agents) goes."""
    with _metrics(memo).reconciliation("finish_job"):
        if not status.get("completionTime"):
            patch.status["completionTime"] = _now()
        try:
            job_spec = parse_job_spec(spec)
        except ManifestError:
            return  # never accepted: nothing was created
        api = _api(memo)
        job = res.JobRef(name=name, namespace=namespace)
        removed = [f"{c['kind']}/{c['metadata']['name']}"
                   for c in res.running_children(job, job_spec, SETTINGS)
                   if kubeapi.delete(api, c["apiVersion"], c["kind"], namespace,
                                     c["metadata"]["name"])]
        logger.info(f"job {new}; removed {', '.join(removed) or 'nothing (already gone)'}")
        if removed:
            where = f"; model at {status['modelRef']}" if status.get("modelRef") else ""
            kopf.info(body, reason=new, message=f"job {new.lower()}; removed {len(removed)} "
                      f"running objects{where}")


def _coordinator_expected(status: kopf.Status, **_: Any) -> bool:
    accepted = _condition(status, ConditionType.SPEC_ACCEPTED)
    return (accepted is not None and accepted.get("status") == "True"
            and status.get("phase") not in _TERMINAL)


@kopf.timer(API_GROUP, JOBS, interval=SETTINGS.health_interval_seconds,
            initial_delay=SETTINGS.health_interval_seconds, when=_coordinator_expected)
def watch_coordinator(
    name: str, namespace: str, status: kopf.Status, body: kopf.Body, patch: kopf.Patch,
    memo: kopf.Memo, **_: Any,
) -> None:
    """Ready while a coordinator pod serves; Degraded while it fails, cleared on recovery."""
    api = _api(memo)
    job = res.JobRef(name=name, namespace=namespace)
    deployment = kubeapi.get(api, "apps/v1", "Deployment", namespace, res.coordinator_name(name))
    pods = kubeapi.list_objects(api, "v1", "Pod", namespace,
                                res.selector_labels(job, res.COORDINATOR))
    health = res.coordinator_health(deployment, pods)
    ready: Literal["True", "False"] = "True" if health.ready else "False"
    # The coordinator writes Ready too (with its own words, and False once finished):
    # only a change of the value is news here, not a different message.
    _set_condition(status, patch, type=ConditionType.READY, value=ready,
                   reason=Reason.COORDINATOR_READY if health.ready else Reason.COORDINATOR_NOT_READY,
                   message="the coordinator serves gRPC" if health.ready
                   else health.failure or "the coordinator is starting",
                   when=lambda c: c is None or c.status != ready)
    if health.failure:
        if _set_condition(status, patch, type=ConditionType.DEGRADED, value="True",
                          reason=Reason.COORDINATOR_FAILED, message=health.failure,
                          when=lambda c: c is None or c.status != "True"):
            kopf.warn(body, reason=Reason.COORDINATOR_FAILED, message=health.failure)
    elif health.ready and _set_condition(
            status, patch, type=ConditionType.DEGRADED, value="False",
            reason=Reason.COORDINATOR_READY, message="the coordinator recovered",
            # Only this operator's verdict is cleared; the coordinator's (too few clients) stays.
            when=lambda c: c is not None and c.status == "True"
            and c.reason == Reason.COORDINATOR_FAILED):
        kopf.info(body, reason=Reason.COORDINATOR_READY, message="the coordinator recovered")


@kopf.on.event(API_GROUP, JOBS)
def count_job(type: str, name: str, namespace: str, status: kopf.Status, memo: kopf.Memo,
              **_: Any) -> None:
    if "metrics" in memo:
        phase = None if type == "DELETED" else status.get("phase") or Phase.pending.value
        _metrics(memo).job_phase(namespace, name, phase)


# ------------------------------------------------------------------------ ClientNode


def _seconds_since(timestamp: str) -> float:
    then = datetime.datetime.fromisoformat(timestamp)
    if then.tzinfo is None:
        then = then.replace(tzinfo=datetime.UTC)
    return (datetime.datetime.now(datetime.UTC) - then).total_seconds()


def _online(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") != ClientPhase.offline.value


@kopf.timer(API_GROUP, NODES, interval=NODE_CHECK_INTERVAL, when=_online)
def mark_offline(
    status: kopf.Status, meta: kopf.Meta, body: kopf.Body, patch: kopf.Patch, **_: Any,
) -> None:
    """A node whose last heartbeat (or, never having sent one, whose creation) is older
    than the threshold is Offline until the coordinator hears from it again."""
    last_seen = status.get("lastHeartbeat") or meta.get("creationTimestamp")
    if not last_seen:
        return
    silent = _seconds_since(last_seen)
    if silent > SETTINGS.offline_after_seconds:
        patch.status["phase"] = ClientPhase.offline.value
        kopf.info(body, reason=ClientPhase.offline.value,
                  message=f"no heartbeat for {silent:.0f}s (threshold "
                  f"{SETTINGS.offline_after_seconds:g}s)")


@kopf.on.event(API_GROUP, NODES)
def count_node(type: str, name: str, namespace: str, status: kopf.Status, memo: kopf.Memo,
               **_: Any) -> None:
    if "metrics" in memo:
        phase = None if type == "DELETED" else status.get("phase") or ClientPhase.ready.value
        _metrics(memo).client_phase(namespace, name, phase)
