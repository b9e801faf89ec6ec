"""The privacy planner: the numbers it prints are the ones the job's budget will use."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from fedkube.runtime.coordinator.central_dp import CentralDP
from fedkube.runtime.planning import plan_job, smallest_client_samples
from fedkube.runtime.privacy import Budget
from fedkube.runtime.privacy.planner import format_plan
from fedkube.runtime.spec import FederatedJobSpec, ManifestError, parse_job_spec


def _spec(**privacy: Any) -> FederatedJobSpec:
    return parse_job_spec({"model": "mlp", "rounds": 5, "clientsPerRound": 4,
                           "simulation": {"clients": 10}, "privacy": privacy})


def test_central_plan_uses_the_coordinators_budget() -> None:
    spec = _spec(mode="central", targetEpsilon=4.0)
    plan = plan_job(spec)
    assert plan.noise_multiplier == CentralDP.for_job(spec).noise_multiplier
    assert plan.sample_rate == pytest.approx(0.4)
    curve = plan.epsilon_by_round
    assert len(curve) == 5 and all(a < b for a, b in itertools.pairwise(curve))
    assert 0.9 * 4.0 <= curve[-1] <= 4.0
    by_factor = {round(o.noise_multiplier / plan.noise_multiplier, 2): o for o in plan.options}
    assert by_factor[1.0].rounds_within_target == 5
    assert by_factor[0.5].rounds_within_target < 5 < by_factor[2.0].rounds_within_target
    assert by_factor[0.5].epsilon_after_planned > 4.0 > by_factor[2.0].epsilon_after_planned


def test_local_plan_is_the_agents_budget_for_the_smallest_client() -> None:
    spec = _spec(mode="local", targetEpsilon=3.0)
    samples = smallest_client_samples(spec)
    assert 0 < samples <= 1437 // 10  # digits' training split over 10 iid clients
    plan = plan_job(spec, samples=samples)
    agent = Budget.local(samples=samples, batch_size=spec.batch_size, local_epochs=1,
                         planned_rounds=5, target_epsilon=3.0, delta=spec.privacy.delta)
    assert plan.noise_multiplier == agent.mechanism.noise_multiplier
    assert plan.steps_per_round == agent.mechanism.steps
    assert plan.epsilon_by_round[-1] <= 3.0


def test_fixed_noise_without_target_has_no_round_limit() -> None:
    plan = plan_job(_spec(mode="central", noiseMultiplier=1.2))
    assert plan.noise_multiplier == 1.2 and plan.target_epsilon is None
    assert all(option.rounds_within_target is None for option in plan.options)
    assert "target epsilon none" in format_plan(plan, mode="central")


def test_a_job_without_privacy_is_refused_naming_the_field() -> None:
    with pytest.raises(ManifestError, match="spec.privacy.mode"):
        plan_job(_spec())


def test_the_table_lists_every_round_and_noise_level() -> None:
    plan = plan_job(_spec(mode="central", targetEpsilon=4.0))
    table = format_plan(plan, mode="central")
    assert f"noise multiplier {plan.noise_multiplier:.4f}" in table
    assert table.count("\n    5  ") == 1 and len(plan.options) == 5
