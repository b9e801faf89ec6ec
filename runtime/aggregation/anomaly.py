"""Anomaly scores: how unlike the others of its round each update is.

Computed on the decoded update, from what the coordinator holds anyway, so that plain
(streaming) FedAvg can score its clients without keeping their updates:

- every rule, streaming: each update's L2 norm and its cosine to a reference direction,
  the previous round's aggregate, folded in one pass as the update arrives (`measure`,
  tensor by tensor through `StatsFold`); only two floats per update are kept;
- buffered (robust) rules, at close, from the buffer they hold anyway: the distance of
  each update to the coordinate-wise median, and the cosine to the round's own robust
  aggregate instead of the previous one.

Each signal becomes a robust z-score within the round (median and 1.4826 x MAD, with a
floor so a round of near-identical honest updates does not turn tiny differences into
large scores): the norm two-sided, the cosine from below, the distance from above. An
update's score is its largest z mapped to [0, 1]: 0 up to z = 4, 1 from z = 8. The
coordinator folds the scores into each client's exponentially weighted suspicion.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _kernels
from ._tensors import Weights

Z_FLOOR = 4.0
"""Robust z-scores up to this count as ordinary (score 0)."""
Z_FULL = 8.0
"""From this z on an update scores 1."""
RELATIVE_SCALE_FLOOR = 0.25
"""Norm and distance z-scores use at least this share of the median as their scale."""
COSINE_SCALE_FLOOR = 0.15
"""Cosine z-scores use at least this as their scale."""


@dataclass(frozen=True)
class UpdateStats:
    """What is kept of one update: its norm and its cosine to the reference (None
    without a reference, or when either vector is zero)."""

    norm: float
    cosine: float | None


class StatsFold:
    """Norm and inner product with `reference`, folded tensor by tensor in float64."""

    def __init__(self, reference: Mapping[str, Tensor] | None, reference_norm: float) -> None:
        self._reference = reference
        self._reference_norm = reference_norm
        self._squares = 0.0
        self._dot = 0.0

    def add(self, name: str, tensor: Tensor) -> None:
        values = tensor.detach().reshape(-1).to(torch.float64)
        self._squares += float(values.dot(values))
        if self._reference is not None and name in self._reference:
            self._dot += float(values.dot(self._reference[name].reshape(-1).to(torch.float64)))

    def stats(self) -> UpdateStats:
        norm = math.sqrt(self._squares)
        cosine = None
        if self._reference is not None and norm > 0 and self._reference_norm > 0:
            cosine = max(-1.0, min(1.0, self._dot / (norm * self._reference_norm)))
        return UpdateStats(norm=norm, cosine=cosine)


def l2_norm(update: Mapping[str, Tensor]) -> float:
    """The L2 norm of all of `update`'s tensors together, in float64."""
    return math.sqrt(sum(float(t.detach().to(torch.float64).pow(2).sum()) for t in update.values()))


def measure(update: Mapping[str, Tensor], reference: Mapping[str, Tensor] | None,
            reference_norm: float | None = None) -> UpdateStats:
    """One pass over `update`: its norm and cosine to `reference` (None: no cosine)."""
    if reference is not None and reference_norm is None:
        reference_norm = l2_norm(reference)
    fold = StatsFold(reference, reference_norm or 0.0)
    for name, tensor in update.items():
        fold.add(name, tensor)
    return fold.stats()


def with_norm(update: Mapping[str, Tensor], norm: float,
              reference: Mapping[str, Tensor] | None, reference_norm: float, *,
              dot: float | None = None) -> UpdateStats:
    """`update`'s stats when its norm is known already (the fold's read gave it), and
    its inner product with `reference` too when `dot` is given (that read can take it):
    otherwise that is computed, and only when there is a reference."""
    if reference is None or norm <= 0 or reference_norm <= 0:
        return UpdateStats(norm=norm, cosine=None)
    if dot is None:
        dot = sum(_inner(tensor.detach(), reference[name]) for name, tensor in update.items()
                  if name in reference and tensor.is_floating_point())
    return UpdateStats(norm=norm, cosine=max(-1.0, min(1.0, dot / (norm * reference_norm))))


def _inner(tensor: Tensor, other: Tensor) -> float:
    """<tensor, other> in float64: float32 CPU pairs in one compiled read of each (every
    round after the first pays this per update, as it arrives); others by torch."""
    if (tensor.dtype == other.dtype == torch.float32 and tensor.device.type == "cpu"
            and other.device.type == "cpu" and tensor.shape == other.shape):
        return _kernels.dot(tensor.reshape(-1).numpy(), other.reshape(-1).numpy())
    return float(tensor.reshape(-1).to(torch.float64).dot(other.reshape(-1).to(torch.float64)))


def cosines_to(updates: Sequence[Mapping[str, Tensor]], centre: Mapping[str, Tensor]
               ) -> list[float | None]:
    """Each update's cosine to `centre` (None where either is zero)."""
    centre_norm = l2_norm(centre)
    return [measure(update, centre, centre_norm).cosine for update in updates]


def distances_to(updates: Sequence[Mapping[str, Tensor]], centre: Mapping[str, Tensor]
                 ) -> list[float]:
    """Each update's L2 distance to `centre` (the coordinate-wise median, say)."""
    return [math.sqrt(sum(float((update[name].to(torch.float64) - value.to(torch.float64))
                                .pow(2).sum()) for name, value in centre.items()))
            for update in updates]


def robust_z(values: Sequence[float], *, floor: float) -> list[float]:
    """(x - median) / max(1.4826 x MAD, floor), signed."""
    if not values:
        return []
    centre = statistics.median(values)
    mad = statistics.median(abs(v - centre) for v in values)
    scale = max(1.4826 * mad, floor, 1e-12)
    return [(v - centre) / scale for v in values]


def _score(z: float) -> float:
    return min(1.0, max(0.0, (z - Z_FLOOR) / (Z_FULL - Z_FLOOR)))


@dataclass(frozen=True)
class Scores:
    """A round's anomaly scores, in the order of its updates, and the largest z-score
    behind each (for messages: which signal was unlike the others)."""

    scores: tuple[float, ...]
    reasons: tuple[str, ...]


def anomaly_scores(norms: Sequence[float], cosines: Sequence[float | None],
                   distances: Sequence[float] | None = None) -> Scores:
    """Scores in [0, 1] for one round's updates from their norms, cosines to the
    reference (None: unknown) and, for buffered rules, distances to the median. Fewer
    than 3 updates say nothing about who is unlike the others: all score 0."""
    count = len(norms)
    if len(cosines) != count or (distances is not None and len(distances) != count):
        raise ValueError("norms, cosines and distances must have one entry per update")
    if count < 3:
        return Scores((0.0,) * count, ("",) * count)
    median_norm = statistics.median(norms)
    signals: list[tuple[str, list[float]]] = [
        ("norm", [abs(z) for z in robust_z(norms, floor=RELATIVE_SCALE_FLOOR * median_norm)]),
    ]
    known = [i for i, c in enumerate(cosines) if c is not None]
    if len(known) >= 3:
        z = robust_z([-float(cosines[i]) for i in known], floor=COSINE_SCALE_FLOOR)  # type: ignore[arg-type]
        by_index = dict(zip(known, z, strict=True))
        signals.append(("cosine", [by_index.get(i, 0.0) for i in range(count)]))
    if distances is not None:
        median_distance = statistics.median(distances)
        signals.append(("distance to median", robust_z(
            distances, floor=RELATIVE_SCALE_FLOOR * median_distance)))
    scores, reasons = [], []
    for i in range(count):
        name, z = max(((name, values[i]) for name, values in signals), key=lambda s: s[1])
        scores.append(_score(z))
        reasons.append(f"{name} z={z:.1f}" if z > Z_FLOOR else "")
    return Scores(tuple(scores), tuple(reasons))


def clone(update: Mapping[str, Tensor]) -> Weights:
    """A detached copy (the previous aggregate outlives the round that made it)."""
    return {name: tensor.detach().clone() for name, tensor in update.items()}
