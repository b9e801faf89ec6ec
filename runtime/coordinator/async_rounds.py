"""strategy.mode async: FedBuff (Nguyen et al., 2022) on the round engine's parts.

Clients train continuously: whenever a client is free and fewer than the concurrency
bound (clientsPerRound, or fraction of the live clients) are training, it gets a task on
the newest model. Each accepted update is bounded like a synchronous one (norm, sample
cap), then folded into a `FedBuffBuffer` with staleness weight 1/(1+s)^exponent, where s
counts the server steps since the model it was built on; past strategy.maxStaleness it is
refused (`RejectReason.STALE`). Every bufferSize updates the server steps: the server
optimizer applies the buffer, the model is evaluated, the policy judges, a checkpoint is
written and the step is published as a round record. `rounds` and status.round count
server steps here (status.serverSteps says so); a resumed job continues from the last
server step with the partly filled buffer it had (checkpoint.save_buffer after each fold:
one O(model) write per update); only the tasks out at the restart are lost, and their
clients are given new ones.

The synchronous path is untouched: this class replaces only how the next "round" is run
and what the client calls admit, on top of `RoundEngine`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

from ..aggregation import FedBuffBuffer, FedBuffConfig, Flush, StaleUpdateError, client_parameters
from ..messages import Payload, Rejected, RejectReason, Task, UpdateHeader
from ..plan import plan_for
from ..spec import FederatedJob
from . import checkpoint
from .engine import RoundEngine, Weights
from .events import RoundRecord, UpdateAccepted
from .policy import Verdict
from .registry import Client
from .selection import candidate_of, choose, record_choices

log = logging.getLogger("fedkube.coordinator")


@dataclass(frozen=True)
class InFlight:
    """A task out with a client: its number, the model version dispatched, since when."""

    task: Task
    number: int
    version: int
    started: float


def engine_for(job: FederatedJob, **options: Any) -> RoundEngine:
    """The engine that runs `job`: rounds, or FedBuff under strategy.mode async."""
    if job.spec.strategy.mode == "async":
        return AsyncEngine(job, **options)
    return RoundEngine(job, **options)


class AsyncEngine(RoundEngine):
    """Runs a strategy.mode async job. Server steps take the place of rounds."""

    def __init__(self, job: FederatedJob, **options: Any) -> None:
        super().__init__(job, **options)
        strategy = self.spec.strategy
        self.fedbuff = FedBuffConfig(buffer_size=strategy.buffer_size,
                                     staleness_exponent=strategy.staleness_exponent,
                                     max_staleness=strategy.max_staleness)
        self.losses: list[float] = []
        self.flushes: asyncio.Queue[Flush] = asyncio.Queue()
        self.buffer = self._saved_buffer() or FedBuffBuffer(self.weights, self.fedbuff)
        self.in_flight: dict[str, InFlight] = {}
        self.wake = asyncio.Event()
        self.fold_lock = asyncio.Lock()
        # Task numbers start at a random point: after a restart, an update for a task of
        # the previous coordinator must not match a new task's number.
        self.tasks_sent = secrets.randbelow(2**30)
        self.dropped = 0  # tasks that timed out since the last server step
        self.step_started = self.last_accepted = time.monotonic()
        self.stepping = False
        self.status.server_steps = self.round

    def _saved_buffer(self) -> FedBuffBuffer | None:
        """The partly filled buffer of the checkpointed model version, if one was saved
        (and the job has not ended); one already full under a lowered bufferSize is
        queued as the next step; a buffer that does not fit the model is an error."""
        if self.output_dir is None or self._ended() \
                or not (self.output_dir / checkpoint.CHECKPOINT).exists():
            return None
        state = checkpoint.load_buffer(self.output_dir, version=self.version)
        if state is None:
            return None
        held = len(state.get("node_ids", ()))
        try:
            if held >= self.fedbuff.buffer_size:  # bufferSize was lowered: step on it now
                buffer = FedBuffBuffer.restore(
                    self.weights, replace(self.fedbuff, buffer_size=held + 1), state)
                self.flushes.put_nowait(buffer.flush())
                self.losses = [float(x) for x in state.get("losses", [])]
                log.info("resumed a FedBuff buffer of %d updates (bufferSize now %d): "
                         "stepping on it", held, self.fedbuff.buffer_size)
                return None
            buffer = FedBuffBuffer.restore(self.weights, self.fedbuff, state)
        except ValueError as error:
            raise checkpoint.CheckpointError(
                f"{self.output_dir / checkpoint.BUFFER}: {error}; move it away to drop the "
                "partly filled buffer") from None
        self.losses = [float(x) for x in state.get("losses", [])]
        log.info("resumed the FedBuff buffer with %d of %d updates", buffer.count,
                 self.fedbuff.buffer_size)
        return buffer

    # ------------------------------------------------------------ client calls

    def open_stream(self, node_id: str) -> asyncio.Queue[Task]:
        queue = super().open_stream(node_id)
        out = self.in_flight.get(node_id)
        if out is not None:  # reconnected while training: its task again
            queue.put_nowait(out.task)
        self.wake.set()
        return queue

    def close_stream(self, node_id: str, queue: asyncio.Queue[Task]) -> None:
        super().close_stream(node_id, queue)
        self.wake.set()

    def model_for(self, node_id: str, version: int) -> tuple[int, Weights]:
        """The newest model, whatever version the task named: clients train on the
        newest they can get, and their update says which one that was."""
        self._client(node_id)
        if version > self.version:
            raise Rejected(RejectReason.WRONG_VERSION,
                           f"model version {version} does not exist yet ({self.version})")
        return self.version, self.weights

    def admit(self, header: UpdateHeader) -> Any:  # type: ignore[override]
        self._client(header.node_id)
        out = self.in_flight.get(header.node_id)
        if out is None or out.number != header.round:
            raise Rejected(RejectReason.WRONG_ROUND,
                           f"task {header.round} of {header.node_id!r} is not open")
        if not out.version <= header.model_version <= self.version:
            raise Rejected(RejectReason.WRONG_VERSION,
                           f"update built on model version {header.model_version}; task "
                           f"{header.round} was given version {out.version} (now {self.version})")
        staleness = self.version - header.model_version
        if staleness > self.fedbuff.max_staleness:
            raise Rejected(RejectReason.STALE,
                           f"update built on model version {header.model_version} is "
                           f"{staleness} server steps stale; at most "
                           f"{self.fedbuff.max_staleness} (strategy.maxStaleness)")
        if header.payload is Payload.DELTA and header.num_samples <= 0:
            raise Rejected(RejectReason.MALFORMED, "num_samples must be positive")
        return out

    def record_refusal(self, header: UpdateHeader) -> None:
        self.admit(header)
        self.in_flight.pop(header.node_id, None)
        if self.spec.privacy.mode == "local":
            self.budget_spent.add(header.node_id)
        client = self._client(header.node_id)
        client.epsilon = max(client.epsilon, header.epsilon_spent)
        log.info("node %s declined task %d: %s", header.node_id, header.round,
                 header.refusal_reason)
        self.wake.set()

    async def accept_update(self, header: UpdateHeader, delta: Weights, nbytes: int) -> None:
        async with self.fold_lock:
            out = self.admit(header)
            client = self._client(header.node_id)
            staleness = self.version - header.model_version
            try:
                await asyncio.to_thread(self._bound_and_fold, header, client, delta, staleness)
            except StaleUpdateError as error:
                raise Rejected(RejectReason.STALE, str(error)) from None
            except ValueError as error:
                raise Rejected(RejectReason.MALFORMED, str(error)) from None
            del self.in_flight[header.node_id]
        client.answered += 1
        client.rounds_participated += 1
        client.epsilon = max(client.epsilon, header.epsilon_spent)
        client.delta = header.delta if header.epsilon_spent else client.delta
        client.update_arrived(nbytes=nbytes, seconds=time.monotonic() - out.started,
                              metrics=header.metrics)
        if "loss" in header.metrics:
            self.losses.append(header.metrics["loss"])
        self.status.bytes_up += nbytes
        self.last_accepted = time.monotonic()
        self.events.publish(UpdateAccepted(header.node_id, nbytes))
        self.wake.set()

    def _bound_and_fold(self, header: UpdateHeader, client: Client, delta: Weights,
                        staleness: int) -> None:
        delta, bounded = self.bounds.apply(header.node_id, delta,
                                           claimed=int(header.num_samples),
                                           registered=client.spec.data_size)
        if self.buffer.add(header.node_id, delta, staleness):
            self.flushes.put_nowait(self.buffer.flush())
            self.buffer = FedBuffBuffer(self.weights, self.fedbuff)
        elif self.output_dir is not None:
            loss = header.metrics.get("loss")
            checkpoint.save_buffer(self.output_dir, version=self.version, buffer={
                **self.buffer.state_dict(),
                "losses": [*self.losses, *([loss] if loss is not None else [])]})
        self.bounds.record(bounded)

    # ----------------------------------------------------------------- the job

    async def _next_round(self) -> Verdict | None:
        """Keep the clients busy until the next server step; its verdict, if any."""
        number = self.round + 1
        if not self.stepping:  # the first step is timed from the first dispatch
            self.stepping, self.step_started = True, time.monotonic()
        # As long as a synchronous round and its retries may take without enough updates.
        patience = self.spec.round_timeout_seconds * (self.spec.round_retries + 1)
        started = time.monotonic()
        while self.flushes.empty():
            verdict = self._local_budgets_verdict()
            if verdict is not None:
                return verdict
            self._expire()
            self._fill()
            if time.monotonic() - max(started, self.last_accepted) > patience:
                return self.policy.short_round(number, self.spec.round_retries)
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=1.0)
            except TimeoutError:
                pass
        return await self._server_step(self.flushes.get_nowait())

    def _concurrency(self) -> int:
        return max(1, self.spec.clients_to_select(len(self.registry.live(self.spec.client_selector))))

    def _fill(self) -> None:
        """Dispatch tasks to free eligible clients up to the concurrency bound."""
        free = self._concurrency() - len(self.in_flight)
        if free <= 0:
            return
        idle = [c for c in self.registry.live(self.spec.client_selector)
                if c.node_id not in self.in_flight and c.node_id not in self.budget_spent]
        if not idle:
            return
        if self.selection.mode == "adaptive":
            candidates = [candidate_of(c, job=self.name, offline_after=self.registry.offline_after)
                          for c in idle]
            ids, choices = choose(candidates, wanted=free, config=self.selection, rng=self.rng)
            record_choices(idle, choices)
            by_id = {c.node_id: c for c in idle}
            chosen = [by_id[i] for i in ids]
        else:
            chosen = self.rng.sample(sorted(idle, key=lambda c: c.node_id), min(free, len(idle)))
        now = time.monotonic()
        base = plan_for(self.spec, round=1, model_version=self.version, now=time.time(),
                        client_parameters=client_parameters(self.aggregation))
        for client in chosen:
            self.tasks_sent += 1
            task = Task.train(replace(base, round=self.tasks_sent))
            self.in_flight[client.node_id] = InFlight(task, self.tasks_sent, self.version, now)
            client.dispatched += 1
            client.tasks.put_nowait(task)
        self.status.clients = self.book.counts(active=len(self.in_flight))

    def _expire(self) -> None:
        """Tasks out longer than roundTimeoutSeconds (or with a client gone) are dropped."""
        now = time.monotonic()
        live = self._live_ids()
        for node_id, out in list(self.in_flight.items()):
            if now - out.started > self.spec.round_timeout_seconds or node_id not in live:
                del self.in_flight[node_id]
                self.dropped += 1
                client = self.registry.get(node_id)
                if client is not None:
                    client.missed_last = True

    async def _server_step(self, flush: Flush) -> Verdict | None:
        async with self.fold_lock:  # no fold reads self.version while it moves
            self.weights = await asyncio.to_thread(self.server_optimizer.step, self.weights,
                                                   flush.mean_delta)
            self.version += 1
            self.round += 1
            self.bounds.next_round()
        evaluation = await asyncio.to_thread(self._evaluate)
        epsilon = self.registry.max_epsilon() if self.spec.privacy.mode == "local" else None
        losses, self.losses = self.losses, []
        now = time.monotonic()
        sent_before = self.history[-1].bytes_down if self.history else 0
        record = RoundRecord(
            round=self.round, accuracy=evaluation.accuracy, loss=evaluation.loss,
            clients_selected=len(flush.node_ids) + self.dropped,
            clients_in=len(flush.node_ids), clients_dropped=self.dropped, set_aside=0,
            seconds=round(now - self.step_started, 4), epsilon=epsilon,
            bytes_up=self.status.bytes_up, bytes_down=self.status.bytes_down,
            train_loss=sum(losses) / len(losses) if losses else None,
            model_version=self.version, mean_staleness=round(flush.mean_staleness, 4),
            round_bytes_down=max(0, self.status.bytes_down - sent_before))
        self.step_started, self.dropped = now, 0
        self.status.server_steps = self.round
        return self._record_round(record)
