"""FedNova: normalised averaging for clients that did unequal amounts of local work.

Wang et al., 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization" (NeurIPS). A client that takes tau_i local steps moves roughly
tau_i times as far as one that takes a single step; plain FedAvg then pulls the global
model towards whoever trained longest. FedNova divides each delta by its local steps,
averages those per-step directions with the usual weights p_i = n_i / sum n, and scales
the result back by the effective number of steps tau_eff = sum p_i tau_i:

    delta = tau_eff * sum_i p_i * delta_i / tau_i

(the paper's eq. 7 with vanilla SGD clients, a_i = [1, ..., 1]). With equal steps it is
FedAvg exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ._tensors import UpdateStats, Weights
from .weighted import Bound, EmptyAggregationError, WeightedSum


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"local steps must be an integer >= 1, got {steps!r}")
    return steps


class NormalizedSum:
    """FedNova's running sum: O(model) memory however many clients report. A delta of
    `steps` local steps goes into a `WeightedSum` with weight `weight / steps`; the mean
    is rescaled once at the end, so no delta is ever copied. `hold` as for `WeightedSum`."""

    def __init__(self, template: Mapping[str, Tensor], *, hold: int = 0) -> None:
        self._sum = WeightedSum(template, hold=hold)
        self._weight = 0.0  # sum of n_i
        self._step_weight = 0.0  # sum of n_i * tau_i

    @property
    def count(self) -> int:
        return self._sum.count

    @property
    def held(self) -> int:
        """Accepted deltas waiting for the next pass over the sum (`WeightedSum.held`)."""
        return self._sum.held

    def flush(self) -> None:
        """Fold the held deltas now (`WeightedSum.flush`)."""
        self._sum.flush()

    @property
    def effective_steps(self) -> float:
        """tau_eff = sum p_i tau_i of what was added so far."""
        if not self._weight:
            raise EmptyAggregationError("no updates were added")
        return self._step_weight / self._weight

    def add(self, update: Mapping[str, Tensor], weight: float, steps: int, *,
            what: str = "update", bound: Bound | None = None,
            reference: Mapping[str, Tensor] | None = None) -> UpdateStats:
        """Fold in `update`, trained for `steps` local steps, with `weight` (its
        num_samples); `bound` and `reference` as for `WeightedSum.add`. ValueError for a bad update,
        weight or step count; nothing changes then."""
        tau = _check_steps(steps)
        # WeightedSum validates (and bounds) before it commits.
        stats = self._sum.add(update, float(weight) / tau, what=what, bound=bound,
                              reference=reference)
        self._weight += float(weight)
        self._step_weight += float(weight) * tau
        return stats

    def mean(self) -> Weights:
        """tau_eff * sum p_i delta_i / tau_i, as new tensors in the template's dtypes."""
        per_step = self._sum.mean()  # sum (n_i/tau_i) d_i / sum (n_i/tau_i)
        if not self._weight:
            raise EmptyAggregationError("no updates were added")
        factor = (self._sum.total_weight / self._weight) * self.effective_steps
        return {name: (tensor.double() * factor).to(tensor.dtype)
                if tensor.is_floating_point() else tensor
                for name, tensor in per_step.items()}


def fednova_reference(deltas: Sequence[Mapping[str, Tensor]], samples: Sequence[float],
                      steps: Sequence[int]) -> Weights:
    """The formula written out, every delta held at once (for tests and benchmarks)."""
    if not deltas:
        raise EmptyAggregationError("no updates to average")
    if not len(deltas) == len(samples) == len(steps):
        raise ValueError("deltas, samples and steps must have the same length")
    total = float(sum(samples))
    p = [n / total for n in samples]
    tau_eff = sum(pi * _check_steps(t) for pi, t in zip(p, steps, strict=True))
    out: Weights = {}
    for name, first in deltas[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for pi, tau, delta in zip(p, steps, deltas, strict=True):
            acc += pi * delta[name].double() / tau
        out[name] = (tau_eff * acc).to(first.dtype)
    return out
