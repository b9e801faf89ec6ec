"""The round engine: a thin sequencer over `Round` (select, dispatch, fold, close) and
`JobPolicy` (retries, convergence, budgets), publishing what happens on one typed event
stream (`events`). No protobuf here: the servicer translates through `wire.convert`.

select → dispatch → fold updates as they arrive → close → server step → evaluate →
judge → checkpoint → publish.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import logs, wire
from ..aggregation import (
    RoundAggregator,
    RoundHistory,
    client_parameters,
    minimum_updates,
    rule_for,
    server_optimizer_for,
)
from ..data import load_dataset
from ..messages import (
    Admission,
    Heartbeat,
    HeartbeatAck,
    JobIdentity,
    Payload,
    Registration,
    Rejected,
    RejectReason,
    Task,
    UpdateHeader,
)
from ..models import build_model
from ..plan import plan_for
from ..spec import (
    TERMINAL_PHASES,
    FederatedJob,
    FederatedJobSpec,
    FederatedJobStatus,
    ManifestError,
    Phase,
    Reason,
    load_job,
    with_mutable_edits,
)
from ..training import evaluate, load_weights, pick_device, weights_of
from . import checkpoint
from .admission import UpdateBounds
from .anomaly import fold_scores, refusal_score
from .enrolment import Enrolment
from .events import (
    EventBus,
    JobStatusChanged,
    ModelSent,
    RoundClosed,
    RoundRecord,
    SinkSubscriber,
    UpdateAccepted,
    UpdateRefused,
    on_round_closed,
)
from .inbox import Inbox
from .job_status import StatusBook
from .local_work import plan_local_work
from .policy import JobPolicy, Verdict
from .quarantine import (
    Change,
    Quarantine,
    ReleaseSource,
    restore_robustness,
    robustness_state,
)
from .registry import Client, ClientRegistry
from .round import FOLD_TOGETHER, Round, RoundResult, select_clients
from .secure_round import SecureRound, distributed_noise_std, secure_config
from .selection import candidate_of, choose, draw_size, record_choices, selection_config
from .status import StatusSink
from .strategy import aggregation_config
from .traffic import traffic
from .uploads import UploadGuard, assembling_slots

if TYPE_CHECKING:
    from .central_dp import CentralDP
    from .metrics import CoordinatorMetrics

__all__ = ["RoundEngine", "RoundRecord"]

#: Bytes per parameter of a folding round's running sum (aggregation.weighted: float64).
ACCUMULATOR_BYTES = 8

log = logging.getLogger("fedkube.coordinator")

Weights = dict[str, torch.Tensor]


class RoundEngine:
    """Runs one FederatedJob from its first (or checkpointed) round to a terminal phase."""

    HEARTBEAT_SECONDS = 2.0

    def __init__(
        self,
        job: FederatedJob,
        *,
        sink: StatusSink | None = None,
        output_dir: Path | None = None,
        join_token: str | None = None,
        metrics: CoordinatorMetrics | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        offline_after: float = 20.0,
        registration_timeout: float = 120.0,
        job_file: Path | None = None,
        releases: ReleaseSource | None = None,
    ) -> None:
        self.job = job
        self.spec: FederatedJobSpec = job.spec
        self.name = job.metadata.name
        self.output_dir = output_dir
        self.join_token = join_token
        self.registration_timeout = registration_timeout
        self.job_file = job_file
        self.events = EventBus()
        if sink is not None:
            self.events.subscribe(SinkSubscriber(sink))
        if metrics is not None:
            from .metrics import MetricsSubscriber

            self.events.subscribe(MetricsSubscriber(metrics))
        if on_round is not None:
            self.events.subscribe(on_round_closed(on_round))
        self.registry = ClientRegistry(job=self.name, offline_after=offline_after)
        admission = self.spec.admission
        self.enrolment = Enrolment(self.registry, admission, join_token=join_token)
        # Central DP clips every update to maxGradNorm, a tighter bound than these; and its
        # noise makes honest norms grow without limit, so a norm bound would refuse them.
        self.bounds = UpdateBounds(admission.model_copy(
            update={"max_update_norm": None, "norm_bound_factor": None})
            if self.spec.privacy.mode == "central" else admission)
        self.book = StatusBook(job=self.name, spec=self.spec, registry=self.registry,
                               events=self.events)
        self.status = self.book.status

        torch.manual_seed(self.spec.seed)
        self.device = pick_device("cpu")
        self.dataset = load_dataset(self.spec.data, seed=self.spec.seed)
        self.model = build_model(
            self.spec.model, input_shape=self.dataset.input_shape,
            num_classes=self.dataset.num_classes, seed=self.spec.seed)
        if self.spec.privacy.mode == "local":
            from ..privacy.dpsgd import require_dp_compatible

            try:
                require_dp_compatible(self.model, name=self.spec.model)
            except ValueError as error:
                raise ManifestError(f"spec.model: {error}") from None
        self.weights: Weights = weights_of(self.model)
        self.schema = wire.schema_of(self.weights)
        self.model_bytes = wire.encoded_size(self.weights)
        self.version = 0
        self.round = 0
        self.history: list[RoundRecord] = []
        self.aggregation = aggregation_config(self.spec.strategy)
        # Uploads being assembled are bounded (memory); stalled ones are cut off.
        self.uploads = UploadGuard(slots=self._upload_slots(), slot_bytes=self.model_bytes,
                                   idle_seconds=admission.upload_idle_seconds,
                                   total_seconds=admission.upload_timeout_seconds)
        self.policy = JobPolicy(self.spec, min_updates=minimum_updates(self.aggregation))
        self.selection = selection_config(self.spec)
        self.dropout_estimate = self.spec.simulation.dropout
        self.rng = random.Random(self.spec.seed)
        # Central DP noise from a seed no one else knows: every client gets the job's seed
        # and downloads each new model, so noise drawn from that seed could be replayed and
        # subtracted. Its state is checkpointed, so a resumed job does not repeat noise.
        self.noise_generator = torch.Generator().manual_seed(secrets.randbits(62))
        self.server_optimizer = server_optimizer_for(self.aggregation)
        self.central: CentralDP | None = None
        if self.spec.privacy.mode == "central":
            # Imported here: Opacus costs seconds of start-up that other jobs never need.
            from .central_dp import CentralDP

            self.central = CentralDP.for_job(self.spec)
        # Nodes that declined a task because it would exceed their local DP budget. A
        # budget only grows, so they are not asked again in this job.
        self.budget_spent: set[str] = set()
        # Anomaly scores, suspicion and quarantine (issue 14): the last round's aggregate
        # is the next one's reference (and centered clipping's centre).
        self.round_history = RoundHistory()
        self.quarantine = Quarantine(self.spec.robustness, self.registry)
        self.releases = releases
        self.refusal_scores: dict[str, float] = {}  # this round's, e.g. norm-bound refusals
        # Suspicion and quarantine from the checkpoint, for clients not yet registered
        # again after a restart (given back in register, kept in the next checkpoint).
        self.restored_clients: dict[str, dict[str, Any]] = {}
        self.open_round: Round | None = None
        # Secure aggregation: the coordinator sees only each round's masked sum.
        self.secure_config = (secure_config(self.spec) if self.spec.secure_aggregation.enabled
                              else None)
        self.secure_round: SecureRound | None = None
        self.done = asyncio.Event()
        self._resume_from_checkpoint()

    # ------------------------------------------------------------- checkpoints

    def _resume_from_checkpoint(self) -> None:
        if self.output_dir is None:
            return
        state = checkpoint.load(self.output_dir, schema=self.schema)
        if state is None:
            return
        self.weights, self.round, self.version = state.weights, state.round, state.version
        self.history = [RoundRecord(**r) for r in state.history]
        self.policy.load_state_dict({"best_accuracy": state.best_accuracy,
                                     "rounds_without_improvement": state.rounds_without_improvement})
        self.status.bytes_up, self.status.bytes_down = state.bytes_up, state.bytes_down
        self.rng.setstate(state.rng_state)
        self.noise_generator.set_state(state.noise_state)
        self.server_optimizer.load_state_dict(state.server_optimizer)
        if self.central is not None and state.accountant is not None:
            self.central.budget.load_state_dict(state.accountant)
        self.restored_clients = dict(state.clients)
        if self.history:
            last = self.history[-1]
            self.status.accuracy, self.status.loss = last.accuracy, last.loss
            self.status.epsilon = None if last.epsilon is None else round(last.epsilon, 4)
        self.status.round = self.round
        self.status.best_accuracy = self.policy.best_accuracy
        if state.final_status is not None:
            # The job ended before this restart: it stays ended (run() reports it).
            self.book.status = self.status = FederatedJobStatus.model_validate(
                state.final_status)
            log.info("the job already ended in round %d: %s", self.round,
                     self.status.phase.value)
            return
        log.info("resumed from checkpoint at round %d", self.round)

    def _save_checkpoint(self) -> None:
        if self.output_dir is None:
            return
        policy = self.policy.state_dict()
        checkpoint.save(self.output_dir, checkpoint.State(
            weights=self.weights, round=self.round, version=self.version,
            history=[r.to_dict() for r in self.history], best_accuracy=policy["best_accuracy"],
            rounds_without_improvement=policy["rounds_without_improvement"],
            bytes_up=self.status.bytes_up, bytes_down=self.status.bytes_down,
            rng_state=self.rng.getstate(), noise_state=self.noise_generator.get_state(),
            server_optimizer=self.server_optimizer.state_dict(),
            accountant=self.central.budget.state_dict() if self.central else None,
            final_status=self.status.to_wire() if self._ended() else None,
            clients=self._clients_state(),
        ))

    def _clients_state(self) -> dict[str, dict[str, Any]]:
        saved = dict(self.restored_clients)  # not back yet: still theirs
        for client in self.registry.all():
            state = robustness_state(client)
            if state is not None:
                saved[client.node_id] = state
        return saved

    def _ended(self) -> bool:
        """Succeeded or Failed: a restart must not train on. (Stopped can be resumed.)"""
        return self.status.phase in (Phase.succeeded, Phase.failed)

    # ------------------------------------------------------------ client calls

    def register(self, registration: Registration, *, certified: bool = False) -> Admission:
        """`certified`: a client certificate proved the node id (mTLS)."""
        client, session = self.enrolment.enrol(registration, certified=certified)
        saved = self.restored_clients.pop(client.node_id, None)
        if saved is not None:
            restore_robustness(client, saved)
            log.info("restored %s's suspicion %.2f%s from the checkpoint", client.node_id,
                     client.suspicion, f", quarantined until round {client.quarantined_until}"
                     if client.quarantined else "", extra={"node": client.node_id})
        log.info("registered %s (%s, %d samples)", client.node_id, client.spec.device.value,
                 client.spec.data_size, extra={"job": self.name, "node": client.node_id})
        self.book.publish_client(client)
        self.book.publish()
        return Admission(node_id=client.node_id, heartbeat_interval_seconds=self.heartbeat_interval(),
                         job=self.identity(), session=session)

    def heartbeat_interval(self) -> float:
        """How often agents beat: every 2 s, and less often for large fleets (1,000
        clients: every 5 s) so heartbeats stay near 200 calls a second, always well
        inside the time after which a silent node counts as offline."""
        fleet = len(self.registry) / 200
        return max(self.HEARTBEAT_SECONDS, min(fleet, self.registry.offline_after / 4))

    def authenticate(self, node_id: str, session: str) -> None:
        """Every call after Register: Rejected unless `session` is `node_id`'s credential."""
        self.enrolment.authenticate(node_id, session)

    def identity(self) -> JobIdentity:
        return JobIdentity(
            job_name=self.name, model=self.spec.model, data=self.spec.data, seed=self.spec.seed,
            num_simulated_clients=self.spec.simulation.clients,
            input_shape=tuple(self.dataset.input_shape), num_classes=self.dataset.num_classes)

    def heartbeat(self, heartbeat: Heartbeat) -> HeartbeatAck:
        client = self._client(heartbeat.node_id)
        self.registry.heartbeat(client.node_id, heartbeat.state, heartbeat.epsilon_spent)
        # Sinks coalesce: the Kubernetes one writes a heartbeat-only change now and then.
        self.book.publish_client(client)
        return HeartbeatAck(job_running=self.job_running(), round=self.round)

    def open_stream(self, node_id: str) -> Inbox[Task]:
        """A fresh task queue for a node's stream: tasks queued for a dead stream must
        not leak into a new one. A client reconnecting mid-round gets its task again."""
        client = self._client(node_id)
        client.tasks = Inbox()
        client.streaming = True
        self.registry.changed.set()
        again = self.open_round.task_for(node_id) if self.open_round else None
        if again is not None:
            client.tasks.put_nowait(again)
        return client.tasks

    def close_stream(self, node_id: str, queue: Inbox[Task]) -> None:
        client = self.registry.get(node_id)
        if client is None or client.tasks is not queue:
            return  # a newer stream of the same node took over
        client.streaming = False
        self.registry.changed.set()
        if self.open_round is not None:
            self.open_round.check_complete(self.registry.is_live)

    def model_for(self, node_id: str, version: int) -> tuple[int, Weights]:
        self._client(node_id)
        if version != self.version:
            raise Rejected(RejectReason.WRONG_VERSION,
                           f"model version {version} is not current ({self.version})")
        return self.version, self.weights

    def model_sent(self, nbytes: int) -> None:
        """A GetModel answered with `nbytes` of tensor payload (less than model_bytes
        when some tensors went as deltas: spec.compression.downlink)."""
        self.status.bytes_down += nbytes
        self.events.publish(ModelSent(nbytes))

    def admit(self, header: UpdateHeader) -> Round:
        """The admission stage before any tensor is read: the node, the round, its
        selection and the header's own values. Raises Rejected."""
        self._client(header.node_id)
        if self.open_round is None:
            if 0 < header.round <= self.round:
                raise Rejected(RejectReason.WRONG_ROUND, f"round {header.round} is over: a "
                               "late update does not count", late=True)
            raise Rejected(RejectReason.WRONG_ROUND,
                           f"round {header.round} is not open: no round is open now "
                           f"(the last was {self.round})")
        if self.secure_config is not None and header.payload is Payload.DELTA:
            raise Rejected(RejectReason.MALFORMED, "this job runs secure aggregation: an "
                           "update must be a masked input (SecAggMaskedInput), never plain")
        if self.secure_config is None and header.payload is Payload.MASKED:
            raise Rejected(RejectReason.MALFORMED, "this job does not run secure aggregation")
        self.open_round.admit(header)
        return self.open_round

    def secure_stage(self, node_id: str) -> SecureRound:
        """The open round's secure stage, for a secure-aggregation call of `node_id`."""
        self._client(node_id)
        if self.secure_round is None:
            raise Rejected(RejectReason.WRONG_ROUND, "no secure round is open")
        return self.secure_round

    def refused(self, node_id: str, rejection: Rejected) -> None:
        """The servicer refused a request: count it and log it."""
        log.log(logging.INFO if rejection.late else logging.WARNING,
                "refused %s: %s", node_id or "request", rejection, extra={
            "job": self.name, "round": self.round + 1, "node": node_id or None,
            "reason": rejection.reason.label})
        client = self.registry.get(node_id)
        score = refusal_score(rejection.reason)
        if score is not None and self.open_round and node_id in self.open_round.selected:
            self.refusal_scores[node_id] = score
        if client is not None:
            label = rejection.reason.label
            client.rejections[label] = client.rejections.get(label, 0) + 1
            self.book.publish_client(client)
        self.events.publish(UpdateRefused(node_id, rejection.reason, str(rejection)))

    def record_refusal(self, header: UpdateHeader) -> None:
        open_round = self.admit(header)
        client = self._client(header.node_id)
        client.epsilon = max(client.epsilon, header.epsilon_spent)
        client.delta = header.delta
        if self.spec.privacy.mode == "local":
            # Only a device's own DP budget refuses for good; any other refusal (a local
            # run that diverged) is a missed round, and the node stays eligible.
            self.budget_spent.add(header.node_id)
        open_round.record_refusal(header, self.registry.is_live)
        log.info("node %s declined round %d: %s", header.node_id, header.round,
                 header.refusal_reason)
        self.book.milestone("TaskRefused", f"{header.node_id}: {header.refusal_reason}", warning=True)

    async def accept_update(self, header: UpdateHeader, delta: Weights, nbytes: int) -> None:
        """Fold a validated delta into the open round; the global model is untouched."""
        open_round = self.admit(header)
        bounded = await open_round.fold(header, delta, self.registry.is_live)
        client = self._client(header.node_id)
        for label, hit in (("norm_bound", bounded.clipped), ("sample_cap", bounded.capped)):
            if hit:  # admitted, cut down: the ClientNode shows it beside the refusals
                client.rejections[label] = client.rejections.get(label, 0) + 1
        client.answered += 1
        client.rounds_participated += 1
        client.epsilon = max(client.epsilon, header.epsilon_spent)
        client.delta = header.delta if header.epsilon_spent else client.delta
        client.update_arrived(nbytes=nbytes, seconds=time.monotonic() - open_round.started,
                              metrics=header.metrics, compression=header.compression,
                              uplink_bytes_per_second=header.uplink_bytes_per_second)
        open_round.bytes_up += nbytes
        self.status.bytes_up += nbytes
        self.events.publish(UpdateAccepted(header.node_id, nbytes))

    async def accept_masked(self, header: UpdateHeader, vector, nbytes: int):
        """Fold a masked input into the secure round's sum; the shares to reveal next."""
        self.admit(header)
        stage = self.secure_stage(header.node_id)
        stage.receive_masked(header, vector)
        client = self._client(header.node_id)
        client.answered += 1
        client.rounds_participated += 1
        client.epsilon = max(client.epsilon, header.epsilon_spent)
        client.update_arrived(nbytes=nbytes, seconds=time.monotonic() - stage.opened.started,
                              metrics=header.metrics)
        self.status.bytes_up += nbytes
        self.events.publish(UpdateAccepted(header.node_id, nbytes))
        return await stage.unmask_request(header.node_id)

    def _client(self, node_id: str) -> Client:
        client = self.registry.get(node_id)
        if client is None:
            raise Rejected(RejectReason.UNKNOWN_NODE, f"unknown node {node_id!r}: register first")
        return client

    # ----------------------------------------------------------------- the job

    async def run(self) -> FederatedJobStatus:
        if self._ended():  # restarted after the job ended (see _resume_from_checkpoint)
            # The status as it ended, client counts included (no client is registered now).
            self.events.publish(JobStatusChanged(self.status.model_copy(deep=True)))
            for client in self.registry.all():
                client.tasks.put_nowait(Task.stop(self.status.message or "job ended"))
            self.done.set()
            return self.status
        self.book.running(self.spec.rounds)
        try:
            await self._wait_for_clients()
            verdict: Verdict | None = None
            while verdict is None:
                self._apply_spec_edits()
                if self.round >= self.spec.rounds:
                    verdict = self.policy.rounds_done(self.round)
                    break
                with logs.bound(round=self.round + 1):  # on every line of the round
                    verdict = await self._next_round()
            self._finish(verdict)
        except asyncio.CancelledError:
            self._finish(Verdict(Phase.stopped, Reason.STOPPED, "coordinator stopped"))
            raise
        finally:
            stop = Task.stop(self.status.message or self.status.phase.value)
            for client in self.registry.all():
                client.tasks.put_nowait(stop)
                client.state = "idle"
                client.departed = not client.streaming
                self.book.publish_client(client)
            self.done.set()
        return self.status

    async def _next_round(self) -> Verdict | None:
        """One round with its retries; the Verdict that ends the job, if one does."""
        number = self.round + 1
        for attempt in range(self.spec.round_retries + 1):
            await self._release_quarantined()
            verdict = self._local_budgets_verdict()
            if verdict is not None:
                return verdict
            opened = self._open_round(number)
            if isinstance(opened, Verdict):
                return opened
            if opened is not None:
                result = await self._run_round(opened)
                if result.aggregate is not None:
                    return await self._complete_round(opened, result)
            verdict = self._local_budgets_verdict() or self.policy.short_round(number, attempt)
            if verdict is not None:
                return verdict
            log.warning("round %d closed below minClients (attempt %d of %d)",
                        number, attempt + 1, self.spec.round_retries + 1)
            await self._wait_for_live(self.spec.min_clients,
                                      timeout=self.spec.round_timeout_seconds)
        raise AssertionError("short_round gives a verdict on the last attempt")

    def _open_round(self, number: int) -> Round | Verdict | None:
        """Select and build the round; a Verdict when the central budget cannot pay for
        it, None when too few clients are eligible."""
        eligible = [c for c in self.registry.live(self.spec.client_selector)
                    if c.node_id not in self.budget_spent and not self.quarantine.holds(c)]
        wanted = self.spec.clients_to_select(len(eligible))
        if wanted < 1:
            return None
        if self.central is not None:
            # The rate this round really samples at: a smaller population spends faster.
            rate = wanted / len(eligible)
            if not self.central.budget.fits_next_round(rate):
                return self.policy.central_budget_spent(self.round, self.central.budget.epsilon())
        # No over-selection under central DP: its accountant counts exactly `wanted`.
        padding = 0.0 if self.central is not None else self.dropout_estimate
        selected = self._select(eligible, wanted=wanted, expected_dropout=padding)
        if len(selected) < self.spec.min_clients:
            return None
        noise = 0.0
        if self.secure_config is not None and self.central is not None:
            # Distributed DP: clients noise before masking; count only the minimum that
            # a released sum is guaranteed to hold.
            noise = distributed_noise_std(noise_multiplier=self.central.noise_multiplier,
                                          clip_norm=self.central.clip_norm,
                                          guaranteed_survivors=self.secure_config.min_clients)
        plan = plan_for(self.spec, round=number, model_version=self.version, now=time.time(),
                        client_parameters=client_parameters(self.aggregation),
                        distributed_noise_std=noise)
        plans, planned_steps = plan_local_work(self.spec, plan, selected)
        buffered = rule_for(self.aggregation.rule).buffered
        aggregator = RoundAggregator(
            self.aggregation, self.weights, max_buffered=len(selected) if buffered else 0,
            transform=self.central.transform if self.central else None,
            uniform_weights=self.central is not None, history=self.round_history,
            hold=FOLD_TOGETHER - 1)
        cap = self.spec.privacy.target_epsilon if self.spec.privacy.mode == "local" else None
        self.bounds.next_round()
        return Round(plan=plan, selected={c.node_id: c for c in selected}, wanted=wanted,
                     eligible=len(eligible), floor=self.policy.floor, aggregator=aggregator,
                     bounds=self.bounds, epsilon_cap=cap, plans=plans,
                     planned_steps=planned_steps)

    def _select(self, eligible: list[Client], *, wanted: int, expected_dropout: float
                ) -> list[Client]:
        """selection: random draws as always; adaptive scores the eligible clients and
        records each one's choice on its record (its ClientNode shows it)."""
        if self.selection.mode == "random":
            return select_clients(eligible, wanted=wanted, expected_dropout=expected_dropout,
                                  rng=self.rng)
        # Over-committed, and the round closes at `wanted` updates (Oort): a slow pick
        # costs its own update, not everyone's time.
        padded = draw_size(wanted, eligible=len(eligible), expected_dropout=expected_dropout,
                           exploration=self.selection.exploration)
        candidates = [candidate_of(c) for c in eligible]
        ids, choices = choose(candidates, wanted=padded, config=self.selection, rng=self.rng)
        record_choices(eligible, choices)
        by_id = {c.node_id: c for c in eligible}
        return [by_id[node_id] for node_id in ids]

    async def _run_round(self, opened: Round) -> RoundResult:
        self.open_round = opened
        self.refusal_scores = {}
        opened.dispatch()
        self.status.clients = self.book.counts(active=len(opened.selected))
        self.book.publish()
        if self.secure_config is not None:
            self.secure_round = SecureRound(opened, config=self.secure_config,
                                            seed=self.rng.getrandbits(63), schema=self.schema,
                                            live=self.registry.is_live)
            try:
                result = await self.secure_round.run()
            finally:
                self.secure_round = None
        else:
            await opened.wait(self.spec.round_timeout_seconds)
            result = await opened.close()  # late updates are now refused as wrong_round
        self.open_round = None
        if result.aggregate is None:
            log.info("round %d deadline: %d of %d updates in", opened.number,
                     len(result.accepted), result.selected)
        if self.selection.mode == "adaptive":
            # It over-commits and closes at `wanted`: only a shortfall is dropout.
            missing = max(0, opened.wanted - len(result.accepted)) / opened.wanted
        else:
            missing = result.dropped / result.selected
        self.dropout_estimate = 0.7 * self.dropout_estimate + 0.3 * missing
        for node_id, client in opened.selected.items():  # adaptive local work halves these
            client.missed_last = node_id not in result.accepted
        if result.aggregate is None:
            self.status.clients = self.book.counts(active=0, dropped=result.dropped)
        return result

    async def _complete_round(self, opened: Round, result: RoundResult) -> Verdict | None:
        """Server step, evaluation, the policy's judgement, checkpoint and publication."""
        assert result.aggregate is not None
        mean_delta = result.aggregate.mean_delta
        epsilon = None
        if self.central is not None:
            if self.secure_config is None:  # under secure aggregation clients noised
                mean_delta = self.central.noised(mean_delta, averaged=len(result.aggregate.used),
                                                 generator=self.noise_generator)
            self.central.budget.record_round(result.selected / opened.eligible)
            epsilon = self.central.budget.epsilon()
        elif self.spec.privacy.mode == "local":
            epsilon = self.registry.max_epsilon()
        self.weights = await asyncio.to_thread(self.server_optimizer.step, self.weights,
                                               mean_delta)
        self.version += 1
        self.round = result.number
        for node_id in result.aggregate.set_aside:
            client = self.registry.get(node_id)
            if client is not None:
                client.set_aside += 1
        self.round_history.advance(result.aggregate.mean_delta, list(result.aggregate.distances))
        fold_scores(self.registry, {**result.aggregate.scores, **self.refusal_scores},
                    decay=self.spec.robustness.suspicion_decay)
        self._announce(self.quarantine.judge(result.number, {
            **result.aggregate.reasons,
            **{node: "refused by the norm bound" for node in self.refusal_scores}}))
        evaluation = await asyncio.to_thread(self._evaluate)
        record = RoundRecord(
            round=result.number, accuracy=evaluation.accuracy, loss=evaluation.loss,
            clients_selected=result.selected, clients_in=len(result.accepted),
            clients_dropped=result.dropped, set_aside=len(result.aggregate.set_aside),
            seconds=round(time.monotonic() - opened.started, 4),
            epsilon=epsilon, bytes_up=self.status.bytes_up, bytes_down=self.status.bytes_down,
            train_loss=result.train_loss, model_version=self.version,
            **traffic(opened, self.history, self.status.bytes_down, self.model_bytes))
        return self._record_round(record)

    def _record_round(self, record: RoundRecord) -> Verdict | None:
        """A round (or server step) done: judge it, checkpoint, publish."""
        self.history.append(record)
        verdict = self.policy.after_round(record.round, record.accuracy)
        self.book.after_round(record, best_accuracy=self.policy.best_accuracy, spec=self.spec)
        self._save_checkpoint()
        self.events.publish(RoundClosed(record))
        for client in self.registry.all():
            self.book.publish_client(client)
        self.book.publish()
        closed = (f"round {record.round}: accuracy {record.accuracy:.4f}, "
                  f"{record.clients_in}/{record.clients_selected} clients")
        log.info(closed)
        self.book.milestone(Reason.ROUND_COMPLETED, closed)
        return verdict

    async def _release_quarantined(self) -> None:
        """Before each round: release who served its quarantine or was cleared by a user."""
        held = self.quarantine.held_ids()
        if not held:
            return
        cleared: set[str] = set()
        if self.releases is not None:
            cleared = await asyncio.to_thread(self.releases.quarantine_cleared, held)
        changes = self.quarantine.release(self.round, cleared)
        self._announce(changes)
        if changes:
            self.book.publish()

    def _announce(self, changes: list[Change]) -> None:
        for change in changes:
            client = self.registry.get(change.node_id)
            if client is not None:
                self.book.publish_client(client)
            if change.quarantined:
                self.book.milestone(Reason.QUARANTINED, f"{change.node_id}: {change.reason}",
                                    warning=True)
            else:
                self.book.milestone(Reason.RELEASED, f"{change.node_id}: {change.reason}")

    def _evaluate(self):
        load_weights(self.model, self.weights)
        return evaluate(self.model, self.dataset.x_test, self.dataset.y_test, device=self.device)

    def _local_budgets_verdict(self) -> Verdict | None:
        if not self.budget_spent:
            return None
        live = self.registry.live(self.spec.client_selector)
        with_budget = sum(1 for c in live if c.node_id not in self.budget_spent)
        return self.policy.local_budgets_spent(self.round, live=len(live), with_budget=with_budget)

    def _apply_spec_edits(self) -> None:
        """Take up edits of spec.MUTABLE_FIELDS, which the operator writes into the
        mounted job file; the operator refuses edits of anything else."""
        if self.job_file is None:
            return
        try:
            edited = with_mutable_edits(self.spec, load_job(self.job_file).spec)
        except (ManifestError, OSError) as error:
            log.warning("ignoring job file %s: %s", self.job_file, error)
            return
        if edited == self.spec:
            return
        changes = {k: v for k, v in edited.model_dump(by_alias=True).items()
                   if v != self.spec.model_dump(by_alias=True)[k]}
        self.spec = self.policy.spec = edited
        if self.central is not None:
            try:
                self.central.budget.replan(edited.rounds, rounds_done=self.round)
            except ValueError as error:
                log.warning("privacy budget after the edit: %s", error)
        log.info("spec edited while running: %s", changes)
        self.book.milestone(Reason.SPEC_CHANGE_APPLIED, f"now running with {changes}")

    async def _wait_for_clients(self) -> None:
        wanted = self.spec.simulation.clients or self.spec.min_clients
        deadline = time.monotonic() + self.registration_timeout
        while True:
            live = len(self.registry.live(self.spec.client_selector))
            remaining = deadline - time.monotonic()
            if live >= wanted:
                return
            if remaining <= 0:
                # Too few for even minClients: start anyway, so the round's retries end the
                # job with TooFewClients instead of it waiting forever.
                log.warning("starting with %d of %d expected clients (minClients %d)", live,
                            wanted, self.spec.min_clients)
                return
            await self._registry_change(max(0.5, min(remaining, 5.0)))

    async def _wait_for_live(self, count: int, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.registry.live(self.spec.client_selector)) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await self._registry_change(min(remaining, 1.0))

    async def _registry_change(self, timeout: float) -> None:
        self.registry.changed.clear()
        try:
            await asyncio.wait_for(self.registry.changed.wait(), timeout=timeout)
        except TimeoutError:
            pass

    def _upload_slots(self) -> int:
        """admission.concurrentUploads, or when unset as many as the memory budget allows
        beside the running sum (float64: ACCUMULATOR_BYTES per parameter) of a rule that
        folds; robust rules buffer every update, so the uploads do not set their memory."""
        chosen = self.spec.admission.concurrent_uploads
        if chosen is not None:
            return chosen
        folds = not rule_for(self.aggregation.rule).buffered
        parameters = sum(t.numel() for t in self.weights.values())
        return assembling_slots(model_bytes=self.model_bytes,
                                sum_bytes=parameters * ACCUMULATOR_BYTES if folds else None)

    def job_running(self) -> bool:
        return self.status.phase not in TERMINAL_PHASES

    def _finish(self, verdict: Verdict) -> None:
        model_ref = None
        if self.output_dir is not None:
            model_ref = str(checkpoint.save_model(self.output_dir, self.weights))
        self.book.finish(verdict, model_ref=model_ref)
        if self._ended():  # after publishing: the client counts are final then
            self._save_checkpoint()
