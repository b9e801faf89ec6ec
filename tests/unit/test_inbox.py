"""The per-client task inbox: first in, first out, a reader waits for a put, and a
cancelled reader leaves it usable (a stream that closes mid-wait)."""

from __future__ import annotations

import asyncio

import pytest
from fedkube.runtime.coordinator.inbox import Inbox


def test_items_come_out_in_the_order_they_went_in() -> None:
    inbox: Inbox[int] = Inbox()
    assert inbox.empty() and inbox.qsize() == 0
    for item in (1, 2, 3):
        inbox.put_nowait(item)
    assert inbox.qsize() == 3
    assert inbox.get_nowait() == 1
    assert asyncio.run(inbox.get()) == 2
    assert inbox.get_nowait() == 3
    with pytest.raises(asyncio.QueueEmpty):
        inbox.get_nowait()


def test_a_waiting_reader_gets_what_is_put_and_a_cancelled_one_leaves_it_usable() -> None:
    async def scenario() -> tuple[str, str]:
        inbox: Inbox[str] = Inbox()
        cancelled = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0)  # one turn of the loop: the reader is waiting now
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        inbox.put_nowait("kept")  # nobody is waiting: it stays for the next reader
        first = await inbox.get()
        reader = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0)
        assert not reader.done()
        inbox.put_nowait("woken")
        return first, await asyncio.wait_for(reader, timeout=10)

    assert asyncio.run(scenario()) == ("kept", "woken")
