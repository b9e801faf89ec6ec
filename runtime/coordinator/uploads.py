"""Upload slots that stalled or hostile clients cannot hold: at most one upload in
flight per node, a bounded number in all, an idle deadline between messages and a total
deadline per upload. A slot is freed however the upload ends.

The slots are what bounds the coordinator's memory: an upload is assembled whole (a norm
bound needs its whole norm before it may be folded) and held until its fold is done, so
`slots` assembled uploads at most exist at once, however many clients upload together.
The coordinator uses `admission.concurrentUploads` slots; unset, `assembling_slots`
picks as many as keep a round that folds into a running sum within MEMORY_BUDGET times
the model (one, beside a float64 sum of a float32 model). Others wait for a slot in
order before a byte of theirs is read (gRPC's flow control holds their chunks back on
the client), within the total deadline.
`peak_held` counts the most slots ever held at once, so tests can check the bound."""

from __future__ import annotations

import asyncio
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
    def __init__(self, *, slots: int, idle_seconds: float, total_seconds: float) -> None:
        self.idle_seconds = idle_seconds
        self.total_seconds = total_seconds
        self.slots = slots
        self._slots = asyncio.Semaphore(slots)
        self._in_flight: set[str] = set()
        self.held = 0
        self.peak_held = 0

    def in_flight(self) -> frozenset[str]:
        return frozenset(self._in_flight)

    @contextlib.asynccontextmanager
    async def slot(self, node_id: str) -> AsyncIterator[None]:
        """Hold an upload slot for `node_id` for the body; Rejected when the node already
        uploads or when no slot frees up within the total deadline. Waiters are served in
        order, and stalled holders are cut off at the idle deadline, so an honest upload
        gets a slot however many stallers keep coming back."""
        if node_id in self._in_flight:
            raise Rejected(RejectReason.UPLOAD_IN_FLIGHT,
                           f"node {node_id!r} already has an upload in flight")
        self._in_flight.add(node_id)
        try:
            try:
                await asyncio.wait_for(self._slots.acquire(), timeout=self.total_seconds)
            except TimeoutError:
                raise Rejected(RejectReason.UPLOAD_BUSY,
                               "every upload slot is busy; retry later") from None
            self.held += 1
            self.peak_held = max(self.peak_held, self.held)
            try:
                yield
            finally:
                self.held -= 1
                self._slots.release()
        finally:
            self._in_flight.discard(node_id)

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
