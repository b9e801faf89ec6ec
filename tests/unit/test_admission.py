"""Admission's pieces on their own: the pure norm and sample bounds, the registration
gate, the session book, the upload guard."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from fedkube.runtime.aggregation import AggregationConfig, RoundAggregator
from fedkube.runtime.aggregation.bounds import (
    capped_samples,
    clip_to_norm,
    norm_limit,
    update_norm,
)
from fedkube.runtime.coordinator.admission import RegistrationGate, UpdateBounds
from fedkube.runtime.coordinator.sessions import SessionBook
from fedkube.runtime.coordinator.uploads import ASSEMBLING, UploadGuard, assembling_slots
from fedkube.runtime.messages import Rejected, RejectReason
from fedkube.runtime.spec import AdmissionSpec
from hypothesis import given, settings
from hypothesis import strategies as st

FEDAVG = AggregationConfig(rule="fedavg")


def _delta(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3, 4), value), "b": torch.full((4,), value),
            "steps": torch.tensor(5)}


@settings(max_examples=25, deadline=None)
@given(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
       st.floats(min_value=1e-3, max_value=1e3))
def test_clipping_never_leaves_an_update_above_its_limit(value: float, limit: float) -> None:
    delta = _delta(value)
    norm = update_norm(delta)
    assert norm == pytest.approx(abs(value) * 4.0, rel=1e-6)  # sqrt(16) entries
    clipped = clip_to_norm(delta, norm=norm, limit=limit)
    assert update_norm(clipped) <= limit * (1 + 1e-5)
    assert torch.equal(clipped["steps"], delta["steps"])


def test_norm_limit_takes_the_tighter_of_absolute_and_relative() -> None:
    assert norm_limit([], factor=10.0, absolute=None) is None
    assert norm_limit([], factor=10.0, absolute=100.0) == 100.0
    assert norm_limit([1.0, 2.0, 3.0], factor=10.0, absolute=100.0) == 20.0
    assert norm_limit([50.0], factor=10.0, absolute=100.0) == 100.0
    assert norm_limit([1.0, math.nan], factor=3.0, absolute=None) == 3.0


def test_claimed_samples_are_capped_by_registration_and_the_job() -> None:
    assert capped_samples(10**9, registered=120, cap=None) == 120
    assert capped_samples(50, registered=120, cap=None) == 50
    assert capped_samples(500, registered=1000, cap=200) == 200
    assert capped_samples(5, registered=0, cap=None) == 0


def test_update_bounds_refuse_or_clip_relative_to_accepted_norms() -> None:
    bounds = UpdateBounds(AdmissionSpec(max_update_norm=1000.0, norm_bound_factor=10.0))
    _, first = bounds.apply("a", _delta(0.5), claimed=10, registered=10)  # norm 2
    bounds.record(first)
    with pytest.raises(Rejected) as refused:
        bounds.apply("b", _delta(6.0), claimed=10, registered=10)  # norm 24 > 10 x 2
    assert refused.value.reason is RejectReason.NORM_BOUND
    bounds.next_round()  # a new round compares with its own updates only
    assert bounds.apply("b", _delta(6.0), claimed=10, registered=10)[1].norm == 24.0
    with pytest.raises(Rejected) as unregistered:
        bounds.apply("c", _delta(0.5), claimed=10, registered=0)
    assert unregistered.value.reason is RejectReason.SAMPLE_CAP

    clipping = UpdateBounds(AdmissionSpec(max_update_norm=8.0, norm_action="clip"))
    clipped, bounded = clipping.apply("d", _delta(100.0), claimed=10**6, registered=40)
    assert bounded.clipped and bounded.capped and bounded.weight == 40
    assert update_norm(clipped) == pytest.approx(8.0, rel=1e-5)
    assert bounded.scale == pytest.approx(8.0 / 400.0)


def test_a_clip_in_the_fold_equals_folding_the_clipped_copy() -> None:
    """The round folds a clipped update as a factor on its weight, with the norm from the
    fold's own check: the mean must be that of the clipped copy, counters unscaled."""
    template = _delta(0.0)
    spec = AdmissionSpec(max_update_norm=8.0, norm_action="clip")
    fused, copied = RoundAggregator(FEDAVG, template, max_buffered=0), \
        RoundAggregator(FEDAVG, template, max_buffered=0)
    for node, value in (("a", 1.0), ("b", 100.0), ("c", -30.0)):
        delta = _delta(value)
        bounds = UpdateBounds(spec)
        stats = fused.add(node, delta, 40, bound=lambda s, b=bounds, n=node:
                          b.judge(n, s.norm, weight=40, claimed=40).scale)
        assert stats.norm == pytest.approx(update_norm(delta), rel=1e-6)
        clipped, _ = UpdateBounds(spec).apply(node, delta, claimed=40, registered=40)
        copied.add(node, clipped, 40)
    a, b = fused.finish().mean_delta, copied.finish().mean_delta
    assert torch.equal(a["steps"], b["steps"]) and int(a["steps"]) == 5
    for name in ("w", "b"):
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=0.0)


def test_a_refusing_bound_leaves_the_round_as_it_was() -> None:
    template = _delta(0.0)
    aggregator = RoundAggregator(FEDAVG, template, max_buffered=0)
    aggregator.add("a", _delta(1.0), 10)
    bounds = UpdateBounds(AdmissionSpec(max_update_norm=8.0))

    def bound(stats):
        return bounds.judge("b", stats.norm, weight=10, claimed=10).scale

    with pytest.raises(Rejected) as refused:
        aggregator.add("b", _delta(100.0), 10, bound=bound)
    assert refused.value.reason is RejectReason.NORM_BOUND
    assert aggregator.count == 1
    mean = aggregator.finish().mean_delta
    assert torch.equal(mean["w"], torch.ones(3, 4))


def test_registration_gate_caps_clients_and_rate() -> None:
    now = [0.0]
    gate = RegistrationGate(AdmissionSpec(max_clients=5, registrations_per_second=1.0,
                                          registration_burst=2), clock=lambda: now[0])
    gate.admit_new(0)
    gate.admit_new(1)
    with pytest.raises(Rejected) as limited:
        gate.admit_new(2)
    assert limited.value.reason is RejectReason.RATE_LIMITED
    now[0] = 1.0  # one token back
    gate.admit_new(2)
    with pytest.raises(Rejected) as full:
        gate.admit_new(5)
    assert full.value.reason is RejectReason.TOO_MANY_CLIENTS
    assert "maxClients" in str(full.value)


def test_sessions_are_bound_to_their_node_and_rotate() -> None:
    book = SessionBook()
    first = book.issue("a")
    assert book.holds("a", first) and not book.holds("b", first)
    assert not book.holds("a", "") and not book.holds("nobody", "")
    second = book.issue("a")
    assert not book.holds("a", first) and book.holds("a", second)
    with pytest.raises(Rejected) as refused:
        book.check("a", first)
    assert refused.value.reason is RejectReason.UNAUTHENTICATED


def test_upload_guard_cuts_off_stalls_and_frees_the_slot() -> None:
    async def scenario() -> list[RejectReason]:
        guard = UploadGuard(slots=1, idle_seconds=0.05, total_seconds=30)
        never = asyncio.Event()

        async def stalled():
            await never.wait()
            yield 1

        reasons = []
        async with guard.slot("a"):
            with pytest.raises(Rejected) as twice:
                async with guard.slot("a"):
                    pass
            reasons.append(twice.value.reason)
            with pytest.raises(Rejected) as stall:
                async for _ in guard.rest(stalled()):
                    pass
            reasons.append(stall.value.reason)
        async with guard.slot("b"):  # the slot came back
            reasons.append(None)
        assert not guard.in_flight()
        return reasons

    assert asyncio.run(scenario()) == [RejectReason.UPLOAD_IN_FLIGHT,
                                       RejectReason.UPLOAD_STALLED, None]


def test_unset_concurrent_uploads_keep_a_folding_round_within_three_models() -> None:
    model = 4 * 1_000_000  # a float32 model of a million parameters
    # Beside a float64 sum (two models) one upload fits in three models; never none.
    assert assembling_slots(model_bytes=model, sum_bytes=2 * model) == 1
    assert assembling_slots(model_bytes=model, sum_bytes=3 * model) == 1
    # A float64 model's sum is one model: two uploads fit beside it.
    assert assembling_slots(model_bytes=8_000_000, sum_bytes=8_000_000) == 2
    assert assembling_slots(model_bytes=model, sum_bytes=2 * model, budget=6) == 4
    # Robust rules buffer every update anyway: the uploads do not set their memory.
    assert assembling_slots(model_bytes=model, sum_bytes=None) == ASSEMBLING


def test_the_engine_takes_its_upload_slots_from_the_rule_unless_the_job_says() -> None:
    from fedkube.runtime.coordinator.engine import RoundEngine
    from fedkube.runtime.spec import parse_job

    def slots(**spec: object) -> int:
        job = parse_job({"apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
                         "metadata": {"name": "slots"},
                         "spec": {"model": "mlp", "data": {"dataset": "digits"}, **spec}})
        return RoundEngine(job).uploads.slots

    assert slots() == 1  # fedavg of a float32 model: the sum and one upload
    assert slots(strategy={"name": "median"}) == ASSEMBLING
    assert slots(admission={"concurrentUploads": 3}) == 3


def test_json_logs_are_one_object_per_line_with_job_round_and_node() -> None:
    import json
    import logging

    from fedkube.runtime.logs import JsonFormatter

    record = logging.LogRecord("fedkube.coordinator", logging.WARNING, __file__, 1,
                               "refused %s", ("n1",), None)
    record.job, record.round, record.node = "j", 3, "n1"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert (entry["job"], entry["round"], entry["node"]) == ("j", 3, "n1")
    assert entry["message"] == "refused n1" and entry["level"] == "WARNING"


def test_upload_guard_holds_declared_bytes_together_and_serves_waiters_in_order() -> None:
    async def scenario() -> list[str]:
        guard = UploadGuard(slots=1, slot_bytes=100, idle_seconds=1, total_seconds=30)
        order: list[str] = []
        release = {name: asyncio.Event() for name in ("small-1", "small-2", "whole", "late")}

        async def upload(name: str, nbytes: int | None) -> None:
            async with guard.slot(name, nbytes):
                order.append(f"+{name}")
                await release[name].wait()
            order.append(f"-{name}")

        tasks = [asyncio.create_task(upload("small-1", 40)),
                 asyncio.create_task(upload("small-2", 40))]
        while guard.held < 2:  # two compressed uploads share one model's room
            await asyncio.sleep(0)
        tasks.append(asyncio.create_task(upload("whole", None)))  # not said: a whole slot
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(upload("late", 10)))  # would fit, but queues behind
        for _ in range(20):
            await asyncio.sleep(0)
        assert guard.held == 2 and "+late" not in order
        release["small-1"].set()
        for _ in range(20):
            await asyncio.sleep(0)
        assert "+whole" not in order  # 60 of 100 free: the whole model waits for more
        release["small-2"].set()
        while "+whole" not in order:
            await asyncio.sleep(0)
        assert "+late" not in order  # 0 free while the whole model assembles
        release["whole"].set()
        release["late"].set()
        await asyncio.gather(*tasks)
        assert guard.peak_bytes == 100 and guard.peak_held == 2 and guard.held == 0
        return order

    assert asyncio.run(scenario()) == [
        "+small-1", "+small-2", "-small-1", "-small-2", "+whole", "-whole", "+late", "-late"]


def test_upload_guard_reserves_a_whole_slot_for_a_claim_it_cannot_trust() -> None:
    guard = UploadGuard(slots=2, slot_bytes=100, idle_seconds=1, total_seconds=30)
    assert guard.budget_bytes == 200
    assert [guard.reservation(n) for n in (None, 0, -5, 1, 100, 101, 10**12)] == [
        100, 100, 100, 1, 100, 100, 100]


def test_an_upload_that_gives_up_waiting_leaves_no_claim_behind() -> None:
    async def scenario() -> None:
        guard = UploadGuard(slots=1, slot_bytes=100, idle_seconds=1, total_seconds=0.2)
        hold = asyncio.Event()

        async def holder() -> None:
            async with guard.slot("holder"):
                await hold.wait()

        held = asyncio.create_task(holder())
        while guard.held < 1:
            await asyncio.sleep(0)
        with pytest.raises(Rejected) as busy:
            async with guard.slot("waiter"):
                pass
        assert busy.value.reason is RejectReason.UPLOAD_BUSY
        assert guard.in_flight() == {"holder"}
        hold.set()
        await held
        async with guard.slot("next"):  # the whole room is back, no stale waiter ahead
            assert guard.held == 1
        assert guard.held == 0 and not guard.in_flight()

    asyncio.run(scenario())
