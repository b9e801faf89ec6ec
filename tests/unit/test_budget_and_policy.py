"""The privacy budget facade and the job policy, without network or processes."""

from __future__ import annotations

import pytest
from fedkube.runtime.coordinator.policy import JobPolicy
from fedkube.runtime.privacy import Budget, epsilon_for
from fedkube.runtime.spec import ConditionType, FederatedJobSpec, Phase, Reason


def test_central_budget_calibrated_for_the_plan_stays_within_target() -> None:
    budget = Budget.central(clients_per_round=2, population=10, planned_rounds=5,
                            target_epsilon=1.0, delta=1e-5)
    for _ in range(5):
        assert budget.fits_next_round()
        budget.record_round()
    assert budget.epsilon() <= 1.0
    assert not budget.fits_next_round()


def test_central_budget_accounts_the_rate_really_used() -> None:
    """Fewer clients live than planned: each is sampled at a higher rate, and the
    accountant says so instead of reporting the planned, smaller epsilon."""
    planned = Budget.central(clients_per_round=2, population=10, planned_rounds=5,
                             target_epsilon=1.0, delta=1e-5)
    actual = Budget.central(clients_per_round=2, population=10, planned_rounds=5,
                            target_epsilon=1.0, delta=1e-5)
    planned.record_round()
    actual.record_round(sample_rate=1.0)  # only two clients live, both picked
    noise = actual.mechanism.noise_multiplier
    assert actual.epsilon() == pytest.approx(epsilon_for(
        noise_multiplier=noise, sample_rate=1.0, steps=1, delta=1e-5, accountant="rdp"))
    assert actual.epsilon() > planned.epsilon()
    assert actual.fits_next_round(0.2) >= actual.fits_next_round(1.0)


def test_replanning_more_rounds_spreads_what_is_left_and_keeps_the_target() -> None:
    budget = Budget.local(samples=500, batch_size=50, local_epochs=1, planned_rounds=3,
                          target_epsilon=2.0, delta=1e-5)
    steps, rate = budget.mechanism.steps, budget.mechanism.sample_rate
    budget.accountant.record(noise_multiplier=budget.mechanism.noise_multiplier,
                             sample_rate=rate, steps=steps)
    before = budget.mechanism.noise_multiplier
    budget.replan(6, rounds_done=1)
    assert budget.mechanism.noise_multiplier > before  # five more rounds need more noise
    for _ in range(5):
        assert budget.fits_next_round()
        budget.accountant.record(noise_multiplier=budget.mechanism.noise_multiplier,
                                 sample_rate=rate, steps=steps)
    assert budget.epsilon() <= 2.0


def test_a_fixed_noise_is_never_recalibrated_and_state_survives_a_restart() -> None:
    budget = Budget.local(samples=100, batch_size=10, local_epochs=1, planned_rounds=2,
                          target_epsilon=None, delta=1e-5, noise_multiplier=1.3)
    budget.replan(9, rounds_done=0)
    assert budget.mechanism.noise_multiplier == 1.3
    budget.record_round()
    restored = Budget.local(samples=100, batch_size=10, local_epochs=1, planned_rounds=2,
                            target_epsilon=None, delta=1e-5, noise_multiplier=2.0)
    restored.load_state_dict(budget.state_dict())
    assert restored.mechanism == budget.mechanism
    assert restored.epsilon() == pytest.approx(budget.epsilon())
    assert restored.fits_next_round()  # no target: always fits


def _policy(**spec: object) -> JobPolicy:
    return JobPolicy(FederatedJobSpec.model_validate({"model": "mlp", **spec}), min_updates=1)


def test_policy_converges_on_target_accuracy_and_on_patience() -> None:
    policy = _policy(convergence={"targetAccuracy": 0.9})
    assert policy.after_round(1, 0.5) is None
    verdict = policy.after_round(2, 0.95)
    assert verdict is not None and verdict.phase is Phase.succeeded
    assert verdict.reason == Reason.TARGET_ACCURACY_REACHED
    assert verdict.condition == ConditionType.CONVERGED

    patient = _policy(convergence={"patience": 2, "minDelta": 0.01})
    assert patient.after_round(1, 0.5) is None
    assert patient.after_round(2, 0.505) is None  # below minDelta: no improvement
    verdict = patient.after_round(3, 0.50)
    assert verdict is not None and verdict.reason == Reason.NO_IMPROVEMENT
    assert patient.best_accuracy == 0.505


def test_policy_fails_a_round_only_when_its_retries_are_spent() -> None:
    policy = _policy(roundRetries=2, minClients=2)
    assert policy.short_round(4, 0) is None and policy.short_round(4, 1) is None
    verdict = policy.short_round(4, 2)
    assert verdict is not None and verdict.phase is Phase.failed
    assert verdict.reason == Reason.TOO_FEW_CLIENTS and "round 4" in verdict.message


def test_local_budgets_running_out_is_a_success_not_a_shortage() -> None:
    policy = _policy(minClients=2, privacy={"mode": "local", "targetEpsilon": 1.0})
    assert policy.local_budgets_spent(3, live=4, with_budget=3) is None
    verdict = policy.local_budgets_spent(3, live=4, with_budget=1)
    assert verdict is not None and verdict.phase is Phase.succeeded
    assert verdict.condition == ConditionType.BUDGET_EXHAUSTED
    assert policy.local_budgets_spent(3, live=1, with_budget=0) is None  # too few live: retry


def test_policy_state_survives_a_checkpoint() -> None:
    policy = _policy(convergence={"patience": 3})
    policy.after_round(1, 0.7)
    policy.after_round(2, 0.6)
    again = _policy(convergence={"patience": 3})
    again.load_state_dict(policy.state_dict())
    assert (again.best_accuracy, again.rounds_without_improvement) == (0.7, 1)
