"""Privacy arithmetic against Opacus' own accountants and the calibration guarantees."""

from __future__ import annotations

import math

import pytest
from fedkube.runtime.privacy.analysis import (
    CALIBRATION_REL_TOL,
    RDP_ORDERS,
    Step,
    calibrate_noise,
    central_noise_std,
    central_sample_rate,
    compose_epsilon,
    epsilon_for,
    rdp_epsilon_floor,
    steps_within_budget,
)
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

DELTA = 1e-5
OPACUS = {"rdp": RDPAccountant, "prv": PRVAccountant}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")


def _opacus_epsilon(mechanism: str, schedule: list[Step], delta: float = DELTA) -> float:
    """Epsilon from Opacus' accountant stepped one optimizer step at a time."""
    accountant = OPACUS[mechanism]()
    for step in schedule:
        for _ in range(step.steps):
            accountant.step(noise_multiplier=step.noise_multiplier, sample_rate=step.sample_rate)
    return float(accountant.get_epsilon(delta))


def test_rdp_orders_are_opacus_defaults() -> None:
    assert list(RDP_ORDERS) == list(RDPAccountant.DEFAULT_ALPHAS)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
@pytest.mark.parametrize(
    ("noise", "rate", "steps"),
    [(1.0, 0.01, 100), (1.3, 0.05, 40), (0.8, 0.2, 10), (4.0, 0.1, 3), (1.5, 1.0, 5)],
)
def test_epsilon_for_matches_opacus(mechanism: str, noise: float, rate: float, steps: int) -> None:
    ours = epsilon_for(
        noise_multiplier=noise, sample_rate=rate, steps=steps, delta=DELTA, accountant=mechanism
    )
    theirs = _opacus_epsilon(mechanism, [Step(noise, rate, steps)])
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_heterogeneous_schedule_matches_opacus_rdp() -> None:
    schedule = [Step(1.0, 0.02, 30), Step(2.0, 0.05, 20), Step(1.0, 0.02, 10)]
    ours = compose_epsilon(schedule, delta=DELTA, accountant="rdp")
    assert ours == pytest.approx(_opacus_epsilon("rdp", schedule), rel=1e-9)


def test_heterogeneous_schedule_matches_opacus_prv() -> None:
    # Opacus keeps the two (1.0, 0.02) runs apart; we merge them (composition commutes), so
    # the two discretisations differ slightly: agreement within PRV's own eps_error.
    schedule = [Step(1.0, 0.02, 30), Step(2.0, 0.05, 20), Step(1.0, 0.02, 10)]
    ours = compose_epsilon(schedule, delta=DELTA, accountant="prv")
    assert ours == pytest.approx(_opacus_epsilon("prv", schedule), abs=0.02)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_order_and_splitting_of_a_schedule_do_not_change_epsilon(mechanism: str) -> None:
    split = [Step(1.0, 0.02, 10), Step(2.0, 0.05, 5), Step(1.0, 0.02, 10)]
    merged = [Step(2.0, 0.05, 5), Step(1.0, 0.02, 20)]
    assert compose_epsilon(split, delta=DELTA, accountant=mechanism) == compose_epsilon(
        merged, delta=DELTA, accountant=mechanism
    )


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_edge_cases(mechanism: str) -> None:
    common = {"delta": DELTA, "accountant": mechanism}
    assert epsilon_for(noise_multiplier=1.0, sample_rate=0.1, steps=0, **common) == 0.0
    assert epsilon_for(noise_multiplier=1.0, sample_rate=0.0, steps=10, **common) == 0.0
    assert epsilon_for(noise_multiplier=0.0, sample_rate=0.1, steps=1, **common) == math.inf
    assert compose_epsilon([], **common) == 0.0


def test_invalid_arguments_are_rejected() -> None:
    good = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1, "delta": DELTA}
    with pytest.raises(ValueError, match="accountant"):
        epsilon_for(**good, accountant="gdp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="delta"):
        epsilon_for(**{**good, "delta": 0.0}, accountant="rdp")
    with pytest.raises(ValueError, match="sample_rate"):
        epsilon_for(**{**good, "sample_rate": 1.5}, accountant="rdp")
    with pytest.raises(ValueError, match="steps"):
        epsilon_for(**{**good, "steps": -1}, accountant="rdp")


def test_epsilon_grows_with_steps_and_rate_and_shrinks_with_noise() -> None:
    def eps(noise: float, rate: float, steps: int) -> float:
        return epsilon_for(
            noise_multiplier=noise, sample_rate=rate, steps=steps, delta=DELTA, accountant="rdp"
        )

    assert eps(1.0, 0.01, 100) < eps(1.0, 0.01, 200)
    assert eps(1.0, 0.01, 100) < eps(1.0, 0.02, 100)
    assert eps(1.2, 0.01, 100) < eps(1.0, 0.01, 100)


@pytest.mark.parametrize(
    ("mechanism", "target", "rate", "steps"),
    [("rdp", 1.0, 0.02, 200), ("rdp", 3.0, 0.01, 2000), ("prv", 1.0, 0.05, 40), ("prv", 0.5, 0.1, 10)],
)
def test_calibrated_noise_is_within_target_and_minimal(
    mechanism: str, target: float, rate: float, steps: int
) -> None:
    noise = calibrate_noise(
        target_epsilon=target, delta=DELTA, sample_rate=rate, steps=steps, accountant=mechanism
    )

    def eps(z: float) -> float:
        return epsilon_for(
            noise_multiplier=z, sample_rate=rate, steps=steps, delta=DELTA, accountant=mechanism
        )

    assert eps(noise) <= target
    assert eps(noise * (1 - 2 * CALIBRATION_REL_TOL)) > target


def test_calibration_agrees_with_opacus_get_noise_multiplier() -> None:
    ours = calibrate_noise(
        target_epsilon=2.0, delta=DELTA, sample_rate=0.01, steps=500, accountant="rdp"
    )
    theirs = get_noise_multiplier(
        target_epsilon=2.0, target_delta=DELTA, sample_rate=0.01, steps=500, accountant="rdp"
    )
    # Opacus stops once epsilon is within 0.01 below target, so its sigma is at least the
    # minimal one; ours is within rel_tol above the minimal one.
    assert ours <= theirs * (1 + 2 * CALIBRATION_REL_TOL)
    assert ours >= theirs * 0.95


def test_calibration_edge_cases() -> None:
    assert (
        calibrate_noise(target_epsilon=1.0, delta=DELTA, sample_rate=0.1, steps=0, accountant="rdp")
        == 0.0
    )
    floor = rdp_epsilon_floor(DELTA)
    assert 0.05 < floor < 0.2
    with pytest.raises(ValueError, match="prv"):
        calibrate_noise(
            target_epsilon=floor / 2, delta=DELTA, sample_rate=0.1, steps=10, accountant="rdp"
        )
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise(target_epsilon=0.0, delta=DELTA, sample_rate=0.1, steps=10, accountant="rdp")


def test_prv_calibrates_below_the_rdp_floor() -> None:
    noise = calibrate_noise(
        target_epsilon=0.08, delta=DELTA, sample_rate=0.1, steps=5, accountant="prv"
    )
    assert (
        epsilon_for(noise_multiplier=noise, sample_rate=0.1, steps=5, delta=DELTA, accountant="prv")
        <= 0.08
    )


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_steps_within_budget_is_the_last_step_that_fits(mechanism: str) -> None:
    common = {
        "noise_multiplier": 1.0,
        "sample_rate": 0.05,
        "delta": DELTA,
        "accountant": mechanism,
    }
    steps = steps_within_budget(target_epsilon=2.0, max_steps=400, **common)
    assert 0 < steps < 400
    assert epsilon_for(steps=steps, **common) <= 2.0
    assert epsilon_for(steps=steps + 1, **common) > 2.0


def test_steps_within_budget_bounds() -> None:
    common = {"sample_rate": 0.05, "delta": DELTA, "accountant": "rdp"}
    assert steps_within_budget(noise_multiplier=5.0, target_epsilon=5.0, max_steps=7, **common) == 7
    assert steps_within_budget(noise_multiplier=0.3, target_epsilon=0.2, max_steps=50, **common) == 0
    assert steps_within_budget(noise_multiplier=1.0, target_epsilon=1.0, max_steps=0, **common) == 0


def test_central_dp_fedavg_parameters() -> None:
    assert central_noise_std(noise_multiplier=1.1, clip_norm=0.5, clients_per_round=10) == (
        pytest.approx(0.055)
    )
    assert central_sample_rate(clients_per_round=10, total_clients=100) == 0.1
    with pytest.raises(ValueError, match="clients_per_round"):
        central_noise_std(noise_multiplier=1.0, clip_norm=1.0, clients_per_round=0)
    with pytest.raises(ValueError, match="clients_per_round"):
        central_sample_rate(clients_per_round=11, total_clients=10)
    # DP-FedAvg accounting is the same mechanism over rounds with the client sampling rate.
    rate = central_sample_rate(clients_per_round=10, total_clients=100)
    per_round = epsilon_for(
        noise_multiplier=1.0, sample_rate=rate, steps=50, delta=DELTA, accountant="rdp"
    )
    assert per_round == pytest.approx(_opacus_epsilon("rdp", [Step(1.0, rate, 50)]), rel=1e-9)
