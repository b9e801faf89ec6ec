"""Bounds on what one client can do to a round: the norm of its update and the weight
its claimed sample count buys. Pure functions on tensors and numbers; the coordinator's
admission stage decides what to do with their answers.

Why both an absolute and a relative norm bound: the absolute cap stops a single huge
update even in a round's first arrival, when there is nothing to compare with; the
relative bound (a multiple of the median norm of recently accepted updates) adapts to
the model and learning rate, so a poisoner cannot hide just under a generous cap.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping

import torch

Weights = Mapping[str, torch.Tensor]


def update_norm(delta: Weights) -> float:
    """The L2 norm of a whole update (all floating-point tensors as one vector)."""
    total = 0.0
    for tensor in delta.values():
        if tensor.is_floating_point():
            total += float(torch.linalg.vector_norm(tensor, dtype=torch.float64)) ** 2
    return math.sqrt(total)


def norm_limit(reference_norms: Iterable[float], *, factor: float | None,
               absolute: float | None) -> float | None:
    """The largest norm admitted: the absolute cap, tightened to `factor` times the
    median of `reference_norms` when there are any. None: unbounded."""
    limits = [] if absolute is None else [absolute]
    norms = [n for n in reference_norms if math.isfinite(n)]
    if factor is not None and norms:
        # A floor keeps a round of near-zero updates (a converged model) from refusing
        # every ordinary update that follows.
        limits.append(factor * max(statistics.median(norms), 1e-12))
    return min(limits) if limits else None


def clip_to_norm(delta: Weights, *, norm: float, limit: float) -> dict[str, torch.Tensor]:
    """`delta` scaled down so that its norm is `limit` (unchanged if already within)."""
    if norm <= limit:
        return dict(delta)
    scale = limit / norm
    return {k: v * scale if v.is_floating_point() else v for k, v in delta.items()}


def capped_samples(claimed: int, *, registered: int, cap: int | None) -> int:
    """The weight a claim of `claimed` examples may carry: no more than the node said it
    holds when it registered, nor than the job's per-client cap."""
    limit = registered if cap is None else min(registered, cap)
    return max(0, min(claimed, limit))
