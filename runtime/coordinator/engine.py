"""The round engine: select → dispatch → fold updates as they arrive → close → server
step → evaluate → converge? → checkpoint → publish.

It is plain asyncio code with no gRPC types beyond the Task messages it queues; the
servicer (server.py) translates requests into calls on it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import wire
from ..aggregation import RoundAggregator, minimum_updates, server_optimizer_for
from ..data import load_dataset
from ..models import build_model
from ..proto import fedkube_pb2 as pb
from ..spec import (
    ROBUST_STRATEGIES,
    TERMINAL_PHASES,
    ClientCounts,
    ConditionType,
    FederatedJob,
    FederatedJobSpec,
    FederatedJobStatus,
    ManifestError,
    Phase,
    Reason,
    StrategyName,
    load_job,
    upsert_condition,
)
from ..training import evaluate, load_weights, pick_device, weights_of
from . import checkpoint
from .registry import Client, ClientRegistry

if TYPE_CHECKING:
    from .privacy_budget import CentralPrivacy
from .status import StatusSink

log = logging.getLogger("fedkube.coordinator")

Weights = dict[str, torch.Tensor]


class UpdateRejected(Exception):
    """An update the coordinator refuses; `reason` is a metric label, the text is for
    the client."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RoundRecord:
    """One line of metrics.jsonl."""

    round: int
    accuracy: float
    loss: float
    clients_selected: int
    clients_in: int
    clients_dropped: int
    set_aside: int
    seconds: float
    epsilon: float | None
    bytes_up: int
    bytes_down: int
    train_loss: float | None
    model_version: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class _OpenRound:
    number: int
    version: int
    task: pb.Task
    selected: set[str]
    wanted: int
    aggregator: RoundAggregator
    deadline: float
    answered: set[str] = field(default_factory=set)
    accepted: list[str] = field(default_factory=list)
    train_losses: list[tuple[float, int]] = field(default_factory=list)
    complete: asyncio.Event = field(default_factory=asyncio.Event)

    def check_complete(self, live: set[str]) -> None:
        waiting = {n for n in self.selected - self.answered if n in live}
        if len(self.accepted) >= self.wanted or not waiting:
            self.complete.set()


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RoundEngine:
    """Runs one FederatedJob from its first (or checkpointed) round to a terminal phase."""

    HEARTBEAT_SECONDS = 2.0

    def __init__(
        self,
        job: FederatedJob,
        *,
        sink: StatusSink,
        output_dir: Path | None = None,
        join_token: str | None = None,
        metrics: object | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        offline_after: float = 20.0,
        registration_timeout: float = 120.0,
        job_file: Path | None = None,
    ) -> None:
        self.job = job
        self.spec: FederatedJobSpec = job.spec
        self.name = job.metadata.name
        self.sink = sink
        self.output_dir = output_dir
        self.join_token = join_token
        self.metrics = metrics
        self.on_round = on_round
        self.registration_timeout = registration_timeout
        self.job_file = job_file
        self.registry = ClientRegistry(job=self.name, offline_after=offline_after)
        self.status = FederatedJobStatus(
            phase=Phase.pending, target_epsilon=self.spec.privacy.target_epsilon)

        torch.manual_seed(self.spec.seed)
        self.device = pick_device("cpu")
        self.dataset = load_dataset(self.spec.data, seed=self.spec.seed)
        self.model = build_model(
            self.spec.model, input_shape=self.dataset.input_shape,
            num_classes=self.dataset.num_classes, seed=self.spec.seed)
        self.weights: Weights = weights_of(self.model)
        self.schema = wire.schema_of(self.weights)
        self.model_bytes = wire.encoded_size(self.weights)
        self.version = 0
        self.round = 0
        self.history: list[RoundRecord] = []
        self.best_accuracy: float | None = None
        self.rounds_without_improvement = 0
        self.dropout_estimate = self.spec.simulation.dropout
        self.rng = random.Random(self.spec.seed)
        # Central DP noise from a seed no one else knows: every client gets the job's seed
        # with its spec and downloads each new model, so noise drawn from that seed could
        # be replayed and subtracted. Its state is checkpointed, so a resumed job does not
        # repeat noise either.
        self.noise_generator = torch.Generator().manual_seed(secrets.randbits(62))
        self.server_optimizer = server_optimizer_for(self.spec.strategy)
        self.central: CentralPrivacy | None = None
        # Nodes that declined a task because it would exceed their local DP budget. A
        # budget only grows, so they are not asked again in this job.
        self.budget_spent: set[str] = set()
        if self.spec.privacy.mode == "central":
            # Imported here: Opacus costs seconds of start-up that other jobs never need.
            from .privacy_budget import CentralPrivacy

            self.central = CentralPrivacy.for_job(self.spec)
        self._open: _OpenRound | None = None
        self._fold_lock = asyncio.Lock()
        self._chunk_cache: tuple[int, list[pb.TensorChunk]] | None = None
        self._upload_slots = asyncio.Semaphore(4)  # bounds memory: uploads being assembled
        self.done = asyncio.Event()
        self._resume_from_checkpoint()

    # ------------------------------------------------------------- checkpoints

    def _resume_from_checkpoint(self) -> None:
        if self.output_dir is None:
            return
        state = checkpoint.load(self.output_dir, schema=self.schema)
        if state is None:
            return
        self.weights = state.weights
        self.round = state.round
        self.version = state.version
        self.history = [RoundRecord(**r) for r in state.history]
        self.best_accuracy = state.best_accuracy
        self.rounds_without_improvement = state.rounds_without_improvement
        self.status.bytes_up = state.bytes_up
        self.status.bytes_down = state.bytes_down
        self.rng.setstate(state.rng_state)
        self.noise_generator.set_state(state.noise_state)
        self.server_optimizer.load_state_dict(state.server_optimizer)
        if self.central is not None and state.accountant is not None:
            self.central.accountant.load_state_dict(state.accountant)
        if self.history:
            last = self.history[-1]
            self.status.accuracy, self.status.loss = last.accuracy, last.loss
        self.status.round = self.round
        self.status.best_accuracy = self.best_accuracy
        if state.final_status is not None:
            # The job ended before this restart: it stays ended (run() reports it).
            self.status = FederatedJobStatus.model_validate(state.final_status)
            log.info("the job already ended in round %d: %s", self.round, self.status.phase.value)
            return
        log.info("resumed from checkpoint at round %d", self.round)

    def _save_checkpoint(self) -> None:
        if self.output_dir is None:
            return
        checkpoint.save(self.output_dir, checkpoint.State(
            weights=self.weights, round=self.round, version=self.version,
            history=[r.to_dict() for r in self.history], best_accuracy=self.best_accuracy,
            rounds_without_improvement=self.rounds_without_improvement,
            bytes_up=self.status.bytes_up, bytes_down=self.status.bytes_down,
            rng_state=self.rng.getstate(), noise_state=self.noise_generator.get_state(),
            server_optimizer=self.server_optimizer.state_dict(),
            accountant=self.central.accountant.state_dict() if self.central else None,
            final_status=self.status.to_wire() if self._ended() else None,
        ))

    def _ended(self) -> bool:
        """Succeeded or Failed: a restart must not train on. (Stopped can be resumed.)"""
        return self.status.phase in (Phase.succeeded, Phase.failed)

    # ------------------------------------------------------------ client calls

    def register(self, request: pb.RegisterRequest) -> Client:
        if self.join_token and request.join_token != self.join_token:
            raise PermissionError("join token missing or wrong")
        client = self.registry.register(request)
        self._publish_client(client)
        self._publish_status()
        return client

    def heartbeat(self, node_id: str, state: str, epsilon: float) -> Client:
        if node_id not in self.registry:
            raise KeyError(node_id)
        client = self.registry.heartbeat(node_id, state, epsilon)
        # Sinks coalesce: the Kubernetes one writes a heartbeat-only change now and then.
        self._publish_client(client)
        return client

    def stream_opened(self, client: Client) -> None:
        client.streaming = True
        self.registry.changed.set()
        # A client that reconnects mid-round gets its task again.
        if self._open and client.node_id in self._open.selected \
                and client.node_id not in self._open.answered:
            client.tasks.put_nowait(self._open.task)

    def stream_closed(self, client: Client) -> None:
        client.streaming = False
        self.registry.changed.set()
        if self._open is not None:
            self._open.check_complete(self._live_ids())

    def model_chunks(self, node_id: str, version: int) -> list[pb.TensorChunk]:
        if node_id not in self.registry:
            raise UpdateRejected("unknown_node", f"unknown node {node_id!r}")
        if version != self.version:
            raise UpdateRejected(
                "wrong_version", f"model version {version} is not current ({self.version})")
        if self._chunk_cache is None or self._chunk_cache[0] != self.version:
            self._chunk_cache = (self.version, list(
                wire.to_chunks(self.weights, model_version=self.version)))
        self.status.bytes_down += self.model_bytes
        if self.metrics is not None:
            self.metrics.bytes_sent(self.model_bytes)
        return self._chunk_cache[1]

    def check_header(self, header: pb.UpdateHeader) -> _OpenRound:
        """Refuse early what can be refused before reading tensors."""
        client = self.registry.get(header.node_id)
        if client is None:
            raise UpdateRejected("unknown_node", f"unknown node {header.node_id!r}")
        open_round = self._open
        if open_round is None or header.round != open_round.number:
            current = open_round.number if open_round else self.round
            raise UpdateRejected(
                "wrong_round", f"round {header.round} is not open (current round {current})")
        if header.node_id not in open_round.selected:
            raise UpdateRejected(
                "not_selected", f"node {header.node_id!r} was not selected for round "
                f"{header.round}")
        if header.node_id in open_round.answered:
            raise UpdateRejected(
                "duplicate", f"node {header.node_id!r} already answered round {header.round}")
        if header.model_version != open_round.version:
            raise UpdateRejected(
                "wrong_version", f"update built on model version {header.model_version}, "
                f"round {header.round} uses {open_round.version}")
        if header.payload not in ("delta", "refusal"):
            raise UpdateRejected("malformed", f"payload {header.payload!r} is not 'delta'")
        if header.payload == "delta" and header.num_samples <= 0:
            raise UpdateRejected("malformed", "num_samples must be positive")
        if not all(math.isfinite(v) for v in header.metrics.values()):
            raise UpdateRejected("non_finite", "metrics hold NaN or Inf")
        privacy = self.spec.privacy
        if privacy.mode == "local" and privacy.target_epsilon is not None \
                and header.epsilon_spent > privacy.target_epsilon * (1 + 1e-9):
            raise UpdateRejected(
                "budget", f"reported epsilon {header.epsilon_spent:.4f} exceeds "
                f"targetEpsilon {privacy.target_epsilon}")
        return open_round

    def assembler(self) -> wire.TensorAssembler:
        return wire.TensorAssembler(self.schema)

    @property
    def upload_slots(self) -> asyncio.Semaphore:
        return self._upload_slots

    def record_refusal(self, header: pb.UpdateHeader) -> None:
        open_round = self.check_header(header)
        client = self.registry.get(header.node_id)
        assert client is not None
        client.epsilon = max(client.epsilon, header.epsilon_spent)
        client.delta = header.delta
        open_round.answered.add(header.node_id)
        self.budget_spent.add(header.node_id)
        log.info("node %s declined round %d: %s", header.node_id, header.round,
                 header.refusal_reason)
        self.sink.event("TaskRefused", f"{header.node_id}: {header.refusal_reason}",
                        warning=True)
        open_round.check_complete(self._live_ids())

    async def accept_update(self, header: pb.UpdateHeader, delta: Weights, nbytes: int) -> None:
        """Fold a validated delta into the open round; the global model is untouched."""
        async with self._fold_lock:
            open_round = self.check_header(header)  # the round may have closed meanwhile
            await asyncio.to_thread(
                open_round.aggregator.add, header.node_id, delta, int(header.num_samples))
            open_round.answered.add(header.node_id)
            open_round.accepted.append(header.node_id)
            if "loss" in header.metrics:
                open_round.train_losses.append((header.metrics["loss"], header.num_samples))
        client = self.registry.get(header.node_id)
        assert client is not None
        client.answered += 1
        client.rounds_participated += 1
        client.epsilon = max(client.epsilon, header.epsilon_spent)
        client.delta = header.delta if header.epsilon_spent else client.delta
        self.status.bytes_up += nbytes
        if self.metrics is not None:
            self.metrics.update_accepted()
            self.metrics.bytes_received(nbytes)
        open_round.check_complete(self._live_ids())

    # ----------------------------------------------------------------- the job

    async def run(self) -> FederatedJobStatus:
        if self._ended():  # restarted after the job ended (see _resume_from_checkpoint)
            # The status as it ended, client counts included (no client is registered now).
            self.sink.publish_job(self.status.model_copy(deep=True))
            self._stop_clients()
            self.done.set()
            return self.status
        self.status.phase = Phase.running
        self.status.start_time = self.status.start_time or _utc_now()
        self._condition(ConditionType.READY, "True", Reason.COORDINATOR_READY,
                        "coordinator is serving")
        self._publish_status()
        self.sink.event("Running", f"coordinator up; {self.spec.rounds} rounds planned")
        try:
            await self._wait_for_clients()
            while self.round < self.spec.rounds and self.status.phase not in TERMINAL_PHASES:
                self._apply_spec_edits()
                if self.round >= self.spec.rounds:
                    break
                if self._budget_exhausted_before_round() or self._local_budget_exhausted():
                    break
                ok = await self._run_round_with_retries(self.round + 1)
                if not ok:
                    break
                if self._converged():
                    break
            if self.status.phase not in TERMINAL_PHASES:
                self._finish(Phase.succeeded, Reason.ROUNDS_COMPLETED,
                             f"completed {self.round} rounds")
        except asyncio.CancelledError:
            self._finish(Phase.stopped, Reason.STOPPED, "coordinator stopped")
            raise
        finally:
            self._stop_clients()
            for client in self.registry.all():
                client.state = "idle"
                self._publish_client(client)
            self.done.set()
        return self.status

    def _apply_spec_edits(self) -> None:
        """Take up edits of the fields that may change while a job runs (rounds,
        clientsPerRound): the operator writes them into the mounted job file. Anything else
        in the file is ignored here; the operator refuses such edits."""
        if self.job_file is None:
            return
        try:
            edited = load_job(self.job_file).spec
        except (ManifestError, OSError) as error:
            log.warning("ignoring unreadable job file %s: %s", self.job_file, error)
            return
        changes = {field: getattr(edited, field) for field in ("rounds", "clients_per_round")
                   if getattr(edited, field) != getattr(self.spec, field)}
        if not changes:
            return
        try:
            self.spec = FederatedJobSpec.model_validate({**self.spec.model_dump(), **changes})
        except ValueError as error:
            log.warning("ignoring spec edit %s: %s", changes, error)
            return
        log.info("spec edited while running: %s", changes)
        self.sink.event(Reason.SPEC_CHANGE_APPLIED, f"now running with {changes}")

    async def _wait_for_clients(self) -> None:
        wanted = self.spec.simulation.clients or self.spec.min_clients
        deadline = time.monotonic() + self.registration_timeout
        while True:
            live = len(self.registry.live(self.spec.client_selector))
            if live >= wanted:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0 and live >= self.spec.min_clients:
                log.warning("starting with %d of %d expected clients", live, wanted)
                return
            self.registry.changed.clear()
            try:
                await asyncio.wait_for(self.registry.changed.wait(),
                                       timeout=max(0.5, min(remaining, 5.0)))
            except TimeoutError:
                pass

    async def _run_round_with_retries(self, number: int) -> bool:
        for attempt in range(self.spec.round_retries + 1):
            outcome = await self._run_round(number)
            if outcome:
                return True
            if self._local_budget_exhausted():
                return False
            log.warning("round %d closed below minClients (attempt %d of %d)",
                        number, attempt + 1, self.spec.round_retries + 1)
            await self._wait_for_live(self.spec.min_clients, timeout=self.spec.round_timeout_seconds)
        self._finish(
            Phase.failed, Reason.TOO_FEW_CLIENTS,
            f"round {number} received fewer than minClients ({self.spec.min_clients}) updates "
            f"in {self.spec.round_retries + 1} attempts of {self.spec.round_timeout_seconds:g}s")
        return False

    async def _wait_for_live(self, count: int, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.registry.live(self.spec.client_selector)) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.registry.changed.clear()
            try:
                await asyncio.wait_for(self.registry.changed.wait(), timeout=min(remaining, 1.0))
            except TimeoutError:
                pass

    def _live_ids(self) -> set[str]:
        return {c.node_id for c in self.registry.live()}

    def _select(self) -> tuple[list[Client], int]:
        live = sorted((c for c in self.registry.live(self.spec.client_selector)
                       if c.node_id not in self.budget_spent), key=lambda c: c.node_id)
        wanted = self.spec.clients_to_select(len(live))
        # Over-select for the dropout seen so far, so the round still fills up — except
        # under central DP, whose accountant assumes exactly `wanted` clients are sampled.
        padding = 0.0 if self.central is not None else self.dropout_estimate
        padded = min(len(live), math.ceil(wanted / max(1e-6, 1.0 - padding)))
        return self.rng.sample(live, padded), wanted

    async def _run_round(self, number: int) -> bool:
        started = time.monotonic()
        selected, wanted = self._select()
        if len(selected) < self.spec.min_clients:
            return False
        transform, uniform = (self.central.transform, True) if self.central else (None, False)
        robust = self.spec.strategy.name in ROBUST_STRATEGIES
        task = self._task(number)
        open_round = _OpenRound(
            number=number, version=self.version, task=task,
            selected={c.node_id for c in selected}, wanted=wanted,
            aggregator=RoundAggregator(
                self.spec.strategy, self.weights, max_buffered=len(selected) if robust else 0,
                transform=transform, uniform_weights=uniform),
            deadline=started + self.spec.round_timeout_seconds,
        )
        self._open = open_round
        for client in selected:
            client.dispatched += 1
            client.tasks.put_nowait(task)
        self.status.clients = self._counts(active=len(selected))
        self._publish_status()
        try:
            await asyncio.wait_for(open_round.complete.wait(),
                                   timeout=self.spec.round_timeout_seconds)
        except TimeoutError:
            log.info("round %d deadline: %d of %d updates in", number,
                     len(open_round.accepted), len(selected))
        async with self._fold_lock:
            self._open = None  # late updates are now refused as wrong_round
        accepted = len(open_round.accepted)
        dropped = len(selected) - len(open_round.answered)
        self.dropout_estimate = 0.7 * self.dropout_estimate + 0.3 * dropped / len(selected)
        # Robust rules have their own floor (Krum needs n > 2f + 2): below it, retry.
        if accepted < max(self.spec.min_clients, minimum_updates(self.spec.strategy)):
            self.status.clients = self._counts(active=0, dropped=dropped)
            return False

        outcome = await asyncio.to_thread(open_round.aggregator.finish)
        mean_delta = outcome.mean_delta
        if self.central is not None:
            mean_delta = self.central.noised(mean_delta, averaged=len(outcome.used),
                                             generator=self.noise_generator)
        self.weights = await asyncio.to_thread(self.server_optimizer.step, self.weights,
                                               mean_delta)
        self.version += 1
        self.round = number
        for node_id in outcome.set_aside:
            client = self.registry.get(node_id)
            if client is not None:
                client.set_aside += 1
        evaluation = await asyncio.to_thread(self._evaluate)
        epsilon = self._epsilon_after_round()
        train_loss = (sum(l * n for l, n in open_round.train_losses)
                      / sum(n for _, n in open_round.train_losses)
                      if open_round.train_losses else None)
        record = RoundRecord(
            round=number, accuracy=evaluation.accuracy, loss=evaluation.loss,
            clients_selected=len(selected), clients_in=accepted, clients_dropped=dropped,
            set_aside=len(outcome.set_aside), seconds=round(time.monotonic() - started, 4),
            epsilon=epsilon, bytes_up=self.status.bytes_up, bytes_down=self.status.bytes_down,
            train_loss=train_loss, model_version=self.version)
        self.history.append(record)
        self._update_status_after_round(record, dropped)
        self._save_checkpoint()
        if self.metrics is not None:
            self.metrics.round_completed(record.seconds)
            self.metrics.round(number)
            self.metrics.accuracy(record.accuracy)
            if epsilon is not None:
                self.metrics.privacy_epsilon(epsilon)
        if self.on_round is not None:
            self.on_round(record)
        for client in self.registry.all():
            self._publish_client(client)
        self._publish_status()
        self.sink.event(Reason.ROUND_COMPLETED,
                        f"round {number}: accuracy {record.accuracy:.4f}, "
                        f"{accepted}/{len(selected)} clients")
        return True

    def _task(self, number: int) -> pb.Task:
        spec = self.spec
        privacy = spec.privacy
        settings = pb.PrivacySettings(
            mode=privacy.mode, noise_multiplier=privacy.noise_multiplier or 0.0,
            max_grad_norm=privacy.max_grad_norm, target_epsilon=privacy.target_epsilon or 0.0,
            delta=privacy.delta, accountant=privacy.accountant,
            planned_steps=0, sample_rate=0.0)
        return pb.Task(
            kind=pb.Task.TRAIN, round=number, model_version=self.version,
            local_epochs=spec.local_epochs, batch_size=spec.batch_size,
            learning_rate=spec.learning_rate, optimizer=spec.optimizer,
            proximal_mu=spec.strategy.mu if spec.strategy.name == StrategyName.fedprox else 0.0,
            privacy=settings, deadline_unix=time.time() + spec.round_timeout_seconds)

    def _evaluate(self):
        load_weights(self.model, self.weights)
        return evaluate(self.model, self.dataset.x_test, self.dataset.y_test, device=self.device)

    def _epsilon_after_round(self) -> float | None:
        if self.central is not None:
            self.central.record_round()
            return self.central.epsilon()
        if self.spec.privacy.mode == "local":
            return self.registry.max_epsilon()
        return None

    def _budget_exhausted_before_round(self) -> bool:
        if self.central is None or not self.central.next_round_would_exceed():
            return False
        self._condition(ConditionType.BUDGET_EXHAUSTED, "True", Reason.BUDGET_EXHAUSTED,
                        f"another round would exceed targetEpsilon "
                        f"{self.spec.privacy.target_epsilon}; spent {self.central.epsilon():.4f}")
        self._finish(Phase.succeeded, Reason.BUDGET_EXHAUSTED,
                     f"privacy budget exhausted after {self.round} rounds")
        return True

    def _local_budget_exhausted(self) -> bool:
        """Local DP: enough clients are live, but too few of them have budget left for a
        round to close. That is the job's privacy budget running out, a normal end
        (Succeeded, BudgetExhausted), not a shortage of clients (Failed, TooFewClients)."""
        if self.spec.privacy.mode != "local" or not self.budget_spent:
            return False
        live = self.registry.live(self.spec.client_selector)
        floor = max(self.spec.min_clients, minimum_updates(self.spec.strategy))
        with_budget = [c for c in live if c.node_id not in self.budget_spent]
        if len(with_budget) >= floor or len(live) < floor:
            return False
        spent = len(live) - len(with_budget)
        self._condition(ConditionType.BUDGET_EXHAUSTED, "True", Reason.BUDGET_EXHAUSTED,
                        f"{spent} of {len(live)} live clients declined: another round would "
                        f"exceed targetEpsilon {self.spec.privacy.target_epsilon}")
        self._finish(Phase.succeeded, Reason.BUDGET_EXHAUSTED,
                     f"privacy budget exhausted after {self.round} rounds: {spent} of "
                     f"{len(live)} clients have spent theirs")
        return True

    def _converged(self) -> bool:
        convergence = self.spec.convergence
        accuracy = self.status.accuracy or 0.0
        if convergence.target_accuracy is not None and accuracy >= convergence.target_accuracy:
            self._condition(ConditionType.CONVERGED, "True", Reason.TARGET_ACCURACY_REACHED,
                            f"accuracy {accuracy:.4f} >= target {convergence.target_accuracy}")
            self._finish(Phase.succeeded, Reason.TARGET_ACCURACY_REACHED,
                         f"target accuracy reached in round {self.round}")
            return True
        if convergence.patience is not None \
                and self.rounds_without_improvement >= convergence.patience:
            self._condition(ConditionType.CONVERGED, "True", Reason.NO_IMPROVEMENT,
                            f"no improvement over {convergence.patience} rounds")
            self._finish(Phase.succeeded, Reason.NO_IMPROVEMENT,
                         f"stopped early after round {self.round}: no improvement")
            return True
        return False

    # ------------------------------------------------------------------ status

    def _counts(self, *, active: int, dropped: int = 0) -> ClientCounts:
        return ClientCounts(registered=len(self.registry), active=active, dropped=dropped)

    def _update_status_after_round(self, record: RoundRecord, dropped: int) -> None:
        status = self.status
        improved = self.best_accuracy is None or \
            record.accuracy > self.best_accuracy + self.spec.convergence.min_delta
        self.rounds_without_improvement = 0 if improved else self.rounds_without_improvement + 1
        self.best_accuracy = max(self.best_accuracy or 0.0, record.accuracy)
        status.round = record.round
        status.accuracy = round(record.accuracy, 4)
        status.loss = round(record.loss, 4)
        status.best_accuracy = round(self.best_accuracy, 4)
        if record.epsilon is not None:
            status.epsilon = round(record.epsilon, 4)
        status.clients = self._counts(active=record.clients_in, dropped=dropped)
        if self.spec.privacy.mode == "local" and self.spec.privacy.target_epsilon:
            refusing = [c for c in self.registry.all()
                        if c.epsilon >= self.spec.privacy.target_epsilon * 0.999]
            if refusing and len(refusing) == len(self.registry):
                self._condition(ConditionType.BUDGET_EXHAUSTED, "True", Reason.BUDGET_EXHAUSTED,
                                "every client has spent its privacy budget")

    def _condition(self, type_: str, status: str, reason: str, message: str) -> None:
        self.status.conditions = upsert_condition(
            self.status.conditions, type=type_, status=status,  # type: ignore[arg-type]
            reason=reason, message=message, now=_utc_now())

    def _finish(self, phase: Phase, reason: str, message: str) -> None:
        self.status.phase = phase
        self.status.message = message
        self.status.completion_time = _utc_now()
        self.status.clients = self._counts(active=0, dropped=self.status.clients.dropped)
        if self.output_dir is not None:
            self.status.model_ref = str(self.output_dir / "model.pt")
            checkpoint.save_model(self.output_dir, self.weights)
        self._condition(ConditionType.READY, "False", reason, message)
        self._publish_status()
        if self._ended():  # after publishing: the client counts are final then
            self._save_checkpoint()
        self.sink.event(reason, message, warning=phase == Phase.failed)

    def _publish_status(self) -> None:
        registered = len(self.registry)
        self.status.clients.registered = registered
        self.status.clients_summary = f"{self.status.clients.active}/{registered}"
        if self.metrics is not None:
            self.metrics.clients(registered, len(self.registry.live()))
        self.sink.publish_job(self.status.model_copy(deep=True))

    def _publish_client(self, client: Client) -> None:
        self.sink.publish_client(client.spec, client.status(
            job=self.name, now=time.monotonic(), offline_after=self.registry.offline_after,
            wall_now=time.time()))

    def _stop_clients(self) -> None:
        stop = pb.Task(kind=pb.Task.STOP, round=self.round,
                       reason=self.status.message or self.status.phase.value)
        for client in self.registry.all():
            client.tasks.put_nowait(stop)

    def job_running(self) -> bool:
        return self.status.phase not in TERMINAL_PHASES

