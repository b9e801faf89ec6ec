"""Destinations for received tensors that are reused from one transfer to the next.

A tensor received into fresh memory pays for its pages on first touch: for a 47 MB
update that was ~26 ms of page faults here against ~12 ms for the copy itself (glibc
hands blocks over `allocator.MMAP_BYTES` straight from mmap, and each transfer's are new).
A `BufferPool` keeps the memory of received tensors once nothing uses them any more and
hands it to the next transfer of the same size, already mapped.

A buffer goes back to the pool only when the last tensor sharing its memory is gone:
each is handed out as a numpy view of the pooled array, and torch keeps that view alive
for as long as any tensor made from it lives. So a delta the aggregator keeps (a robust
round's buffer) is never overwritten; the next transfer just gets fresh memory.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np


class BufferPool:
    """Spare byte buffers by size, `max_bytes` of them at most (the rest are freed)."""

    def __init__(self, *, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._spare: dict[int, list[np.ndarray]] = {}
        self._spare_bytes = 0
        # Returns come from whichever thread drops a tensor, and from the garbage
        # collector, which may run inside a locked section (re-entrant for that).
        self._lock = threading.RLock()
        self.reused = 0  # buffers handed out again rather than allocated

    @property
    def spare_bytes(self) -> int:
        return self._spare_bytes

    def allow(self, nbytes: int) -> None:
        """Keep at least `nbytes` of spares (a pool shared by transfers of models whose
        size it learns as they come)."""
        with self._lock:
            self.max_bytes = max(self.max_bytes, nbytes)

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 array of `nbytes` (contents undefined) that returns to the pool once
        it and everything viewing its memory are gone."""
        with self._lock:
            spares = self._spare.get(nbytes)
            base = spares.pop() if spares else None
            if base is not None:
                self._spare_bytes -= nbytes
                self.reused += 1
        if base is None:
            base = np.empty(nbytes, dtype=np.uint8)
        lent = base[:]  # the view whose death means the memory is free again
        weakref.finalize(lent, self._give_back, base)
        return lent

    def _give_back(self, base: np.ndarray) -> None:
        with self._lock:
            if self._spare_bytes + base.nbytes <= self.max_bytes:
                self._spare.setdefault(base.nbytes, []).append(base)
                self._spare_bytes += base.nbytes
