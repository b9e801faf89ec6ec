"""The secure-aggregation stage of a round (runtime/secagg over the open `Round`).

`SecureRound` drives a `SecAggServer` through its four phases, each closed when every
live participant has answered or at its own deadline; each client's call for a phase
waits for that close and gets what it needs next. Masked inputs go into the server's
one running sum in Z_2^32 and are never kept; a checkpoint is written only after a round
completes, when nothing of this stage is left. The released sum, divided by the number of
survivors, is the round's mean delta (equal weights: the coordinator never sees a single
client's weight-times-update). Below minClients, or when shares cannot recover a needed
secret, the round fails like any round below minClients and is retried.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..aggregation import AggregateOutcome
from ..messages import Rejected, RejectReason, UpdateHeader
from ..secagg import (
    KeyAdvert,
    MaskedInput,
    Phase,
    PhaseDeadlines,
    ProtocolError,
    Refusal,
    Roster,
    RoundFailed,
    SecAggConfig,
    SecAggServer,
    ShareBundle,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
    from_wire,
)
from ..spec import FederatedJobSpec
from ..wire import Schema
from .round import Round, RoundResult

log = logging.getLogger("fedkube.coordinator")

Weights = dict[str, torch.Tensor]

_REASONS = {
    Refusal.WRONG_ROUND: RejectReason.WRONG_ROUND,
    Refusal.WRONG_PHASE: RejectReason.SECAGG_PHASE,
    Refusal.NOT_PARTICIPANT: RejectReason.NOT_SELECTED,
    Refusal.DUPLICATE: RejectReason.DUPLICATE,
    Refusal.MALFORMED: RejectReason.MALFORMED,
    Refusal.BAD_SHAPE: RejectReason.BAD_SHAPE,
    Refusal.FORGED: RejectReason.SECAGG_FORGED,
}
_PHASES = (Phase.ADVERTISE, Phase.SHARE, Phase.MASKED_INPUT, Phase.UNMASK)


def secure_config(spec: FederatedJobSpec) -> SecAggConfig:
    """The protocol's settings from the job's spec. The masked-input phase spans local
    training, so it gets the round's deadline; the key and share exchanges are short."""
    secure = spec.secure_aggregation
    short = max(5.0, min(30.0, spec.round_timeout_seconds / 4))
    return SecAggConfig(
        threshold=secure.threshold, neighbours=secure.neighbours,
        value_range=secure.value_range, min_clients=max(2, spec.min_clients),
        deadlines=PhaseDeadlines(advertise=short, share=short,
                                 masked_input=spec.round_timeout_seconds, unmask=short),
        quantize_bits=spec.compression.quantize_bits)


def distributed_noise_std(*, noise_multiplier: float, clip_norm: float,
                          guaranteed_survivors: int) -> float:
    """Each client's share of central DP noise under secure aggregation: the sum of the
    noise of any `guaranteed_survivors` clients has std noise_multiplier * clip_norm, what
    central DP-FedAvg adds to the sum. More survivors only add noise, so the accountant,
    which counts this minimum, never overstates the privacy."""
    if guaranteed_survivors < 1:
        raise ValueError(f"guaranteed_survivors must be >= 1, got {guaranteed_survivors}")
    return noise_multiplier * clip_norm / math.sqrt(guaranteed_survivors)


class SecureRound:
    def __init__(self, opened: Round, *, config: SecAggConfig, seed: int, schema: Schema,
                 live: Callable[[str], bool]) -> None:
        self.opened = opened
        self.schema = schema
        self.live = live
        length = sum(math.prod(spec.shape) for spec in schema.values())
        self.server = SecAggServer(round=opened.number, selected=opened.selected,
                                   length=length, config=config, seed=seed)
        self._progress = asyncio.Event()
        self._closed = {phase: asyncio.Event() for phase in _PHASES}
        self._outbox: dict[Phase, dict[str, Any]] = {}
        self._finishing = False
        self.failure: str | None = None
        self.headers: dict[str, UpdateHeader] = {}  # metrics and sample counts, no tensors

    @property
    def length(self) -> int:
        return self.server.length

    def wire_width(self) -> int:
        """Bytes per coordinate of a masked input on the wire: the fewest the round's ring
        allows (known once advertising has closed)."""
        encoding = self.server.encoding
        if encoding is None:
            raise Rejected(RejectReason.SECAGG_PHASE, "a masked input before the roster: "
                           "advertising has not closed")
        return encoding.width

    def from_wire(self, data: np.ndarray) -> np.ndarray:
        """Ring elements from a masked input's bytes (see `wire_width`)."""
        try:
            return from_wire(data, self.wire_width(), self.length)
        except ValueError as error:
            raise Rejected(RejectReason.BAD_SHAPE, str(error)) from None

    # ------------------------------------------------------------ client calls

    async def advertise(self, advert: KeyAdvert) -> Roster:
        self._call(self.server.receive_advert, advert)
        return await self._answer(Phase.ADVERTISE, advert.node_id)

    async def share(self, bundle: ShareBundle) -> ShareDelivery:
        self._call(self.server.receive_shares, bundle)
        return await self._answer(Phase.SHARE, bundle.node_id)

    def receive_masked(self, header: UpdateHeader, vector: np.ndarray) -> None:
        """Fold a masked input into the running sum (the vector is not kept)."""
        self._call(self.server.receive_masked, MaskedInput(header.node_id, header.round, vector))
        self.headers[header.node_id] = header
        self.opened.answered.add(header.node_id)

    async def unmask_request(self, node_id: str) -> UnmaskRequest:
        return await self._answer(Phase.MASKED_INPUT, node_id)

    async def unmask(self, response: UnmaskResponse) -> None:
        if self._finishing:
            raise Rejected(RejectReason.SECAGG_PHASE, "the unmask phase has closed")
        self._call(self.server.receive_unmask, response)
        await self._answer(Phase.UNMASK, response.node_id)

    def _call(self, receive: Callable[[Any], None], message: Any) -> None:
        if self.failure is not None:
            raise Rejected(RejectReason.SECAGG_FAILED, self.failure)
        try:
            receive(message)
        except ProtocolError as error:
            raise Rejected(_REASONS[error.refusal], str(error)) from None
        self._progress.set()

    async def _answer(self, phase: Phase, node_id: str) -> Any:
        await self._closed[phase].wait()
        if self.failure is not None:
            raise Rejected(RejectReason.SECAGG_FAILED, self.failure)
        if phase is Phase.UNMASK:
            return None
        reply = self._outbox[phase].get(node_id)
        if reply is None:
            raise Rejected(RejectReason.NOT_SELECTED, f"node {node_id!r} was left out of "
                           f"round {self.opened.number} after phase {phase.value} (too few of "
                           "its neighbours answered)")
        return reply

    # ------------------------------------------------------------ the stage

    async def run(self) -> RoundResult:
        """All four phases; the round's result (aggregate None when it failed)."""
        closes = {Phase.ADVERTISE: self.server.close_advertising,
                  Phase.SHARE: self.server.close_sharing,
                  Phase.MASKED_INPUT: self.server.close_masking}
        aggregate = None
        try:
            for phase in _PHASES:
                await self._wait_for_phase()
                if phase is Phase.UNMASK:
                    self._finishing = True
                    result = await asyncio.to_thread(self.server.finish)
                    aggregate = AggregateOutcome(self._mean(result.total, len(result.survivors)),
                                                 used=result.survivors, set_aside=())
                else:
                    self._outbox[phase] = closes[phase]()
                log.info("round %d: secure phase %s closed (%s)", self.opened.number,
                         phase.value, self.server.state_summary())
                self._closed[phase].set()
        except RoundFailed as error:
            self.failure = str(error)
            log.warning("round %d: secure aggregation failed: %s", self.opened.number, error)
            for event in self._closed.values():
                event.set()
        await self.opened.close()  # late plain updates are refused as wrong_round from now
        used = aggregate.used if aggregate is not None else ()
        losses = [(h.metrics["loss"], h.num_samples) for n, h in self.headers.items()
                  if n in used and "loss" in h.metrics]
        train_loss = (sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
                      if losses else None)
        return RoundResult(number=self.opened.number, selected=len(self.opened.selected),
                           accepted=tuple(used), dropped=len(self.opened.selected) - len(used),
                           aggregate=aggregate, train_loss=train_loss)

    async def _wait_for_phase(self) -> None:
        """Until every live participant of the open phase answered, or its deadline."""
        while not self.server.expired():
            waiting = {n for n in self.server.expected() if self.live(n)}
            if self.server.phase is not Phase.UNMASK:  # nodes that declined (their budget)
                waiting -= self.opened.answered
            if not waiting:
                return
            self._progress.clear()
            remaining = self.server.deadline - time.monotonic()
            try:  # woken by an answer; at least once a second to see nodes leave
                await asyncio.wait_for(self._progress.wait(), timeout=min(1.0, remaining))
            except TimeoutError:
                pass

    def _mean(self, total: np.ndarray, survivors: int) -> Weights:
        flat = torch.from_numpy(total / survivors)
        mean: Weights = {}
        offset = 0
        for name, spec in self.schema.items():
            size = math.prod(spec.shape)
            mean[name] = flat[offset:offset + size].reshape(spec.shape).to(torch.float32)
            offset += size
        return mean
