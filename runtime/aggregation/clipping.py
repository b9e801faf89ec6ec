"""Centered clipping as a streaming rule, and the history a round carries into the next.

Karimireddy, He and Jaggi, 2021, "Learning from History for Byzantine Robust
Optimization" (ICML), Algorithm 2: v <- v + (1/n) sum_i clip_tau(x_i - v), where
clip_tau(z) = z min(1, tau / ||z||), started from the previous round's aggregate v. With
one iteration (the paper's experiments find one enough when v comes from history) each
update is clipped around v the moment it arrives and folded into a running sum, so the
rule keeps O(model) memory like FedAvg: the centre v plus one float64 sum.

tau: the job's clipRadius, or adaptively the median distance to the centre of the
previous round's updates; in the first round (no history) the median of the distances
seen so far in the round, so the first update is not clipped at all and later ones are
clipped by what came before. Every update counts the same (num_samples would be a lever).
A centre that diverged would drag the rule with it; the paper shows the error stays
bounded by tau and the Byzantine share.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._tensors import Weights, check_matches, layout_of
from .anomaly import clone
from .weighted import WeightedSum


@dataclass
class RoundHistory:
    """What a round leaves to the next: its aggregate (the centered-clipping centre and
    the anomaly scores' reference direction) and the median distance of its updates to
    their centre (centered clipping's adaptive radius). Owned by the coordinator, one
    per job; not checkpointed (a resumed job starts from no history)."""

    centre: Weights | None = None
    radius: float | None = None
    distances: list[float] = field(default_factory=list)

    def advance(self, aggregate: Mapping[str, Tensor], distances: list[float]) -> None:
        """The round closed with `aggregate`; `distances` of its updates to their centre
        (empty for rules that do not clip)."""
        self.centre = clone(aggregate)
        self.radius = statistics.median(distances) if distances else self.radius


def _distance(update: Mapping[str, Tensor], centre: Mapping[str, Tensor] | None) -> float:
    total = 0.0
    for name, tensor in update.items():
        value = tensor.detach().to(torch.float64)
        if centre is not None:
            value = value - centre[name].to(torch.float64)
        total += float(value.pow(2).sum())
    return math.sqrt(total)


class CenteredClipSum:
    """One round of centered clipping, folded as updates arrive.

    `centre`: the previous aggregate (None: zero, the first round). `radius`: a fixed
    tau, or None for the adaptive one described in the module docstring, taken from
    `previous_radius` when there is one.
    """

    def __init__(self, template: Mapping[str, Tensor], *, centre: Mapping[str, Tensor] | None,
                 radius: float | None, previous_radius: float | None = None) -> None:
        if radius is not None and not (math.isfinite(radius) and radius > 0):
            raise ValueError(f"clip radius must be a finite number > 0, got {radius!r}")
        self._centre = None if centre is None else clone(centre)
        self._fixed = radius
        self._previous = previous_radius
        self._layout = layout_of(template)
        self._sum = WeightedSum(template)
        self.distances: list[float] = []
        self.clipped = 0

    def radius(self, distance: float) -> float:
        """tau for an update at `distance` from the centre (before it is recorded)."""
        if self._fixed is not None:
            return self._fixed
        if self._previous is not None and self._previous > 0:
            return self._previous
        return statistics.median([*self.distances, distance])

    def add(self, update: Mapping[str, Tensor], *, what: str = "update") -> float:
        """Clip `update` around the centre and fold it in; returns its distance. A
        rejected update (WeightedSum's checks) changes nothing."""
        check_matches(self._layout, update, what=what)
        distance = _distance(update, self._centre)
        tau = self.radius(distance)
        scale = 1.0 if distance <= tau or distance == 0 else tau / distance
        clipped = {name: (tensor if self._centre is None else tensor - self._centre[name]) * scale
                   for name, tensor in update.items()}
        self._sum.add(clipped, 1.0, what=what)
        self.distances.append(distance)
        self.clipped += scale < 1.0
        return distance

    def mean(self) -> Weights:
        """centre + mean of the clipped differences."""
        step = self._sum.mean()
        if self._centre is None:
            return step
        return {name: (self._centre[name].to(torch.float64) + value.to(torch.float64))
                .to(value.dtype) for name, value in step.items()}
