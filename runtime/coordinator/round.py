"""One round, from selection to close: select clients, dispatch their tasks, admit and
fold each update as it arrives, close at all-in or at the deadline."""

from __future__ import annotations

import asyncio
import functools
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..aggregation import AggregateOutcome, RoundAggregator, UpdateStats
from ..messages import Payload, Rejected, RejectReason, Task, UpdateHeader
from ..plan import TrainPlan
from .admission import Bounded, UpdateBounds
from .registry import Client

Weights = dict[str, torch.Tensor]
#: Whether a node is live now (`ClientRegistry.is_live`): asked of the selected nodes
#: only, so an arrival costs O(selected), never O(registered).
IsLive = Callable[[str], bool]


def select_clients(eligible: Sequence[Client], *, wanted: int, expected_dropout: float,
                   rng: random.Random) -> list[Client]:
    """`wanted` clients, over-selected for the dropout seen so far so the round still fills
    up; drawn from `eligible` in node-id order, so a seeded rng gives the same choice."""
    ordered = sorted(eligible, key=lambda c: c.node_id)
    padded = min(len(ordered), math.ceil(wanted / max(1e-6, 1.0 - expected_dropout)))
    return rng.sample(ordered, padded)


@dataclass(frozen=True)
class RoundResult:
    """What a closed round produced; `aggregate` is None when too few updates arrived."""

    number: int
    selected: int
    accepted: tuple[str, ...]
    dropped: int
    aggregate: AggregateOutcome | None
    train_loss: float | None


FOLD_TOGETHER = 8
"""The most waiting deltas folded in one pass over the sum (the compiled fold's widest);
the aggregator holds up to this many minus one (`RoundAggregator(hold=...)`)."""


@dataclass(frozen=True, eq=False)
class _Waiting:
    """A delta waiting for the fold, and where its caller awaits the answer."""

    header: UpdateHeader
    delta: Weights
    answer: asyncio.Future[Bounded]


@dataclass
class Round:
    """The open round's state. Its methods are called from the event loop; folding runs
    in a worker thread under `fold_lock`, so a close never races a fold. `aggregator`
    should hold `FOLD_TOGETHER - 1` deltas, so that a batch of waiting ones is folded
    in one pass (`fold`)."""

    plan: TrainPlan
    selected: dict[str, Client]
    wanted: int
    eligible: int  # clients it was drawn from (the sampling rate is selected / eligible)
    floor: int  # the fewest updates that make the round count
    aggregator: RoundAggregator
    bounds: UpdateBounds
    epsilon_cap: float | None = None  # local DP: the most a client may report spent
    # Per-client plans where they differ from `plan` (localWork: adaptive gives slower
    # clients fewer local steps); and each client's full step count, the cap of the steps
    # it may claim for FedNova's normalisation.
    plans: dict[str, TrainPlan] = field(default_factory=dict)
    planned_steps: dict[str, int] = field(default_factory=dict)
    answered: set[str] = field(default_factory=set)
    accepted: list[str] = field(default_factory=list)
    train_losses: list[tuple[float, int]] = field(default_factory=list)
    complete: asyncio.Event = field(default_factory=asyncio.Event)
    fold_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False
    started: float = 0.0  # monotonic time of dispatch
    bytes_up: int = 0  # of the updates accepted this round, as they travelled
    _waiting: list[_Waiting] = field(default_factory=list)
    _folding: asyncio.Future[list[Bounded | Rejected]] | None = None

    @property
    def number(self) -> int:
        return self.plan.round

    def dispatch(self) -> None:
        self.started = time.monotonic()
        task = Task.train(self.plan)
        for node_id, client in self.selected.items():
            client.dispatched += 1
            plan = self.plans.get(node_id)
            client.tasks.put_nowait(task if plan is None else Task.train(plan))

    def task_for(self, node_id: str) -> Task | None:
        """The task again, for a selected client that reconnects before answering."""
        if self.closed or node_id not in self.selected or node_id in self.answered:
            return None
        return Task.train(self.plans.get(node_id, self.plan))

    # ------------------------------------------------------------ admission

    def admit(self, header: UpdateHeader) -> None:
        """Refuse early what can be refused before reading tensors (Rejected)."""
        if header.round < self.number:
            raise Rejected(RejectReason.WRONG_ROUND, f"round {header.round} is over (round "
                           f"{self.number} is open): a late update does not count", late=True)
        if header.round != self.number:
            raise Rejected(RejectReason.WRONG_ROUND,
                           f"round {header.round} is not open (current round {self.number})")
        if self.closed:
            raise Rejected(RejectReason.WRONG_ROUND, f"round {header.round} is already "
                           "closed: a late update does not count", late=True)
        if header.node_id not in self.selected:
            raise Rejected(RejectReason.NOT_SELECTED,
                           f"node {header.node_id!r} was not selected for round {header.round}")
        if header.node_id in self.answered:
            raise Rejected(RejectReason.DUPLICATE,
                           f"node {header.node_id!r} already answered round {header.round}")
        if header.model_version != self.plan.model_version:
            raise Rejected(RejectReason.WRONG_VERSION,
                           f"update built on model version {header.model_version}, round "
                           f"{header.round} uses {self.plan.model_version}")
        if header.payload is Payload.DELTA and header.num_samples <= 0:
            raise Rejected(RejectReason.MALFORMED, "num_samples must be positive")
        if not all(math.isfinite(v) for v in header.metrics.values()):
            raise Rejected(RejectReason.NON_FINITE, "metrics hold NaN or Inf")
        if self.epsilon_cap is not None and header.epsilon_spent > self.epsilon_cap * (1 + 1e-9):
            raise Rejected(RejectReason.BUDGET,
                           f"reported epsilon {header.epsilon_spent:.4f} exceeds "
                           f"targetEpsilon {self.epsilon_cap}")

    # ------------------------------------------------------------ answers

    def record_refusal(self, header: UpdateHeader, live: IsLive) -> None:
        self.admit(header)
        self.answered.add(header.node_id)
        self.check_complete(live)

    async def fold(self, header: UpdateHeader, delta: Weights, live: IsLive) -> Bounded:
        """Bound a validated delta (norm, sample count) and fold it into the running
        aggregate; the global model is untouched. Raises Rejected if the bounds refuse it
        or the round closed meanwhile.

        Deltas that arrive while a fold runs wait; whoever takes `fold_lock` next folds
        every waiting one (up to `FOLD_TOGETHER`) in one pass over the sum, each checked
        and bounded on its own first, and answers each of them. They were all in memory
        already, so folding them together costs no memory."""
        waiting = _Waiting(header, delta, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        try:
            async with self.fold_lock:
                await self._settle()
                if not waiting.answer.done():
                    await self._fold_waiting()
        except asyncio.CancelledError:
            if waiting in self._waiting:  # never taken: it was not folded
                self._waiting.remove(waiting)
            raise
        bounded = waiting.answer.result()  # raises the Rejected it got
        self.check_complete(live)
        return bounded

    async def _fold_waiting(self) -> None:
        """Admit, bound and fold the waiting deltas (under `fold_lock`); answer each."""
        batch: list[_Waiting] = []
        nodes: set[str] = set()
        for waiting in list(self._waiting):
            if len(batch) == FOLD_TOGETHER:
                break
            if waiting.header.node_id in nodes:
                continue  # the same node twice: the next batch answers the second
            self._waiting.remove(waiting)
            try:
                self.admit(waiting.header)
            except Rejected as refusal:
                waiting.answer.set_exception(refusal)
                continue
            batch.append(waiting)
            nodes.add(waiting.header.node_id)
        if not batch:
            return
        # The thread folds the batch even if this caller is cancelled meanwhile, so the
        # answers come from the work itself, and the next fold or the close waits for it.
        self._folding = asyncio.ensure_future(asyncio.to_thread(self._bound_and_add_all, batch))
        self._folding.add_done_callback(functools.partial(self._answer, batch))
        await asyncio.shield(self._folding)

    async def _settle(self) -> None:
        """Wait for a batch whose caller was cancelled to finish folding (under
        `fold_lock`)."""
        if self._folding is not None and not self._folding.done():
            await asyncio.shield(self._folding)

    def _answer(self, batch: Sequence[_Waiting], work: asyncio.Future[list[Bounded | Rejected]]
                ) -> None:
        if work.cancelled() or work.exception() is not None:
            failure = work.exception() if not work.cancelled() else None
            for waiting in batch:
                if failure is None:
                    waiting.answer.cancel()
                else:
                    waiting.answer.set_exception(failure)
            return
        for waiting, outcome in zip(batch, work.result(), strict=True):
            if isinstance(outcome, Rejected):
                waiting.answer.set_exception(outcome)
                continue
            header = waiting.header
            self.answered.add(header.node_id)
            self.accepted.append(header.node_id)
            if "loss" in header.metrics:
                self.train_losses.append((header.metrics["loss"], outcome.weight))
            waiting.answer.set_result(outcome)

    def _bound_and_add_all(self, batch: Sequence[_Waiting]) -> list[Bounded | Rejected]:
        outcomes: list[Bounded | Rejected] = []
        for waiting in batch:
            try:
                outcomes.append(self._bound_and_add(waiting.header, waiting.delta))
            except Rejected as refusal:  # the bounds' (norm, sample cap)
                outcomes.append(refusal)
            except ValueError as error:
                outcomes.append(Rejected(RejectReason.MALFORMED, str(error)))
        self.aggregator.flush()
        return outcomes

    def _bound_and_add(self, header: UpdateHeader, delta: Weights) -> Bounded:
        node_id, claimed = header.node_id, int(header.num_samples)
        weight = self.bounds.weigh(node_id, claimed=claimed,
                                   registered=self.selected[node_id].spec.data_size)
        verdict: list[Bounded] = []

        def bound(stats: UpdateStats) -> float:
            # The norm comes from the fold's own finiteness check: no second read.
            verdict.append(self.bounds.judge(node_id, stats.norm, weight=weight,
                                             claimed=claimed))
            return verdict[0].scale

        self.aggregator.add(node_id, delta, weight, bound=bound,
                            local_steps=self.counted_steps(header))
        self.bounds.record(verdict[0])
        return verdict[0]

    def counted_steps(self, header: UpdateHeader) -> int:
        """The local steps an update counts for (FedNova divides its weight by them).
        The plan fixes them wherever it has them: an honest agent takes exactly the
        planned steps, and a claim of fewer would multiply the client's per-step weight
        (one step claimed for 39 taken weighs 39 times). Only without a plan does the
        client's report count, and then at least 1."""
        planned = self.planned_steps.get(header.node_id)
        if planned:
            return planned
        steps = header.metrics.get("steps", 1)
        return max(1, int(steps)) if math.isfinite(steps) else 1

    def check_complete(self, live: IsLive) -> None:
        if len(self.accepted) >= self.wanted or not any(
                live(n) for n in self.selected if n not in self.answered):
            self.complete.set()

    # ------------------------------------------------------------ closing

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.complete.wait(), timeout=timeout)
        except TimeoutError:
            pass

    async def close(self) -> RoundResult:
        """Refuse anything later, then aggregate what arrived (if enough did)."""
        async with self.fold_lock:
            await self._settle()
            self.closed = True
        dropped = len(self.selected) - len(self.answered)
        aggregate = None
        if len(self.accepted) >= self.floor:
            aggregate = await asyncio.to_thread(self.aggregator.finish)
        losses = self.train_losses
        train_loss = (sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
                      if losses else None)
        return RoundResult(number=self.number, selected=len(self.selected),
                           accepted=tuple(self.accepted), dropped=dropped,
                           aggregate=aggregate, train_loss=train_loss)
