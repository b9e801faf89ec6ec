"""PrivacyAccountant: history, composition against Opacus, budget enforcement, state."""

from __future__ import annotations

import json

import pytest
from fedkube.runtime.privacy import PrivacyAccountant, Step, compose_epsilon
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

DELTA = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")


def test_record_merges_consecutive_equal_mechanisms_only() -> None:
    accountant = PrivacyAccountant("rdp")
    accountant.record(noise_multiplier=1.0, sample_rate=0.1, steps=3)
    accountant.record(noise_multiplier=1.0, sample_rate=0.1)
    accountant.record(noise_multiplier=1.5, sample_rate=0.1, steps=2)
    accountant.record(noise_multiplier=1.0, sample_rate=0.1, steps=0)
    accountant.record(noise_multiplier=1.0, sample_rate=0.1, steps=5)
    assert accountant.history == (Step(1.0, 0.1, 4), Step(1.5, 0.1, 2), Step(1.0, 0.1, 5))
    assert accountant.total_steps == 11


def test_record_rejects_nonsense() -> None:
    accountant = PrivacyAccountant("rdp")
    with pytest.raises(ValueError, match="steps"):
        accountant.record(noise_multiplier=1.0, sample_rate=0.1, steps=-1)
    with pytest.raises(ValueError, match="sample_rate"):
        accountant.record(noise_multiplier=1.0, sample_rate=2.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        accountant.record(noise_multiplier=float("nan"), sample_rate=0.1)
    with pytest.raises(ValueError, match="mechanism"):
        PrivacyAccountant("gdp")  # type: ignore[arg-type]
    assert accountant.history == ()


@pytest.mark.parametrize(("mechanism", "opacus_class"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_of_a_heterogeneous_history_matches_opacus(mechanism, opacus_class) -> None:
    ours = PrivacyAccountant(mechanism)
    theirs = opacus_class()
    assert ours.epsilon(DELTA) == 0.0
    for noise, rate, steps in [(1.1, 0.02, 25), (0.9, 0.05, 10), (2.0, 0.02, 15)]:
        ours.record(noise_multiplier=noise, sample_rate=rate, steps=steps)
        for _ in range(steps):
            theirs.step(noise_multiplier=noise, sample_rate=rate)
    assert ours.history == tuple(Step(*entry) for entry in theirs.history)
    assert ours.epsilon(DELTA) == pytest.approx(theirs.get_epsilon(DELTA), rel=1e-9)


def test_would_exceed_plans_without_recording() -> None:
    accountant = PrivacyAccountant("rdp")
    accountant.record(noise_multiplier=1.0, sample_rate=0.05, steps=50)
    spent = accountant.epsilon(DELTA)
    plan = {"noise_multiplier": 1.0, "sample_rate": 0.05, "steps": 50}
    after = compose_epsilon([Step(1.0, 0.05, 100)], delta=DELTA, accountant="rdp")
    assert not accountant.would_exceed(**plan, target_epsilon=after, delta=DELTA)
    assert accountant.would_exceed(**plan, target_epsilon=after - 1e-6, delta=DELTA)
    assert accountant.epsilon(DELTA) == spent
    assert accountant.total_steps == 50


schedules = st.lists(
    st.tuples(
        st.sampled_from([0.7, 1.0, 1.5, 3.0]),
        st.sampled_from([0.01, 0.05, 0.2]),
        st.integers(min_value=1, max_value=60),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=25, deadline=None)
@given(schedule=schedules, target=st.floats(min_value=0.5, max_value=6.0))
def test_an_accountant_gated_by_would_exceed_never_exceeds_target(schedule, target) -> None:
    accountant = PrivacyAccountant("rdp")
    accepted: list[Step] = []
    for noise, rate, steps in schedule:
        before = accountant.epsilon(DELTA)
        if accountant.would_exceed(
            noise_multiplier=noise, sample_rate=rate, steps=steps, target_epsilon=target, delta=DELTA
        ):
            # A refused plan costs nothing, and running it really would have broken the budget.
            assert accountant.epsilon(DELTA) == before
            trial = PrivacyAccountant.from_state_dict(accountant.state_dict())
            trial.record(noise_multiplier=noise, sample_rate=rate, steps=steps)
            assert trial.epsilon(DELTA) > target
        else:
            accountant.record(noise_multiplier=noise, sample_rate=rate, steps=steps)
            accepted.append(Step(noise, rate, steps))
        assert accountant.epsilon(DELTA) <= target
    # Merging in the history loses nothing: the spend is that of every accepted plan.
    assert accountant.total_steps == sum(step.steps for step in accepted)
    assert accountant.epsilon(DELTA) == compose_epsilon(accepted, delta=DELTA, accountant="rdp")


@settings(max_examples=3, deadline=None)
@given(
    schedule=st.lists(
        st.tuples(st.sampled_from([1.0, 2.0]), st.sampled_from([0.05, 0.1]), st.integers(1, 10)),
        min_size=1,
        max_size=4,
    )
)
def test_prv_gated_accountant_never_exceeds_target(schedule) -> None:
    accountant = PrivacyAccountant("prv")
    for noise, rate, steps in schedule:
        plan = {"noise_multiplier": noise, "sample_rate": rate, "steps": steps}
        if not accountant.would_exceed(**plan, target_epsilon=1.0, delta=DELTA):
            accountant.record(**plan)
        assert accountant.epsilon(DELTA) <= 1.0


def test_state_dict_round_trips_through_json_as_a_copy() -> None:
    accountant = PrivacyAccountant("prv")
    accountant.record(noise_multiplier=1.2, sample_rate=0.05, steps=7)
    accountant.record(noise_multiplier=0.9, sample_rate=0.1, steps=3)
    state = json.loads(json.dumps(accountant.state_dict()))
    restored = PrivacyAccountant.from_state_dict(state)
    assert restored.mechanism == "prv"
    assert restored.history == accountant.history
    assert restored.epsilon(DELTA) == accountant.epsilon(DELTA)

    state["history"].append({"noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 100})
    assert restored.total_steps == 10
    exported = accountant.state_dict()
    exported["history"].clear()
    assert accountant.total_steps == 10


def _state(**changes):
    state = {
        "mechanism": "rdp",
        "history": [{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 4}],
    }
    state.update(changes)
    return state


@pytest.mark.parametrize(
    ("state", "error", "message"),
    [
        ({}, ValueError, "empty"),
        ({"mechanism": "rdp"}, ValueError, r"missing keys \['history'\]"),
        ({**_state(), "seed": 3}, ValueError, r"unknown keys \['seed'\]"),
        (_state(mechanism="prv"), ValueError, "'prv' cannot be loaded into an accountant of mechanism 'rdp'"),
        (_state(history={"a": 1}), TypeError, "must be a list"),
        (_state(history=[{"noise_multiplier": 1.0, "steps": 1}]), ValueError, r"history\[0\]"),
        (
            _state(history=[{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": -2}]),
            ValueError,
            r"history\[0\]: steps must be >= 0",
        ),
        (
            _state(history=[{"noise_multiplier": "1", "sample_rate": 0.1, "steps": 2}]),
            ValueError,
            "non-numeric",
        ),
        (
            _state(history=[{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 0}]),
            ValueError,
            "zero steps",
        ),
    ],
)
def test_load_state_dict_rejects_bad_state_precisely(state, error, message) -> None:
    accountant = PrivacyAccountant("rdp")
    accountant.record(noise_multiplier=2.0, sample_rate=0.2, steps=1)
    with pytest.raises(error, match=message):
        accountant.load_state_dict(state)
    assert accountant.history == (Step(2.0, 0.2, 1),)


def test_from_state_dict_takes_the_mechanism_from_the_state() -> None:
    assert PrivacyAccountant.from_state_dict(_state(mechanism="prv")).mechanism == "prv"
    with pytest.raises(ValueError, match="mechanism"):
        PrivacyAccountant.from_state_dict(_state(mechanism="gdp"))
