"""Byzantine-robust aggregation rules: Krum, Multi-Krum, coordinate-wise median,
trimmed mean and Bulyan.

Each rule takes the round's updates (deltas shaped like the model), computes in float64
and returns a `RobustResult`: the aggregate in the updates' dtypes plus which updates were
used and which were set aside (the coordinator turns the latter into ClientNode
suspicion). Inputs are never modified. Distances between updates come from one Gram
matrix product over the flattened updates, not a Python loop over pairs.

Coordinate-wise rules (median, trimmed mean) draw on every update for some coordinates,
so they report every index as selected and none as set aside. They run slice by slice
over the model (`order.py`): a sorting network of min/max over whole rows orders each
coordinate's values in the updates' own dtype, which is exact, and only the few values
the rule keeps are summed in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._tensors import (
    Layout,
    Weights,
    check_finite,
    check_structure,
    check_updates,
    flatten,
    layout_of,
    unflatten,
)
from .catalog import bulyan_minimum, krum_minimum
from .order import NonFiniteError, coordinate_statistic, proves_finite


class TooFewUpdatesError(ValueError):
    """A robust rule got fewer updates than its Byzantine tolerance requires."""


@dataclass(frozen=True)
class RobustResult:
    """What a robust rule made of a round's updates.

    aggregate: the combined update, in the updates' names, shapes and dtypes.
    selected: indices (ascending) of the updates that went into the aggregate.
    set_aside: indices (ascending) of those that did not.
    """

    aggregate: Weights
    selected: tuple[int, ...]
    set_aside: tuple[int, ...]


def krum(updates: Sequence[Weights], *, byzantine: int, select: int = 1) -> RobustResult:
    """Krum, or Multi-Krum when `select` > 1.

    Blanchard et al., 2017, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent" (NeurIPS). Each update is scored by the sum of squared distances
    to its n - f - 2 nearest other updates; Krum returns the update with the lowest
    score, Multi-Krum the plain mean of the `select` lowest-scoring ones. Requires
    n > 2f + 2 and 1 <= select <= n - f. Ties go to the lower index.
    """
    layout = check_updates(updates)
    count = len(updates)
    needed = krum_minimum(byzantine)
    if count < needed:
        raise TooFewUpdatesError(
            f"krum with byzantine={byzantine} needs at least {needed} updates "
            f"(n > 2f + 2), got {count}"
        )
    if isinstance(select, bool) or not isinstance(select, int) or not 1 <= select <= count - byzantine:
        raise ValueError(
            f"select must be an integer in [1, n - f] = [1, {count - byzantine}], got {select!r}"
        )
    rows = flatten(updates, layout)
    scores = _krum_scores(_pairwise_squared_distances(rows), byzantine)
    chosen = sorted(torch.argsort(scores, stable=True)[:select].tolist())
    return _result(rows[chosen].mean(dim=0), layout, chosen, count)


def coordinate_median(updates: Sequence[Weights]) -> RobustResult:
    """The coordinate-wise median; the mean of the two middle values when n is even.

    Yin et al., 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
    Rates" (ICML), Option I (median).
    """
    count = len(updates)
    middle = count // 2
    # The middle rank, or the two middle ranks whose mean is taken.
    ranks = range(middle, middle + 1) if count % 2 else range(middle - 1, middle + 1)
    aggregate = _coordinate_rule(updates, ranks)
    everyone = tuple(range(count))
    return RobustResult(aggregate=aggregate, selected=everyone, set_aside=())


def trimmed_mean(updates: Sequence[Weights], *, beta: float) -> RobustResult:
    """The coordinate-wise beta-trimmed mean: per coordinate, drop the floor(beta * n)
    largest and as many smallest values, and average the rest.

    Yin et al., 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
    Rates" (ICML), Option II (trimmed mean). Requires 0 <= beta < 0.5.
    """
    if not 0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta!r}")
    count = len(updates)
    trim = int(beta * count)
    ranks = range(trim, count - trim)
    aggregate = _coordinate_rule(updates, ranks)
    everyone = tuple(range(count))
    return RobustResult(aggregate=aggregate, selected=everyone, set_aside=())


def bulyan(updates: Sequence[Weights], *, byzantine: int) -> RobustResult:
    """Bulyan: Krum picks theta = n - 2f updates one at a time, then per coordinate the
    beta = theta - 2f picked values closest to their median are averaged.

    El Mhamdi, Guerraoui and Rouault, 2018, "The Hidden Vulnerability of Distributed
    Learning in Byzantium" (ICML), Algorithm 2 (with Krum as the selection rule).
    Requires n >= 4f + 3. Distances are computed once for all picks. In the last picks
    fewer than f + 3 candidates remain, where Krum's n - f - 2 neighbours would be none;
    a candidate is then scored on its single nearest neighbour (as Flower does). Ties go
    to the lower index.
    """
    layout = check_updates(updates)
    count = len(updates)
    needed = bulyan_minimum(byzantine)
    if count < needed:
        raise TooFewUpdatesError(
            f"bulyan with byzantine={byzantine} needs at least {needed} updates "
            f"(n >= 4f + 3), got {count}"
        )
    rows = flatten(updates, layout)
    distances = _pairwise_squared_distances(rows)
    theta = count - 2 * byzantine
    remaining = list(range(count))
    picked: list[int] = []
    for _ in range(theta):
        candidates = torch.tensor(remaining, device=distances.device)
        scores = _krum_scores(distances[candidates][:, candidates], byzantine)
        best = remaining[int(torch.argmin(scores))]
        picked.append(best)
        remaining.remove(best)
    chosen = sorted(picked)
    selection = rows[chosen]
    keep = theta - 2 * byzantine
    # Order each coordinate's values by distance to that coordinate's median and
    # average the `keep` nearest; a stable sort keeps the result deterministic on ties.
    nearest = torch.argsort((selection - _median(selection)).abs(), dim=0, stable=True)[:keep]
    return _result(torch.gather(selection, 0, nearest).mean(dim=0), layout, chosen, count)


def _coordinate_rule(updates: Sequence[Weights], ranks: range) -> Weights:
    """Each tensor's `coordinate_statistic` at `ranks`, after the checks of `check_updates`;
    float32 tensors are proven finite by the compiled order itself, in the copy it makes
    anyway, instead of by a read of their own."""
    if not updates:
        raise ValueError("no updates to aggregate")
    layout = layout_of(updates[0])
    for index, update in enumerate(updates):
        check_structure(layout, update, what=f"update {index}")
    unproven = tuple(meta for meta in layout if not proves_finite(updates, meta))
    if unproven:
        for index, update in enumerate(updates):
            check_finite(unproven, update, what=f"update {index}")
    try:
        return {meta.name: coordinate_statistic(updates, meta, ranks) for meta in layout}
    except NonFiniteError:
        check_updates(updates)  # names the first update and tensor holding NaN or Inf
        raise


def _pairwise_squared_distances(rows: Tensor) -> Tensor:
    """Squared Euclidean distances between all rows, from one Gram matrix product.

    The rows are centred first: distances do not change, but ||a||^2 + ||b||^2 - 2<a, b>
    then cancels far less when updates are large and close together.
    """
    centred = rows - rows.mean(dim=0, keepdim=True)
    gram = centred @ centred.T
    norms = gram.diagonal()
    distances = (norms[:, None] + norms[None, :] - 2 * gram).clamp_min(0)
    return distances.fill_diagonal_(0)


def _krum_scores(distances: Tensor, byzantine: int) -> Tensor:
    """Each candidate's sum of squared distances to its n - f - 2 nearest others
    (at least one, at most n - 1)."""
    count = distances.shape[0]
    if count == 1:
        return distances.new_zeros(1)
    neighbours = min(max(count - byzantine - 2, 1), count - 1)
    others = distances + torch.diag(distances.new_full((count,), float("inf")))
    return torch.topk(others, neighbours, dim=1, largest=False).values.sum(dim=1)


def _median(stacked: Tensor) -> Tensor:
    """Median over dim 0, averaging the two middle values when their number is even
    (torch.median would return the lower one, biasing the result downward)."""
    ordered = torch.sort(stacked, dim=0).values
    middle = stacked.shape[0] // 2
    if stacked.shape[0] % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def _result(vector: Tensor, layout: Layout, chosen: Sequence[int], count: int) -> RobustResult:
    used = set(chosen)
    return RobustResult(
        aggregate=unflatten(vector, layout),
        selected=tuple(sorted(used)),
        set_aside=tuple(index for index in range(count) if index not in used),
    )

