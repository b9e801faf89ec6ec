"""The operator's share of a FederatedJob's status, edited by pure functions.

Each function edits a share in wire form (camelCase dict, as `JobStatusWriter.update`
hands it over) in place; the handlers apply the result by server-side apply under the
field manager fedkube-operator. What the operator owns is `spec.STATUS_FIELD_OWNERS` /
`spec.CONDITION_OWNERS`: endpoint, observedGeneration, startTime, targetEpsilon and the conditions
SpecAccepted, Insecure, SpecChangeRefused, Ready and Degraded. Two functions build the
coordinator's share for the times no coordinator runs (see the tables' comment).
"""

from __future__ import annotations

from typing import Any

from fedkube.runtime.kube.status import condition, set_condition
from fedkube.runtime.spec import ConditionType, Phase, Reason, terminal_conditions

from .resources import CoordinatorHealth

Share = dict[str, Any]
INSECURE_MESSAGE = ("neither spec.coordinator.tlsSecret nor joinTokenSecret is set: any pod "
                    "that reaches the Service can join, read the model and send updates, and "
                    "traffic is unencrypted; session credentials still keep a joined node "
                    "from being impersonated")


def accept(share: Share, *, endpoint: str, generation: int | None, insecure: bool,
           target_epsilon: float | None, now: str) -> None:
    """The spec validated and the coordinator was created."""
    share["endpoint"] = endpoint
    if target_epsilon is not None:
        share["targetEpsilon"] = target_epsilon
    if generation is not None:
        share["observedGeneration"] = generation
    share.setdefault("startTime", now)
    set_condition(share, type=ConditionType.SPEC_ACCEPTED, status="True", reason=Reason.CREATED,
                  message="spec validated; coordinator created", now=now,
                  observed_generation=generation)
    if insecure:
        set_condition(share, type=ConditionType.INSECURE, status="True",
                      reason=Reason.NO_TLS_OR_TOKEN, message=INSECURE_MESSAGE, now=now)


def reject(share: Share, *, message: str, generation: int | None, now: str) -> None:
    """The spec is invalid: SpecAccepted=False names the field and the reason."""
    set_condition(share, type=ConditionType.SPEC_ACCEPTED, status="False",
                  reason=Reason.INVALID_SPEC, message=message, now=now,
                  observed_generation=generation)


def record_spec_change(share: Share, *, generation: int | None,
                       refusal: tuple[str, str] | None, now: str) -> bool:
    """An edit of the spec was handled: `refusal` (reason, message) if some of it was
    refused. True when that refusal is news (worth a Warning event)."""
    if generation is not None:
        share["observedGeneration"] = generation
    previous = condition(share, ConditionType.SPEC_CHANGE_REFUSED)
    if refusal is not None:
        reason, message = refusal
        set_condition(share, type=ConditionType.SPEC_CHANGE_REFUSED, status="True",
                      reason=reason, message=message, now=now, observed_generation=generation)
        return previous is None or (previous.get("status"), previous.get("reason"),
                                    previous.get("message")) != ("True", reason, message)
    if previous is not None:  # an earlier refusal no longer holds
        set_condition(share, type=ConditionType.SPEC_CHANGE_REFUSED, status="False",
                      reason=Reason.SPEC_CHANGE_APPLIED,
                      message="the job runs its spec as written", now=now,
                      observed_generation=generation)
    return False


def record_health(share: Share, health: CoordinatorHealth, now: str) -> str | None:
    """Ready while a coordinator pod serves; Degraded while it fails, cleared on recovery.
    Returns "failed" or "recovered" when Degraded flips (worth an event), else None.
    Only a change of Ready's value is news, not a different message."""
    ready = "True" if health.ready else "False"
    current = condition(share, ConditionType.READY)
    if current is None or current.get("status") != ready:
        set_condition(share, type=ConditionType.READY, status=ready,
                      reason=Reason.COORDINATOR_READY if health.ready
                      else Reason.COORDINATOR_NOT_READY,
                      message="the coordinator serves gRPC" if health.ready
                      else health.failure or "the coordinator is starting", now=now)
    degraded = condition(share, ConditionType.DEGRADED)
    degraded_now = degraded is not None and degraded.get("status") == "True"
    if health.failure and not degraded_now:
        set_condition(share, type=ConditionType.DEGRADED, status="True",
                      reason=Reason.COORDINATOR_FAILED, message=health.failure, now=now)
        return "failed"
    if health.ready and degraded_now:
        set_condition(share, type=ConditionType.DEGRADED, status="False",
                      reason=Reason.COORDINATOR_READY, message="the coordinator recovered",
                      now=now)
        return "recovered"
    return None


def record_finished(share: Share, phase: str, now: str) -> None:
    """The job ended and its coordinator is removed: Ready=False."""
    set_condition(share, type=ConditionType.READY, status="False", reason=Reason.JOB_FINISHED,
                  message=f"the job {phase.lower()}; its coordinator was removed", now=now)


# ------------------------------------------ the coordinator's share, before it exists


def pending(share: Share) -> None:
    """An accepted job whose coordinator has not written yet is Pending."""
    share.setdefault("phase", Phase.pending.value)


def refused_end(share: Share, *, message: str, now: str) -> None:
    """A refused spec never gets a coordinator: its end, as the coordinator would write it."""
    if share.get("phase"):
        return
    share.update(phase=Phase.failed.value, message=message, completionTime=now)
    share["conditions"] = [c.to_wire() for c in terminal_conditions(
        Phase.failed, Reason.INVALID_SPEC, message, now)]
