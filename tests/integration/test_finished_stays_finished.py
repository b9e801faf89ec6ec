"""A coordinator restarted after its job finished (in a cluster: the Deployment restarts it
when a last status write timed out) reports the finished phase and never runs again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from rawclient import RawClient, filled, job, start

pytestmark = pytest.mark.timeout(120)


async def _run_once(output: Path):
    coordinator = await start(job("once", rounds=1), registration_timeout=30, output_dir=output)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
        client = await RawClient.join(channel, "only")
        await client.next_task()
        assert await client.submit(filled(coordinator.initial, 0.1)) == "accepted"
        status = await asyncio.wait_for(coordinator.finished, timeout=60)
        client.leave()
    return status


async def _restart(output: Path):
    coordinator = await start(job("once", rounds=1), registration_timeout=30, output_dir=output)
    status = await asyncio.wait_for(coordinator.finished, timeout=60)
    return status, [s.phase.value for s in coordinator.sink.statuses]


def test_a_restarted_coordinator_reports_the_finished_phase(tmp_path: Path) -> None:
    first = asyncio.run(_run_once(tmp_path))
    assert first.phase.value == "Succeeded" and first.round == 1
    again, published = asyncio.run(_restart(tmp_path))
    assert published and "Running" not in published
    assert again.phase.value == "Succeeded" and again.round == 1
    assert again.completion_time == first.completion_time
