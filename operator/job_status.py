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
from fedkube.runtime.spec import (
    ConditionType,
    CoordinatorSpec,
    Phase,
    Reason,
    terminal_conditions,
)

from .resources import CoordinatorHealth

Share = dict[str, Any]
# Every configuration keeps these; the messages below say what each adds or lacks.
_ALWAYS = ("Always: a joined node's id is no use to a caller without that node's session "
           "credential, and updates pass the admission bounds.")


def protection(coordinator: CoordinatorSpec) -> tuple[bool, str, str]:
    """The Insecure condition for a coordinator's TLS, join token and client CA:
    (insecure, reason, message saying exactly what is and is not protected)."""
    tls, token, client_ca = (bool(coordinator.tls_secret), bool(coordinator.join_token_secret),
                             bool(coordinator.client_ca_secret))
    if tls and client_ca:
        return False, Reason.MUTUAL_TLS, (
            "Mutual TLS (spec.coordinator.tlsSecret, clientCaSecret"
            + (", joinTokenSecret" if token else "") + "): traffic is encrypted, agents "
            "verify the coordinator, and each node id is bound to its client certificate's "
            "subject CN: no caller can register or act as a node without that node's "
            "certificate and key. Not protected: a holder of any certificate from the client "
            "CA joins under that certificate's id; the coordinator sees every update. "
            + _ALWAYS)
    if tls and token:
        return False, Reason.TLS_AND_JOIN_TOKEN, (
            "TLS and a join token (spec.coordinator.tlsSecret, joinTokenSecret): traffic is "
            "encrypted, agents verify the coordinator, and only holders of the token can "
            "join. Not protected: the token is shared, so any holder joins as a new node of "
            "its choosing; node ids are not tied to device identities (set clientCaSecret "
            "for mutual TLS); the coordinator sees every update. " + _ALWAYS)
    if tls:
        return True, Reason.NO_CLIENT_AUTHENTICATION, (
            "TLS without a join token or client CA (spec.coordinator.joinTokenSecret, "
            "clientCaSecret): traffic is encrypted and agents verify the coordinator, but any "
            "pod that reaches the Service can join as a new node, read the model and send "
            "updates. " + _ALWAYS)
    if token:
        return True, Reason.NO_TLS, (
            "A join token without TLS (spec.coordinator.tlsSecret): only token holders can "
            "join, but the token, session credentials, model and updates cross the network "
            "in plaintext; anyone on the path can read or alter them, or steal the token or "
            "a session and impersonate a node. " + _ALWAYS)
    return True, Reason.NO_TLS_OR_TOKEN, (
        "Neither TLS nor a join token (spec.coordinator.tlsSecret, joinTokenSecret): any pod "
        "that reaches the Service can join, read the model and send updates, and all "
        "traffic, session credentials included, is plaintext that anyone on the path can "
        "read or alter. " + _ALWAYS)


def accept(share: Share, *, endpoint: str, generation: int | None,
           coordinator: CoordinatorSpec, target_epsilon: float | None, now: str) -> None:
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
    insecure, reason, message = protection(coordinator)
    set_condition(share, type=ConditionType.INSECURE, status="True" if insecure else "False",
                  reason=reason, message=message, now=now)


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
