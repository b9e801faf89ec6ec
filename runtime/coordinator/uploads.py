"""Upload slots that stalled or hostile clients cannot hold: at most one upload in
flight per node, a bounded number of bytes in all, an idle deadline between messages and
a total deadline per upload. A reservation is freed however the upload ends.

The reservations are what bound the coordinator's memory: an upload is assembled whole (a
norm bound needs its whole norm before it may be folded) and held until its fold is done.
The guard holds `slots` models' worth of uploads at once: the coordinator uses
`admission.concurrentUploads` slots; unset, `assembling_slots` picks as many as keep a
round that folds into a running sum within MEMORY_BUDGET times the model (one, beside a float64
sum of a float32 model). Each upload reserves the bytes its header declares
(`upload_bytes`: a compressed update is a fraction of the model, so several assemble
together in one model's room) or a whole model when it says nothing, and is refused if it
sends more. Others wait for room in order before a byte of theirs is read (gRPC's flow
control holds their chunks back on the client), within the total deadline.
`peak_held` counts the most uploads ever held at once and `peak_bytes` the most bytes
reserved, so tests can check the bound."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

from ..messages import Rejected, RejectReason

T = TypeVar("T")

#: Uploads assembled at once, when the job does not say, by a round that keeps every
#: update anyway (robust rules: its buffer, not the uploads, sets its memory): more than
#: one, so that a client on a slow link, or one that stalls until its idle deadline, does
#: not hold up every other upload of the round.
ASSEMBLING = 4
#: The most a round that folds into a running sum may hold, as a multiple of the model's
#: bytes, when the job leaves `admission.concurrentUploads` unset: the sum and the uploads
#: being assembled (issue 17: "at most 3x the model with any number of clients").
MEMORY_BUDGET = 3.0


def assembling_slots(*, model_bytes: int, sum_bytes: int | None,
                     budget: float = MEMORY_BUDGET) -> int:
    """Uploads to assemble at once when the job does not say: beside a running sum of
    `sum_bytes`, as many whole uploads of `model_bytes` as fit in `budget` times the
    model, and at least one; ASSEMBLING where updates are buffered (`sum_bytes` None)."""
    if sum_bytes is None:
        return ASSEMBLING
    if model_bytes <= 0:
        return 1
    return max(1, int((budget * model_bytes - sum_bytes) // model_bytes))


class UploadGuard:
    def __init__(self, *, slots: int, idle_seconds: float, total_seconds: float,
                 slot_bytes: int = 1) -> None:
        self.idle_seconds = idle_seconds
        self.total_seconds = total_seconds
        self.slots = slots
        self.slot_bytes = max(1, slot_bytes)
        self.budget_bytes = slots * self.slot_bytes
        self._free = self.budget_bytes
        # Waiters in arrival order: each is served only once all before it are, so a
        # stream of small uploads cannot starve a whole-model one.
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = (
            collections.deque())
        self._in_flight: set[str] = set()
        self.held = 0
        self.peak_held = 0
        self.peak_bytes = 0

    def in_flight(self) -> frozenset[str]:
        return frozenset(self._in_flight)

    def reservation(self, declared: int | None) -> int:
        """Bytes an upload reserves: what it declares, or a whole slot when it declares
        nothing or more than a slot (the assembler refuses anything past a slot anyway)."""
        if declared is None or declared <= 0 or declared > self.slot_bytes:
            return self.slot_bytes
        return declared

    @contextlib.asynccontextmanager
    async def slot(self, node_id: str, nbytes: int | None = None) -> AsyncIterator[None]:
        """Hold room for `node_id`'s upload of `nbytes` (a whole slot when None) for the
        body; Rejected when the node already uploads or when no room frees up within the
        total deadline. Waiters are served in order, and stalled holders are cut off at
        the idle deadline, so an honest upload gets room however many stallers keep
        coming back."""
        if node_id in self._in_flight:
            raise Rejected(RejectReason.UPLOAD_IN_FLIGHT,
                           f"node {node_id!r} already has an upload in flight")
        size = self.reservation(nbytes)
        self._in_flight.add(node_id)
        try:
            try:
                await asyncio.wait_for(self._reserve(size), timeout=self.total_seconds)
            except TimeoutError:
                raise Rejected(RejectReason.UPLOAD_BUSY,
                               "every upload slot is busy; retry later") from None
            self.held += 1
            self.peak_held = max(self.peak_held, self.held)
            self.peak_bytes = max(self.peak_bytes, self.budget_bytes - self._free)
            try:
                yield
            finally:
                self.held -= 1
                self._release(size)
        finally:
            self._in_flight.discard(node_id)

    async def _reserve(self, size: int) -> None:
        if not self._waiting and size <= self._free:
            self._free -= size
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, granted)
        self._waiting.append(entry)
        try:
            await granted
        except BaseException:
            if granted.done() and not granted.cancelled():
                self._release(size)  # granted just as the wait was given up
            else:
                if entry in self._waiting:  # `_grant` may have dropped it already
                    self._waiting.remove(entry)
                self._grant()  # those behind it may fit now
            raise

    def _release(self, size: int) -> None:
        self._free += size
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._waiting[0][0] <= self._free:
            size, granted = self._waiting.popleft()
            if granted.done():
                continue
            self._free -= size
            granted.set_result(None)

    async def first(self, parts: AsyncIterator[T]) -> T | None:
        """An upload's first message (its header), within the idle deadline."""
        return await self._next(parts, self.idle_seconds)

    async def rest(self, parts: AsyncIterator[T]) -> AsyncIterator[T]:
        """The remaining messages, each within the idle deadline and all within the total
        one (from now); Rejected(UPLOAD_STALLED) otherwise. Only receiving is timed:
        folding is never cancelled half-way."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_seconds
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise Rejected(RejectReason.UPLOAD_STALLED,
                               f"upload took longer than {self.total_seconds:g}s "
                               "(admission.uploadTimeoutSeconds)")
            part = await self._next(parts, min(self.idle_seconds, left))
            if part is None:
                return
            yield part

    async def _next(self, parts: AsyncIterator[T], timeout: float) -> T | None:
        try:
            async with asyncio.timeout(timeout):
                return await anext(parts, None)
        except TimeoutError:
            raise Rejected(RejectReason.UPLOAD_STALLED,
                           f"upload sent nothing for {timeout:.3g}s "
                           "(admission.uploadIdleSeconds / uploadTimeoutSeconds)") from None
