"""The privacy planner's maths: what a job's DP settings will cost, before it runs.

Everything is asked of a `Budget` built exactly as the coordinator (central) or the agent
(local) builds it, so the plan's noise multiplier and epsilon curve are the numbers the
job will use. Pure arithmetic: no spec, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .analysis import Mechanism, epsilon_for, steps_within_budget
from .budget import Budget

# Noise levels compared with the calibrated one, as multiples of it.
NOISE_FACTORS: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0)


@dataclass(frozen=True)
class NoiseOption:
    """What one noise level buys: the epsilon after the planned rounds and the number of
    rounds the target allows (None without a target)."""

    noise_multiplier: float
    epsilon_after_planned: float
    rounds_within_target: int | None


@dataclass(frozen=True)
class PrivacyPlan:
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    target_epsilon: float | None
    delta: float
    epsilon_by_round: tuple[float, ...]  # epsilon spent after rounds 1..planned_rounds
    options: tuple[NoiseOption, ...]


def plan_budget(make_budget: Callable[[], Budget], *, accountant: Mechanism,
                factors: Sequence[float] = NOISE_FACTORS) -> PrivacyPlan:
    """Calibrate (or take the fixed noise) through a fresh budget from `make_budget`, play
    the planned rounds through it to get epsilon after each, and price the neighbouring
    noise levels."""
    budget = make_budget()
    mechanism = budget.mechanism
    curve = []
    for _ in range(budget.planned_rounds):
        budget.record_round()
        curve.append(budget.epsilon())
    options = tuple(
        _option(noise=mechanism.noise_multiplier * factor, budget=budget, accountant=accountant)
        for factor in factors)
    return PrivacyPlan(
        noise_multiplier=mechanism.noise_multiplier, sample_rate=mechanism.sample_rate,
        steps_per_round=mechanism.steps, planned_rounds=budget.planned_rounds,
        target_epsilon=budget.target_epsilon, delta=budget.delta,
        epsilon_by_round=tuple(curve), options=options)


def _option(*, noise: float, budget: Budget, accountant: Mechanism) -> NoiseOption:
    mechanism = budget.mechanism
    epsilon = epsilon_for(noise_multiplier=noise, sample_rate=mechanism.sample_rate,
                          steps=budget.planned_rounds * mechanism.steps, delta=budget.delta,
                          accountant=accountant)
    rounds = None
    if budget.target_epsilon is not None:
        # Rounds are whole: the most steps that fit, in rounds of `steps` each; search a
        # horizon well past the plan so "more rounds than planned" shows.
        horizon = 100 * budget.planned_rounds * mechanism.steps
        steps = steps_within_budget(noise_multiplier=noise, sample_rate=mechanism.sample_rate,
                                    target_epsilon=budget.target_epsilon, delta=budget.delta,
                                    accountant=accountant,
                                    max_steps=horizon)
        rounds = steps // mechanism.steps
    return NoiseOption(noise_multiplier=noise, epsilon_after_planned=epsilon,
                       rounds_within_target=rounds)


def format_plan(plan: PrivacyPlan, *, mode: str) -> str:
    """The plan as the table `fedkube privacy plan` prints."""
    target = "none" if plan.target_epsilon is None else f"{plan.target_epsilon:g}"
    header = (f"privacy {mode}: target epsilon {target} at delta {plan.delta:g}, "
              f"{plan.planned_rounds} rounds")
    noise = (f"noise multiplier {plan.noise_multiplier:.4f} (sample rate "
             f"{plan.sample_rate:.4g}, {plan.steps_per_round} step(s) per round)")
    lines = [header, noise, "", "round  epsilon"]
    for number, epsilon in enumerate(plan.epsilon_by_round, start=1):
        lines.append(f"{number:5d}  {epsilon:.4f}")
    lines += ["", "noise   epsilon after planned rounds   rounds within target"]
    for option in plan.options:
        rounds = "-" if option.rounds_within_target is None else str(option.rounds_within_target)
        lines.append(f"{option.noise_multiplier:6.3f}  {option.epsilon_after_planned:30.4f}"
                     f"   {rounds:>20}")
    return "\n".join(lines)
