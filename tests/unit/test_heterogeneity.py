"""Heterogeneous devices, without a network: FedNova against its formula, FedBuff's
staleness weighting and flushes, adaptive selection's preferences, adaptive local work,
the drills, and the spec's refusals."""

from __future__ import annotations

import math
import random

import pytest
import torch
from fedkube.runtime.aggregation import (
    AggregationConfig,
    FedBuffBuffer,
    FedBuffConfig,
    NormalizedSum,
    RoundAggregator,
    StaleUpdateError,
    fednova_reference,
    staleness_weight,
)
from fedkube.runtime.coordinator.local_work import full_steps, local_steps, target_seconds
from fedkube.runtime.coordinator.selection import Candidate, SelectionConfig, choose, draw_size
from fedkube.runtime.plan import Drills, plan_for
from fedkube.runtime.spec import ManifestError, parse_job_spec
from fedkube.runtime.wire import convert


def _delta(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}


# ------------------------------------------------------------------ FedNova

def test_fednova_matches_its_formula_and_differs_from_fedavg() -> None:
    deltas = [_delta(i) for i in range(3)]
    samples, steps = [10, 30, 60], [2, 5, 20]
    total = sum(samples)
    p = [n / total for n in samples]
    tau_eff = sum(pi * t for pi, t in zip(p, steps, strict=True))
    by_hand = {k: tau_eff * sum(pi * d[k] / t for pi, d, t in zip(p, deltas, steps, strict=True))
               for k in deltas[0]}
    folded = NormalizedSum(deltas[0])
    for d, n, t in zip(deltas, samples, steps, strict=True):
        folded.add(d, n, t)
    reference = fednova_reference(deltas, samples, steps)
    for name, value in by_hand.items():
        torch.testing.assert_close(folded.mean()[name], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(reference[name], value, rtol=1e-5, atol=1e-6)
    assert folded.effective_steps == pytest.approx(tau_eff)
    # With unequal steps it is not FedAvg: the long-training client no longer dominates.
    fedavg = {k: sum(pi * d[k] for pi, d in zip(p, deltas, strict=True)) for k in deltas[0]}
    assert not torch.allclose(folded.mean()["w"], fedavg["w"])


def test_fednova_with_equal_steps_is_fedavg_and_refuses_bad_steps() -> None:
    deltas = [_delta(i) for i in range(4)]
    samples = [5, 7, 11, 13]
    nova = RoundAggregator(AggregationConfig(rule="fednova"), deltas[0], max_buffered=0)
    avg = RoundAggregator(AggregationConfig(rule="fedavg"), deltas[0], max_buffered=0)
    for i, (d, n) in enumerate(zip(deltas, samples, strict=True)):
        nova.add(f"n{i}", d, n, local_steps=6)
        avg.add(f"n{i}", d, n)
    a, b = nova.finish().mean_delta, avg.finish().mean_delta
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    folded = NormalizedSum(deltas[0])
    with pytest.raises(ValueError, match="local steps"):
        folded.add(deltas[0], 5, 0)
    assert folded.count == 0


# ------------------------------------------------------------------ FedBuff

def test_staleness_weight_is_one_over_sqrt_one_plus_s() -> None:
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == pytest.approx(0.5)
    assert staleness_weight(8, exponent=1.0) == pytest.approx(1 / 9)
    assert staleness_weight(5, exponent=0.0) == 1.0
    with pytest.raises(ValueError, match="staleness"):
        staleness_weight(-1)


def test_fedbuff_flushes_at_k_with_the_staleness_weighted_mean() -> None:
    deltas = [_delta(i) for i in range(3)]
    stale = [0, 3, 8]
    buffer = FedBuffBuffer(deltas[0], FedBuffConfig(buffer_size=3, max_staleness=10))
    full = [buffer.add(f"n{i}", d, s) for i, (d, s) in enumerate(zip(deltas, stale, strict=True))]
    assert full == [False, False, True]
    flush = buffer.flush()
    expected = {k: sum(staleness_weight(s) * d[k] for d, s in zip(deltas, stale, strict=True)) / 3
                for k in deltas[0]}
    for name, value in expected.items():
        torch.testing.assert_close(flush.mean_delta[name], value, rtol=1e-5, atol=1e-6)
    assert flush.node_ids == ("n0", "n1", "n2")
    assert flush.mean_staleness == pytest.approx(11 / 3)
    with pytest.raises(RuntimeError):
        buffer.flush()


def test_fedbuff_refuses_stale_and_overflowing_updates_without_change() -> None:
    d = _delta(0)
    buffer = FedBuffBuffer(d, FedBuffConfig(buffer_size=2, max_staleness=2))
    with pytest.raises(StaleUpdateError, match="3 server steps stale"):
        buffer.add("late", d, 3)
    assert buffer.count == 0
    bad = {"w": torch.full((3, 4), math.nan), "b": torch.zeros(4)}
    with pytest.raises(ValueError):
        buffer.add("nan", bad, 0)
    assert buffer.count == 0
    buffer.add("a", d, 0)
    buffer.add("b", d, 1)
    with pytest.raises(ValueError, match="full"):
        buffer.add("c", d, 0)


def test_fedbuff_buffer_state_round_trip_continues_the_same_sum() -> None:
    deltas = [_delta(i) for i in range(3)]
    config = FedBuffConfig(buffer_size=3, max_staleness=10)
    whole = FedBuffBuffer(deltas[0], config)
    half = FedBuffBuffer(deltas[0], config)
    for i, (d, s) in enumerate(zip(deltas[:2], [0, 3], strict=True)):
        whole.add(f"n{i}", d, s)
        half.add(f"n{i}", d, s)
    state = torch_round_trip(half.state_dict())
    resumed = FedBuffBuffer.restore(deltas[0], config, state)
    assert resumed.count == 2
    whole.add("n2", deltas[2], 1)
    assert resumed.add("n2", deltas[2], 1)  # full now, like the uninterrupted one
    a, b = whole.flush(), resumed.flush()
    assert a.node_ids == b.node_ids and a.staleness == b.staleness
    for name in a.mean_delta:
        torch.testing.assert_close(a.mean_delta[name], b.mean_delta[name], rtol=0, atol=0)
    # A saved buffer of another model, or one already full under a smaller K, is refused.
    other = {"w": torch.zeros(2, 2), "b": torch.zeros(4)}
    with pytest.raises(ValueError, match="tensor 'w'"):
        FedBuffBuffer.restore(other, config, state)
    with pytest.raises(ValueError, match="bufferSize is 2"):
        FedBuffBuffer.restore(deltas[0], FedBuffConfig(buffer_size=2), state)


def torch_round_trip(state: dict) -> dict:
    """What torch.save then torch.load(weights_only=True) gives back, as a checkpoint."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ------------------------------------------------------------------ selection

def _fleet() -> list[Candidate]:
    fast = [Candidate(f"fast-{i}", samples=100, loss=1.0, seconds=1.0, reliability=1.0,
                      dispatched=5) for i in range(6)]
    slow = [Candidate(f"slow-{i}", samples=100, loss=1.0, seconds=10.0, reliability=1.0,
                      dispatched=5) for i in range(3)]
    return [*fast, *slow]


def test_adaptive_prefers_fast_high_loss_clients_and_explains_each_choice() -> None:
    fleet = [*_fleet(), Candidate("lossy", samples=100, loss=3.0, seconds=1.0,
                                  reliability=1.0, dispatched=5)]
    picked, why = choose(fleet, wanted=4, config=SelectionConfig(mode="adaptive", exploration=0),
                         rng=random.Random(0))
    assert picked[0] == "lossy"  # the highest statistical utility
    assert not any(p.startswith("slow") for p in picked)
    assert why["lossy"].reason == "utility" and why["lossy"].score == pytest.approx(300)
    assert why["slow-0"].picked is False
    assert why["slow-0"].score == pytest.approx(100 * (1 / 10) ** 2)  # Oort's penalty


def test_adaptive_explores_unmeasured_clients_first() -> None:
    fleet = [*_fleet(), Candidate("new-a", samples=100), Candidate("new-b", samples=100)]
    picked, why = choose(fleet, wanted=5, config=SelectionConfig(mode="adaptive",
                                                                 exploration=0.4),
                         rng=random.Random(1))
    assert {"new-a", "new-b"} <= set(picked)
    assert why["new-a"].reason == "exploration"
    assert sum(1 for p in picked if why[p].reason == "utility") == 3


def test_selection_avoids_unreliable_suspicious_and_quarantined_clients() -> None:
    fleet = [
        Candidate("ok-1", samples=10, loss=1.0, seconds=1.0, reliability=1.0, dispatched=4),
        Candidate("ok-2", samples=10, loss=1.0, seconds=1.0, reliability=0.9, dispatched=4),
        Candidate("flaky", samples=1000, loss=9.0, seconds=1.0, reliability=0.2, dispatched=5),
        Candidate("shady", samples=1000, loss=9.0, seconds=1.0, suspicion=0.8, dispatched=5),
        Candidate("jailed", samples=1000, loss=9.0, seconds=1.0, quarantined=True),
        # One bad answer in two tries says little: not excluded yet.
        Candidate("young", samples=10, loss=1.0, seconds=1.0, reliability=0.5, dispatched=2),
    ]
    for mode in ("random", "adaptive"):
        config = SelectionConfig(mode=mode, exploration=0)  # type: ignore[arg-type]
        picked, why = choose(fleet, wanted=3, config=config, rng=random.Random(2))
        assert set(picked) == {"ok-1", "ok-2", "young"}
        assert why["flaky"].reason.startswith("excluded: reliability")
        assert why["shady"].reason.startswith("excluded: suspicion")
        assert why["jailed"].reason == "excluded: quarantined"
    # Too few others: the least bad excluded ones fill in, quarantined never.
    picked, why = choose(fleet, wanted=6, config=SelectionConfig(mode="adaptive"),
                         rng=random.Random(3))
    assert "jailed" not in picked and len(picked) == 5
    assert "too few others" in why["flaky"].reason


# ------------------------------------------------------------------ local work

def test_slow_clients_get_fewer_steps_to_finish_with_the_others() -> None:
    full = full_steps(samples=100, batch_size=10, epochs=2)
    assert full == 20
    target = target_seconds(configured=None, full_times=[2.0, 2.0, 2.2, 20.0], deadline=60)
    assert target == pytest.approx(2.1)
    assert local_steps(full=full, seconds_per_step=0.1, target=target, min_steps=1) == 20
    assert local_steps(full=full, seconds_per_step=1.0, target=target, min_steps=1) == 2
    assert local_steps(full=full, seconds_per_step=100.0, target=target, min_steps=1) == 1
    assert local_steps(full=full, seconds_per_step=None, target=target, min_steps=1) == 20
    assert local_steps(full=full, seconds_per_step=0.1, target=target, min_steps=1,
                       missed_last=True, last_steps=8) == 4
    assert target_seconds(configured=100.0, full_times=[], deadline=60) == pytest.approx(48)


# ------------------------------------------------------------------ drills, spec, wire

def test_speed_drill_slows_exactly_the_planned_share_and_availability_cycles() -> None:
    drills = Drills(slow_fraction=0.3, slowdown=10, availability_period_seconds=100,
                    availability_online_fraction=0.7)
    factors = [drills.slowdown_of(i, clients=20, seed=4) for i in range(20)]
    assert sorted(set(factors)) == [1.0, 10.0] and factors.count(10.0) == 6
    assert factors == [drills.slowdown_of(i, clients=20, seed=4) for i in range(20)]
    online = [drills.online(3, now=t, seed=4) for t in range(1000)]
    assert sum(online) == pytest.approx(700, abs=10)
    assert Drills().slowdown_of(3, clients=20, seed=4) == 1.0


def test_plan_carries_the_drills_and_local_steps_over_the_wire() -> None:
    spec = parse_job_spec({"model": "mlp", "simulation": {
        "clients": 10, "speed": {"slowFraction": 0.3, "slowdown": 10},
        "availability": {"periodSeconds": 30, "onlineFraction": 0.5}}})
    plan = plan_for(spec, round=1, model_version=0, now=0.0, client_parameters={})
    assert plan.drills == Drills(0.3, 10.0, 30.0, 0.5)
    from dataclasses import replace
    again = convert.plan_from_pb(convert.plan_to_pb(replace(plan, max_local_steps=7)))
    assert again.drills == plan.drills and again.max_local_steps == 7


@pytest.mark.parametrize(("spec", "field"), [
    ({"localWork": {"mode": "adaptive"}}, "localWork.mode adaptive needs strategy.name fednova"),
    ({"strategy": {"mode": "async", "name": "median"}}, "strategy.mode async"),
    ({"strategy": {"mode": "async", "name": "fednova"}}, "strategy.mode async"),
    ({"strategy": {"mode": "async"}, "privacy": {"mode": "central", "targetEpsilon": 1}},
     "strategy.mode async cannot be combined with privacy.mode central"),
    ({"selection": {"mode": "adaptive"}, "privacy": {"mode": "central", "targetEpsilon": 1}},
     "selection.mode adaptive cannot be combined with privacy.mode central"),
    ({"simulation": {"speed": {"slowdown": 0.5}}}, "spec.simulation.speed.slowdown"),
])
def test_spec_refuses_nonsense_naming_the_fields(spec: dict, field: str) -> None:
    with pytest.raises(ManifestError, match=field):
        parse_job_spec({"model": "mlp", **spec})


@pytest.mark.parametrize(("wanted", "eligible", "dropout", "expected"), [
    (5, 20, 0.0, 7),      # Oort's 1.3x: 6.5 rounds up
    (10, 40, 0.0, 13),
    (1, 10, 0.0, 2),      # one wanted, one spare
    (5, 6, 0.0, 6),       # never more than are eligible
    (10, 40, 0.5, 26),    # padded for dropout first, then over-committed
    (0, 10, 0.0, 0),
])
def test_adaptive_draws_over_commit_and_stay_within_the_eligible(
        wanted: int, eligible: int, dropout: float, expected: int) -> None:
    size = draw_size(wanted, eligible=eligible, expected_dropout=dropout, exploration=0.2)
    assert size == expected
    # Never fewer than the dropout-padded draw plus the exploration picks.
    assert size >= min(eligible, math.ceil(wanted / (1 - dropout)) + math.ceil(0.2 * wanted))


def test_exploration_beyond_the_over_commitment_still_gets_its_picks() -> None:
    assert draw_size(10, eligible=100, expected_dropout=0.0, exploration=0.5) == 15
