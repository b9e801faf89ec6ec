"""One privacy budget facade for both places that spend one.

- `Budget.local(...)`: a device's DP-SGD budget for one job. Opacus records every step it
  really takes into `budget.accountant`; the agent asks `fits_next_round()` before
  training and persists `state_dict()` before an update leaves the device.
- `Budget.central(...)`: the coordinator's user-level DP-FedAvg budget. The engine asks
  `fits_next_round(sample_rate)` with the client sampling rate the round will really use
  (selected over eligible), and records that same rate after the round: when fewer
  clients are live than planned, epsilon grows faster and the job stops sooner, instead
  of the status reporting the planned, smaller epsilon.

The noise is calibrated once, for all `planned_rounds`; when the planned rounds change
(an edit of `spec.rounds`), `replan` spreads what is left of the target over the rounds
still to come, so the guarantee stays the one asked for. Pure arithmetic: no I/O here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from .accountant import PrivacyAccountant
from .analysis import Mechanism, calibrate_noise, local_steps


@dataclass(frozen=True)
class RoundMechanism:
    """One round's worth of the subsampled Gaussian mechanism."""

    noise_multiplier: float
    sample_rate: float
    steps: int


class Budget:
    """A cumulative accountant, the mechanism one round runs, and the target it must stay
    within. Build it with `local` or `central`."""

    def __init__(self, *, accountant: PrivacyAccountant, mechanism: RoundMechanism,
                 target_epsilon: float | None, delta: float, planned_rounds: int,
                 fixed_noise: bool) -> None:
        self.accountant = accountant
        self.mechanism = mechanism
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.planned_rounds = planned_rounds
        self._fixed_noise = fixed_noise

    # ------------------------------------------------------------ constructors

    @classmethod
    def local(cls, *, samples: int, batch_size: int, local_epochs: int, planned_rounds: int,
              target_epsilon: float | None, delta: float, accountant: str = "rdp",
              noise_multiplier: float | None = None) -> Budget:
        """DP-SGD with Poisson sampling on `samples` examples, calibrated for
        `planned_rounds` rounds of `local_epochs` epochs each."""
        steps, sample_rate = local_steps(samples, batch_size, local_epochs)
        return cls._calibrated(mechanism=accountant, sample_rate=sample_rate, steps=steps,
                               planned_rounds=planned_rounds, target_epsilon=target_epsilon,
                               delta=delta, noise_multiplier=noise_multiplier)

    @classmethod
    def central(cls, *, clients_per_round: int, population: int, planned_rounds: int,
                target_epsilon: float | None, delta: float, accountant: str = "rdp",
                noise_multiplier: float | None = None) -> Budget:
        """DP-FedAvg sampling `clients_per_round` of `population` clients each round."""
        if population < 1 or clients_per_round < 1:
            raise ValueError("central privacy needs at least one client per round")
        sample_rate = min(1.0, clients_per_round / population)
        return cls._calibrated(mechanism=accountant, sample_rate=sample_rate, steps=1,
                               planned_rounds=planned_rounds, target_epsilon=target_epsilon,
                               delta=delta, noise_multiplier=noise_multiplier)

    @classmethod
    def _calibrated(cls, *, mechanism: str, sample_rate: float, steps: int,
                    planned_rounds: int, target_epsilon: float | None, delta: float,
                    noise_multiplier: float | None) -> Budget:
        if noise_multiplier is None and target_epsilon is None:
            raise ValueError("a budget needs targetEpsilon or a fixed noiseMultiplier")
        noise = noise_multiplier if noise_multiplier is not None else calibrate_noise(
            target_epsilon=cast(float, target_epsilon), delta=delta, sample_rate=sample_rate,
            steps=planned_rounds * steps, accountant=cast(Mechanism, mechanism))
        return cls(accountant=PrivacyAccountant(mechanism=cast(Mechanism, mechanism)),
                   mechanism=RoundMechanism(noise, sample_rate, steps),
                   target_epsilon=target_epsilon, delta=delta, planned_rounds=planned_rounds,
                   fixed_noise=noise_multiplier is not None)

    # ------------------------------------------------------------ the questions

    def epsilon(self) -> float:
        """Epsilon spent so far at `delta` (0.0 before anything ran)."""
        return self.accountant.epsilon(self.delta) if self.accountant.history else 0.0

    def fits_next_round(self, sample_rate: float | None = None) -> bool:
        """Whether one more round (at `sample_rate`, default the planned one) keeps the
        spent epsilon within the target."""
        if self.target_epsilon is None or math.isinf(self.target_epsilon):
            return True
        return not self.accountant.would_exceed(
            noise_multiplier=self.mechanism.noise_multiplier,
            sample_rate=self._rate(sample_rate), steps=self.mechanism.steps,
            target_epsilon=self.target_epsilon, delta=self.delta)

    def record_round(self, sample_rate: float | None = None) -> None:
        """Account for one round at `sample_rate` (the coordinator's; DP-SGD steps are
        recorded by Opacus as they run)."""
        self.accountant.record(noise_multiplier=self.mechanism.noise_multiplier,
                               sample_rate=self._rate(sample_rate), steps=self.mechanism.steps)

    def replan(self, planned_rounds: int, *, rounds_done: int) -> None:
        """The job now plans `planned_rounds` rounds: recalibrate the noise so that what
        is spent plus the rounds still to come meets the target (a fixed noise stays)."""
        if planned_rounds == self.planned_rounds:
            return
        self.planned_rounds = planned_rounds
        if self._fixed_noise or self.target_epsilon is None:
            return
        remaining = max(1, planned_rounds - rounds_done)
        noise = calibrate_noise(
            target_epsilon=self.target_epsilon, delta=self.delta,
            sample_rate=self.mechanism.sample_rate, steps=remaining * self.mechanism.steps,
            accountant=self.accountant.mechanism, spent=self.accountant.history)
        self.mechanism = RoundMechanism(noise, self.mechanism.sample_rate, self.mechanism.steps)

    def _rate(self, sample_rate: float | None) -> float:
        rate = self.mechanism.sample_rate if sample_rate is None else float(sample_rate)
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        return rate

    # ------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant.state_dict(),
            "noise_multiplier": self.mechanism.noise_multiplier,
            "sample_rate": self.mechanism.sample_rate,
            "steps_per_round": self.mechanism.steps,
            "planned_rounds": self.planned_rounds,
            "fixed_noise": self._fixed_noise,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved budget: its history and its noise (calibrated once; a
        recalibration from scratch would spend the whole target again)."""
        self.accountant = PrivacyAccountant.from_state_dict(state["accountant"])
        self.mechanism = RoundMechanism(
            float(state["noise_multiplier"]),
            float(state.get("sample_rate", self.mechanism.sample_rate)),
            int(state.get("steps_per_round", self.mechanism.steps)))
        self.planned_rounds = int(state.get("planned_rounds", self.planned_rounds))
        self._fixed_noise = bool(state.get("fixed_noise", self._fixed_noise))
