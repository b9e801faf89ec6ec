"""JobPolicy: when a job ends, and how. Retries of short rounds, convergence (target
accuracy, patience) and privacy budgets running out each become a `Verdict`: the phase to
end in, the reason and the message, and the condition to set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..spec import ConditionType, FederatedJobSpec, Phase, Reason


@dataclass(frozen=True)
class Verdict:
    phase: Phase
    reason: str
    message: str
    condition: str | None = None  # a condition type set True with the same reason
    condition_message: str | None = None


class JobPolicy:
    """Judges the job after each event that could end it. Holds the convergence state
    (best accuracy, rounds without improvement), which the checkpoint keeps."""

    def __init__(self, spec: FederatedJobSpec, *, min_updates: int) -> None:
        self.spec = spec
        self.min_updates = min_updates
        self.best_accuracy: float | None = None
        self.rounds_without_improvement = 0

    @property
    def floor(self) -> int:
        """The fewest updates that make a round count."""
        return max(self.spec.min_clients, self.min_updates)

    # ------------------------------------------------------------ rounds

    def after_round(self, round_number: int, accuracy: float) -> Verdict | None:
        """Record the round's accuracy; a Verdict when the job has converged."""
        convergence = self.spec.convergence
        improved = self.best_accuracy is None or \
            accuracy > self.best_accuracy + convergence.min_delta
        self.rounds_without_improvement = 0 if improved else self.rounds_without_improvement + 1
        self.best_accuracy = max(self.best_accuracy or 0.0, accuracy)
        if convergence.target_accuracy is not None and accuracy >= convergence.target_accuracy:
            return Verdict(Phase.succeeded, Reason.TARGET_ACCURACY_REACHED,
                           f"target accuracy reached in round {round_number}",
                           ConditionType.CONVERGED,
                           f"accuracy {accuracy:.4f} >= target {convergence.target_accuracy}")
        if convergence.patience is not None \
                and self.rounds_without_improvement >= convergence.patience:
            return Verdict(Phase.succeeded, Reason.NO_IMPROVEMENT,
                           f"stopped early after round {round_number}: no improvement",
                           ConditionType.CONVERGED,
                           f"no improvement over {convergence.patience} rounds")
        return None

    def short_round(self, number: int, attempt: int) -> Verdict | None:
        """Attempt `attempt` (0-based) of round `number` closed below the floor: a
        Verdict when the retries are spent."""
        if attempt < self.spec.round_retries:
            return None
        return Verdict(
            Phase.failed, Reason.TOO_FEW_CLIENTS,
            f"round {number} received fewer than minClients ({self.spec.min_clients}) "
            f"updates in {self.spec.round_retries + 1} attempts of "
            f"{self.spec.round_timeout_seconds:g}s")

    def rounds_done(self, rounds_done: int) -> Verdict:
        unit = "server steps" if self.spec.strategy.mode == "async" else "rounds"
        return Verdict(Phase.succeeded, Reason.ROUNDS_COMPLETED, f"completed {rounds_done} {unit}")

    # ------------------------------------------------------------ budgets

    def central_budget_spent(self, rounds_done: int, epsilon: float) -> Verdict:
        if rounds_done == 0:
            # Not a budget used up but one that never fit: the job is refused, not a success.
            return Verdict(
                Phase.failed, Reason.BUDGET_EXHAUSTED,
                "privacy budget too small: even the first round would exceed targetEpsilon "
                f"{self.spec.privacy.target_epsilon} at the sampling rate of the clients live",
                ConditionType.BUDGET_EXHAUSTED,
                "no round fits the budget; lower noise is not allowed, so raise targetEpsilon, "
                "add clients or set a larger noiseMultiplier")
        return Verdict(
            Phase.succeeded, Reason.BUDGET_EXHAUSTED,
            f"privacy budget exhausted after {rounds_done} rounds", ConditionType.BUDGET_EXHAUSTED,
            f"another round would exceed targetEpsilon {self.spec.privacy.target_epsilon}; "
            f"spent {epsilon:.4f}")

    def local_budgets_spent(self, rounds_done: int, *, live: int, with_budget: int
                            ) -> Verdict | None:
        """Local DP: enough clients are live, but too few of them have budget left for a
        round to close. That is the job's privacy budget running out, a normal end
        (Succeeded, BudgetExhausted), not a shortage of clients (Failed, TooFewClients)."""
        if self.spec.privacy.mode != "local" or with_budget == live:
            return None
        if with_budget >= self.floor or live < self.floor:
            return None
        spent = live - with_budget
        return Verdict(
            Phase.succeeded, Reason.BUDGET_EXHAUSTED,
            f"privacy budget exhausted after {rounds_done} rounds: {spent} of {live} "
            f"clients have spent theirs", ConditionType.BUDGET_EXHAUSTED,
            f"{spent} of {live} live clients declined: another round would exceed "
            f"targetEpsilon {self.spec.privacy.target_epsilon}")

    # ------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        return {"best_accuracy": self.best_accuracy,
                "rounds_without_improvement": self.rounds_without_improvement}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_accuracy = state["best_accuracy"]
        self.rounds_without_improvement = int(state["rounds_without_improvement"])
