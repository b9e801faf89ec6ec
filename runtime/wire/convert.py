"""Every translation between protobuf messages and the domain types of `messages` and
`plan`. Only this module and `tensors` (besides the generated code) know protobuf."""

from __future__ import annotations

from ..messages import (
    Admission,
    Heartbeat,
    HeartbeatAck,
    JobIdentity,
    NodeFacts,
    Payload,
    Registration,
    Rejected,
    RejectReason,
    Task,
    TaskKind,
    UpdateHeader,
)
from ..plan import AttackPlan, CompressionPlan, Drills, PrivacyPlan, SecurePlan, TrainPlan
from ..proto import fedkube_pb2 as pb
from ..secagg import messages as sa
from ..spec import DataSpec

# ------------------------------------------------------------------ registration


def registration_to_pb(registration: Registration) -> pb.RegisterRequest:
    facts = registration.facts
    return pb.RegisterRequest(
        join_token=registration.join_token, node_id=registration.node_id,
        facts=pb.DeviceFacts(
            device=facts.device, platform=facts.platform, machine=facts.machine,
            cpus=facts.cpus, memory_bytes=facts.memory_bytes, accelerator=facts.accelerator,
            labels=dict(facts.labels), num_samples=facts.num_samples, hostname=facts.hostname),
        simulated_index=registration.simulated_index or 0,
        simulated=registration.simulated_index is not None, session=registration.session)


def registration_from_pb(request: pb.RegisterRequest) -> Registration:
    facts = request.facts
    return Registration(
        node_id=request.node_id, join_token=request.join_token,
        facts=NodeFacts(
            device=facts.device, platform=facts.platform, machine=facts.machine,
            cpus=facts.cpus, memory_bytes=facts.memory_bytes, accelerator=facts.accelerator,
            labels=dict(facts.labels), num_samples=facts.num_samples, hostname=facts.hostname),
        simulated_index=request.simulated_index if request.simulated else None,
        session=request.session)


def admission_to_pb(admission: Admission) -> pb.RegisterReply:
    job = admission.job
    return pb.RegisterReply(
        node_id=admission.node_id,
        heartbeat_interval_seconds=admission.heartbeat_interval_seconds,
        session=admission.session,
        job=pb.JobIdentity(
            job_name=job.job_name, model=job.model,
            data_spec_json=job.data.model_dump_json(by_alias=True, exclude_none=True),
            seed=job.seed, num_simulated_clients=job.num_simulated_clients,
            input_shape=list(job.input_shape), num_classes=job.num_classes))


def admission_from_pb(reply: pb.RegisterReply) -> Admission:
    job = reply.job
    return Admission(
        node_id=reply.node_id, heartbeat_interval_seconds=reply.heartbeat_interval_seconds,
        session=reply.session,
        job=JobIdentity(
            job_name=job.job_name, model=job.model,
            data=DataSpec.model_validate_json(job.data_spec_json or "{}"), seed=job.seed,
            num_simulated_clients=job.num_simulated_clients,
            input_shape=tuple(job.input_shape), num_classes=job.num_classes))


# --------------------------------------------------------------------- heartbeat


def heartbeat_to_pb(heartbeat: Heartbeat) -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(node_id=heartbeat.node_id, state=heartbeat.state,
                               epsilon_spent=heartbeat.epsilon_spent)


def heartbeat_from_pb(request: pb.HeartbeatRequest) -> Heartbeat:
    return Heartbeat(node_id=request.node_id, state=request.state,
                     epsilon_spent=request.epsilon_spent)


def ack_to_pb(ack: HeartbeatAck) -> pb.HeartbeatReply:
    return pb.HeartbeatReply(job_running=ack.job_running, round=ack.round)


# -------------------------------------------------------------------------- tasks


def plan_to_pb(plan: TrainPlan) -> pb.TrainPlan:
    privacy = plan.privacy
    return pb.TrainPlan(
        round=plan.round, model_version=plan.model_version, local_epochs=plan.local_epochs,
        batch_size=plan.batch_size, learning_rate=plan.learning_rate,
        optimizer=plan.optimizer,
        privacy=pb.PrivacyPlan(
            mode=privacy.mode, target_epsilon=privacy.target_epsilon or 0.0,
            delta=privacy.delta, max_grad_norm=privacy.max_grad_norm,
            noise_multiplier=privacy.noise_multiplier or 0.0, accountant=privacy.accountant,
            planned_rounds=privacy.planned_rounds),
        deadline_unix=plan.deadline_unix, client_parameters=dict(plan.client_parameters),
        dropout=plan.dropout, compression=compression_to_pb(plan.compression),
        slow_fraction=plan.drills.slow_fraction,
        slowdown=plan.drills.slowdown,
        availability_period_seconds=plan.drills.availability_period_seconds,
        availability_online_fraction=plan.drills.availability_online_fraction,
        max_local_steps=plan.max_local_steps, attack=_attack_to_pb(plan.attack),
        secure_aggregation=None if plan.secure is None else pb.SecAggPlan(
            enabled=True, clip_norm=plan.secure.clip_norm, noise_std=plan.secure.noise_std))


def _attack_to_pb(attack: AttackPlan | None) -> pb.AttackDrill | None:
    if attack is None:
        return None
    return pb.AttackDrill(kind=attack.kind, strength=attack.strength or 0.0,
                          attackers=list(attack.attackers))


def _attack_from_pb(message: pb.TrainPlan) -> AttackPlan | None:
    if not message.HasField("attack"):
        return None
    drill = message.attack
    return AttackPlan(kind=drill.kind, strength=drill.strength or None,
                      attackers=tuple(drill.attackers))


def compression_to_pb(plan: CompressionPlan) -> pb.CompressionPlan:
    return pb.CompressionPlan(top_k=plan.top_k or 0.0, quantize_bits=plan.quantize_bits,
                              error_feedback=plan.error_feedback, lossless=plan.lossless,
                              target_upload_seconds=plan.target_upload_seconds or 0.0,
                              downlink=plan.downlink)


def compression_from_pb(message: pb.CompressionPlan) -> CompressionPlan:
    return CompressionPlan(top_k=message.top_k or None, quantize_bits=message.quantize_bits or 32,
                           error_feedback=message.error_feedback,
                           lossless=message.lossless or "none",
                           target_upload_seconds=message.target_upload_seconds or None,
                           downlink=message.downlink or "none")


def plan_from_pb(message: pb.TrainPlan) -> TrainPlan:
    privacy = message.privacy
    return TrainPlan(
        round=message.round, model_version=message.model_version,
        local_epochs=message.local_epochs, batch_size=message.batch_size,
        learning_rate=message.learning_rate, optimizer=message.optimizer or "sgd",
        privacy=PrivacyPlan(
            mode=privacy.mode or "none",  # type: ignore[arg-type]
            target_epsilon=privacy.target_epsilon or None, delta=privacy.delta,
            max_grad_norm=privacy.max_grad_norm,
            noise_multiplier=privacy.noise_multiplier or None,
            accountant=privacy.accountant or "rdp", planned_rounds=privacy.planned_rounds),
        deadline_unix=message.deadline_unix,
        client_parameters=dict(message.client_parameters), dropout=message.dropout,
        compression=compression_from_pb(message.compression),
        drills=Drills(
            slow_fraction=message.slow_fraction, slowdown=max(1.0, message.slowdown),
            availability_period_seconds=message.availability_period_seconds,
            availability_online_fraction=message.availability_online_fraction or 1.0),
        max_local_steps=max(0, message.max_local_steps),
        attack=_attack_from_pb(message),
        secure=SecurePlan(clip_norm=message.secure_aggregation.clip_norm,
                          noise_std=message.secure_aggregation.noise_std)
        if message.secure_aggregation.enabled else None)


def task_to_pb(task: Task) -> pb.Task:
    if task.kind is TaskKind.STOP:
        return pb.Task(kind=pb.Task.STOP, reason=task.reason)
    assert task.plan is not None
    return pb.Task(kind=pb.Task.TRAIN, plan=plan_to_pb(task.plan))


def task_from_pb(message: pb.Task) -> Task:
    if message.kind == pb.Task.STOP:
        return Task.stop(message.reason)
    return Task.train(plan_from_pb(message.plan))


def is_stop(message: pb.Task) -> bool:
    return message.kind == pb.Task.STOP


# ------------------------------------------------------------------------ updates


def header_to_pb(header: UpdateHeader) -> pb.UpdateHeader:
    return pb.UpdateHeader(
        node_id=header.node_id, round=header.round, model_version=header.model_version,
        num_samples=header.num_samples, metrics=dict(header.metrics),
        epsilon_spent=header.epsilon_spent, delta=header.delta,
        payload=header.payload.value, refusal_reason=header.refusal_reason,
        compression=header.compression,
        uplink_bytes_per_second=header.uplink_bytes_per_second,
        upload_bytes=header.upload_bytes)


def header_from_pb(message: pb.UpdateHeader) -> UpdateHeader:
    """The domain header; a payload other than delta or refusal is refused here."""
    try:
        payload = Payload(message.payload)
    except ValueError:
        raise Rejected(RejectReason.MALFORMED,
                       f"payload {message.payload!r} is not 'delta', 'refusal' or 'masked'") from None
    return UpdateHeader(
        node_id=message.node_id, round=message.round, model_version=message.model_version,
        payload=payload, num_samples=message.num_samples, metrics=dict(message.metrics),
        epsilon_spent=message.epsilon_spent, delta=message.delta,
        refusal_reason=message.refusal_reason, compression=message.compression,
        uplink_bytes_per_second=message.uplink_bytes_per_second,
        upload_bytes=message.upload_bytes)


# ------------------------------------------------------------ secure aggregation


def advert_to_pb(advert: sa.KeyAdvert) -> pb.SecAggAdvert:
    return pb.SecAggAdvert(node_id=advert.node_id, round=advert.round,
                           cipher_public=advert.cipher_public, mask_public=advert.mask_public)


def advert_from_pb(message: pb.SecAggAdvert) -> sa.KeyAdvert:
    return sa.KeyAdvert(message.node_id, message.round, message.cipher_public,
                        message.mask_public)


def roster_to_pb(roster: sa.Roster) -> pb.SecAggRoster:
    return pb.SecAggRoster(
        round=roster.round, clients=roster.clients, threshold=roster.threshold,
        value_range=roster.value_range, neighbours=[
            pb.SecAggPeer(node_id=p.node_id, cipher_public=p.cipher_public,
                          mask_public=p.mask_public) for p in roster.neighbours])


def roster_from_pb(message: pb.SecAggRoster) -> sa.Roster:
    return sa.Roster(round=message.round, clients=message.clients,
                     threshold=message.threshold, value_range=message.value_range,
                     neighbours=tuple(sa.PeerKeys(p.node_id, p.cipher_public, p.mask_public)
                                      for p in message.neighbours))


def _shares_to_pb(shares: tuple[sa.EncryptedShare, ...]) -> list[pb.SecAggShare]:
    return [pb.SecAggShare(sender=s.sender, recipient=s.recipient, nonce=s.nonce,
                           ciphertext=s.ciphertext) for s in shares]


def _shares_from_pb(shares) -> tuple[sa.EncryptedShare, ...]:
    return tuple(sa.EncryptedShare(s.sender, s.recipient, s.nonce, s.ciphertext)
                 for s in shares)


def bundle_to_pb(bundle: sa.ShareBundle) -> pb.SecAggShareBundle:
    return pb.SecAggShareBundle(node_id=bundle.node_id, round=bundle.round,
                                seed_commitment=bundle.seed_commitment,
                                shares=_shares_to_pb(bundle.shares))


def bundle_from_pb(message: pb.SecAggShareBundle) -> sa.ShareBundle:
    return sa.ShareBundle(message.node_id, message.round, message.seed_commitment,
                          _shares_from_pb(message.shares))


def delivery_to_pb(delivery: sa.ShareDelivery) -> pb.SecAggDelivery:
    return pb.SecAggDelivery(round=delivery.round, shares=_shares_to_pb(delivery.shares))


def delivery_from_pb(message: pb.SecAggDelivery) -> sa.ShareDelivery:
    return sa.ShareDelivery(message.round, _shares_from_pb(message.shares))


def unmask_request_to_pb(request: sa.UnmaskRequest) -> pb.SecAggUnmaskRequest:
    return pb.SecAggUnmaskRequest(round=request.round, dropped=list(request.dropped),
                                  survivors=list(request.survivors))


def unmask_request_from_pb(message: pb.SecAggUnmaskRequest) -> sa.UnmaskRequest:
    return sa.UnmaskRequest(message.round, tuple(message.dropped), tuple(message.survivors))


def _revealed_to_pb(shares: tuple[sa.RevealedShare, ...]) -> list[pb.SecAggRevealed]:
    return [pb.SecAggRevealed(owner=s.owner, index=s.index, share=s.share) for s in shares]


def _revealed_from_pb(shares) -> tuple[sa.RevealedShare, ...]:
    return tuple(sa.RevealedShare(s.owner, s.index, s.share) for s in shares)


def unmask_response_to_pb(response: sa.UnmaskResponse) -> pb.SecAggUnmaskResponse:
    return pb.SecAggUnmaskResponse(node_id=response.node_id, round=response.round,
                                   key_shares=_revealed_to_pb(response.key_shares),
                                   seed_shares=_revealed_to_pb(response.seed_shares))


def unmask_response_from_pb(message: pb.SecAggUnmaskResponse) -> sa.UnmaskResponse:
    return sa.UnmaskResponse(message.node_id, message.round,
                             _revealed_from_pb(message.key_shares),
                             _revealed_from_pb(message.seed_shares))
