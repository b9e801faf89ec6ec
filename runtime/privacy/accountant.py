"""A privacy accountant that owns only its history, in the manner of Opacus' accountants
(``opacus/accountants/accountant.py``), with typed history entries, heterogeneous
composition and state saved and loaded as copies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from .analysis import (
    MECHANISMS,
    Mechanism,
    Step,
    compose_epsilon,
    validated_step,
)

__all__ = ["PrivacyAccountant", "Step"]

_STATE_KEYS = frozenset({"mechanism", "history"})
_STEP_KEYS = frozenset(Step._fields)


class PrivacyAccountant:
    """Cumulative privacy spent by a sequence of Poisson-subsampled Gaussian mechanisms.

    ``record`` appends to the history (merging with the last entry when the mechanism is the
    same); ``epsilon`` composes the whole history with the chosen accountant's maths, so a
    schedule whose noise or sample rate changes (another job plan, a larger dataset) is
    accounted correctly. Not thread-safe: one owner per accountant (an agent per job, the
    coordinator per job).
    """

    def __init__(self, mechanism: Mechanism = "rdp") -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        self._mechanism: Mechanism = mechanism
        self._history: list[Step] = []

    @property
    def mechanism(self) -> Mechanism:
        return self._mechanism

    @property
    def history(self) -> tuple[Step, ...]:
        """The recorded mechanisms, oldest first (a copy: record() is the only writer)."""
        return tuple(self._history)

    @property
    def total_steps(self) -> int:
        return sum(step.steps for step in self._history)

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Account for ``steps`` runs of a mechanism. Zero steps record nothing."""
        step = validated_step(Step(float(noise_multiplier), float(sample_rate), int(steps)))
        if step.steps == 0:
            return
        if self._history and self._history[-1][:2] == step[:2]:
            last = self._history[-1]
            self._history[-1] = last._replace(steps=last.steps + step.steps)
        else:
            self._history.append(step)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0.0 before any step)."""
        return compose_epsilon(self._history, delta=delta, accountant=self._mechanism)

    def would_exceed(
        self,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        target_epsilon: float,
        delta: float,
    ) -> bool:
        """Whether recording these steps would take epsilon at ``delta`` past the target.
        Nothing is recorded: ask first, train, then ``record`` what was actually run."""
        planned = validated_step(Step(float(noise_multiplier), float(sample_rate), int(steps)))
        spent = compose_epsilon(
            [*self._history, planned], delta=delta, accountant=self._mechanism
        )
        return spent > target_epsilon

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy of the state."""
        return {
            "mechanism": self._mechanism,
            "history": [step._asdict() for step in self._history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the history with a copy of ``state``'s, after checking its keys, its
        mechanism (an RDP history cannot be read as a PRV one) and every entry. Raises
        ``ValueError`` (``TypeError`` for a history that is not a list) saying what is wrong;
        the accountant is unchanged then."""
        if not isinstance(state, Mapping) or not state:
            raise ValueError("privacy accountant state is empty or not a mapping")
        missing = sorted(_STATE_KEYS - state.keys())
        unknown = sorted(set(state.keys()) - _STATE_KEYS)
        if missing or unknown:
            raise ValueError(
                f"privacy accountant state has missing keys {missing} and unknown keys "
                f"{unknown}; expected exactly {sorted(_STATE_KEYS)}"
            )
        if state["mechanism"] != self._mechanism:
            raise ValueError(
                f"privacy accountant state of mechanism {state['mechanism']!r} cannot be "
                f"loaded into an accountant of mechanism {self._mechanism!r}"
            )
        entries = state["history"]
        if not isinstance(entries, list):
            raise TypeError(
                f"privacy accountant history must be a list, got {type(entries).__name__}"
            )
        history = [_step_from_state(index, entry) for index, entry in enumerate(entries)]
        self._history = history

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PrivacyAccountant:
        """An accountant of the state's own mechanism, loaded from ``state``."""
        mechanism = state.get("mechanism") if isinstance(state, Mapping) else None
        if mechanism not in MECHANISMS:
            raise ValueError(
                f"privacy accountant state has mechanism {mechanism!r}; expected one of "
                f"{MECHANISMS}"
            )
        accountant = cls(cast(Mechanism, mechanism))
        accountant.load_state_dict(state)
        return accountant

    def __repr__(self) -> str:
        return f"PrivacyAccountant(mechanism={self._mechanism!r}, history={self._history!r})"



def _step_from_state(index: int, entry: Any) -> Step:
    if not isinstance(entry, Mapping) or set(entry.keys()) != _STEP_KEYS:
        raise ValueError(
            f"privacy accountant history[{index}] must be a mapping with keys "
            f"{sorted(_STEP_KEYS)}, got {entry!r}"
        )
    noise, rate, steps = entry["noise_multiplier"], entry["sample_rate"], entry["steps"]
    numbers_ok = all(
        isinstance(value, int | float) and not isinstance(value, bool) for value in (noise, rate)
    )
    if not numbers_ok or not isinstance(steps, int) or isinstance(steps, bool):
        raise ValueError(f"privacy accountant history[{index}] has non-numeric fields: {entry!r}")
    try:
        step = validated_step(Step(float(noise), float(rate), steps))
    except ValueError as error:
        raise ValueError(f"privacy accountant history[{index}]: {error}") from None
    if step.steps == 0:
        raise ValueError(f"privacy accountant history[{index}] records zero steps")
    return step
