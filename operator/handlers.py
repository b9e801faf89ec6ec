"""Kopf handlers: a FederatedJob becomes a coordinator (and simulated agents); ClientNodes
that stop heartbeating go Offline; finished jobs are cleaned up.

Who writes what in a job's status is `spec.STATUS_FIELD_OWNERS` / `spec.CONDITION_OWNERS`:
this operator owns endpoint, observedGeneration, startTime, targetEpsilon and the
conditions SpecAccepted, Insecure, SpecChangeRefused, Ready and Degraded; the coordinator
owns the rest (phase, progress, completionTime and Converged, BudgetExhausted, Complete, Failed).
The handlers write the operator's share by server-side apply under the field manager
fedkube-operator (`runtime.kube.status.JobStatusWriter`; the edits are the pure
functions of `job_status`), never through kopf's `patch`, so the two writers cannot
overwrite each other. Before a coordinator exists the operator writes the coordinator's
share in its name: `phase: Pending`, or for a refused spec its whole end. kopf's own
bookkeeping stays in annotations.

Run with `fedkube operator` (or `kopf run -m fedkube.operator.handlers`).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from typing import Any

import kopf
import yaml
from fedkube.runtime.kube.client import KubeClient
from fedkube.runtime.kube.status import JobStatusWriter, condition
from fedkube.runtime.spec import (
    API_GROUP,
    TERMINAL_PHASES,
    ClientPhase,
    ConditionType,
    FederatedJobSpec,
    ManifestError,
    Phase,
    Reason,
    Writer,
    parse_job,
    parse_job_spec,
)

from . import job_status
from . import resources as res
from .metrics import OperatorMetrics
from .settings import OperatorSettings

JOBS = "federatedjobs"
NODES = "clientnodes"
# Read once: kopf registers timer intervals when this module is imported.
SETTINGS = OperatorSettings.from_env()
# A stale node is noticed within this long after crossing the threshold.
NODE_CHECK_INTERVAL = min(10.0, max(0.5, SETTINGS.offline_after_seconds / 3))
_TERMINAL = frozenset(p.value for p in TERMINAL_PHASES)
Share = dict[str, Any]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _kube(memo: kopf.Memo) -> KubeClient:
    return memo["kube"]


def _metrics(memo: kopf.Memo) -> OperatorMetrics:
    return memo["metrics"]


def _write(memo: kopf.Memo, namespace: str, name: str, change: Callable[[Share], Any], *,
           writer: Writer = Writer.operator) -> Any:
    """Apply `change` to `writer`'s share of the job's status; what `change` returned."""
    result: list[Any] = [None]

    def edit(share: Share) -> None:
        result[0] = change(share)

    JobStatusWriter(_kube(memo), writer).update(namespace, name, edit)
    return result[0]


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
    memo.setdefault("kube", KubeClient())


# ----------------------------------------------------------------- FederatedJob life


@kopf.on.resume(API_GROUP, JOBS)
@kopf.on.create(API_GROUP, JOBS)
def create_job(
    spec: kopf.Spec, name: str, namespace: str, meta: kopf.Meta, status: kopf.Status,
    body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any,
) -> None:
    """Validate the spec, then create the job's children (idempotently: a resumed or
    retried handler finds some of them already there)."""
    if status.get("phase") in _TERMINAL:
        return  # a finished job resumed after an operator restart: nothing to run
    with _metrics(memo).reconciliation("create_job"):
        generation, now = meta.get("generation"), _now()
        try:
            job_spec = res.with_operator_defaults(_validate(name, spec), SETTINGS)
        except ManifestError as error:
            _refuse_job(memo, body, namespace, name, str(error), generation, now)
            raise kopf.PermanentError(f"invalid FederatedJob spec: {error}") from None
        job = res.JobRef(name=name, namespace=namespace)
        children = res.job_children(job, job_spec, SETTINGS)
        kopf.adopt(children, owner=body)
        created = [f"{c['kind']}/{c['metadata']['name']}" for c in children
                   if _kube(memo).create(c)]
        logger.info(f"children created: {', '.join(created) or 'none (all existed)'}")
        coordinator = job_spec.coordinator
        # The operator's own share last: SpecAccepted=True means the rest is written too.
        _write(memo, namespace, name, job_status.pending, writer=Writer.coordinator)
        _write(memo, namespace, name, lambda share: job_status.accept(
            share, endpoint=res.coordinator_endpoint(job, job_spec), generation=generation,
            coordinator=coordinator,
            target_epsilon=job_spec.privacy.target_epsilon, now=now))
        if created:
            kopf.info(body, reason=Reason.CREATED, message=f"created {', '.join(created)}")


def _refuse_job(memo: kopf.Memo, body: kopf.Body, namespace: str, name: str, message: str,
                generation: int | None, now: str) -> None:
    _write(memo, namespace, name, lambda share: job_status.refused_end(
        share, message=message, now=now), writer=Writer.coordinator)
    _write(memo, namespace, name, lambda share: job_status.reject(
        share, message=message, generation=generation, now=now))
    kopf.warn(body, reason=Reason.INVALID_SPEC, message=message)


@kopf.on.update(API_GROUP, JOBS, field="spec")
def update_job(
    new: Mapping[str, Any], name: str, namespace: str, meta: kopf.Meta, status: kopf.Status,
    body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any,
) -> None:
    """Apply changes to rounds/clientsPerRound to the running job (its ConfigMap, which the
    coordinator re-reads); refuse the rest with a SpecChangeRefused condition."""
    if status.get("phase") in _TERMINAL:
        return
    with _metrics(memo).reconciliation("update_job"):
        generation = meta.get("generation")
        refusal = _apply_spec_edit(_kube(memo), name, namespace, new, body, logger)
        if _write(memo, namespace, name, lambda share: job_status.record_spec_change(
                share, generation=generation, refusal=refusal, now=_now())):
            assert refusal is not None
            kopf.warn(body, reason=refusal[0], message=refusal[1])


def _apply_spec_edit(kube: KubeClient, name: str, namespace: str, new: Mapping[str, Any],
                     body: kopf.Body, logger: kopf.Logger) -> tuple[str, str] | None:
    """Write the mutable part of an edited spec into the job's ConfigMap; the refusal
    (reason, message) of what could not be applied, if any."""
    config_map = kube.get("v1", "ConfigMap", namespace, res.spec_config_map_name(name))
    if config_map is None:
        raise kopf.TemporaryError("the job's ConfigMap is not there yet", delay=10)
    running = parse_job(yaml.safe_load(config_map["data"][res.SPEC_KEY])).spec
    try:
        # The running spec carries the operator's defaults; compare like with like.
        requested = res.with_operator_defaults(parse_job_spec(new), SETTINGS)
        refused = res.immutable_changes(running, requested)
        effective = res.with_mutable_fields(running, requested)
    except ManifestError as error:
        return Reason.INVALID_SPEC, f"the edited spec is invalid and was not applied: {error}"
    if effective != running:
        job = res.JobRef(name=name, namespace=namespace)
        kube.merge_patch("v1", "ConfigMap", namespace, res.spec_config_map_name(name),
                         {"data": res.spec_config_map(job, effective)["data"]})
        applied = ", ".join(f"{field}={effective.model_dump(by_alias=True)[field]}"
                            for field in sorted(res.MUTABLE_FIELDS))
        logger.info(f"applied to the running job: {applied}")
        kopf.info(body, reason=Reason.SPEC_CHANGE_APPLIED, message=f"now running with {applied}")
    if not refused:
        return None
    return Reason.IMMUTABLE_FIELD, (
        f"{', '.join(refused)} cannot change while the job runs (only "
        f"{', '.join(f'spec.{f}' for f in sorted(res.MUTABLE_FIELDS))} can); "
        "delete and re-create the job to change them")


def _terminal(value: Any, **_: Any) -> bool:
    return value in _TERMINAL


@kopf.on.field(API_GROUP, JOBS, field="status.phase", new=_terminal)
def finish_job(
    new: str, spec: kopf.Spec, name: str, namespace: str, status: kopf.Status,
    body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any,
) -> None:
    """A finished job keeps its ConfigMap, ClientNodes and status.modelRef; what runs
    (coordinator, Service, agents) goes."""
    with _metrics(memo).reconciliation("finish_job"):
        try:
            job_spec = parse_job_spec(spec)
        except ManifestError:
            return  # never accepted: nothing was created
        job = res.JobRef(name=name, namespace=namespace)
        removed = [f"{c['kind']}/{c['metadata']['name']}"
                   for c in res.running_children(job, job_spec, SETTINGS)
                   if _kube(memo).delete(c["apiVersion"], c["kind"], namespace,
                                         c["metadata"]["name"])]
        _write(memo, namespace, name, lambda share: job_status.record_finished(
            share, new, _now()))
        logger.info(f"job {new}; removed {', '.join(removed) or 'nothing (already gone)'}")
        if removed:
            where = f"; model at {status['modelRef']}" if status.get("modelRef") else ""
            kopf.info(body, reason=new, message=f"job {new.lower()}; removed {len(removed)} "
                      f"running objects{where}")


def _coordinator_expected(status: kopf.Status, **_: Any) -> bool:
    accepted = condition(status, ConditionType.SPEC_ACCEPTED)
    return (accepted is not None and accepted.get("status") == "True"
            and status.get("phase") not in _TERMINAL)


@kopf.timer(API_GROUP, JOBS, interval=SETTINGS.health_interval_seconds,
            initial_delay=SETTINGS.health_interval_seconds, when=_coordinator_expected)
def watch_coordinator(name: str, namespace: str, body: kopf.Body, memo: kopf.Memo,
                      **_: Any) -> None:
    """Ready while a coordinator pod serves; Degraded while it fails, cleared on recovery."""
    kube, job = _kube(memo), res.JobRef(name=name, namespace=namespace)
    health = res.coordinator_health(
        kube.get("apps/v1", "Deployment", namespace, res.coordinator_name(name)),
        kube.list("v1", "Pod", namespace, res.selector_labels(job, res.COORDINATOR)))
    news = _write(memo, namespace, name,
                  lambda share: job_status.record_health(share, health, _now()))
    if news == "failed":
        kopf.warn(body, reason=Reason.COORDINATOR_FAILED, message=health.failure or "")
    elif news == "recovered":
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
