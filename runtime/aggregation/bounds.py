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
    """The L2 norm of a whole update (all floating-point tensors as one vector).

    Computed in the tensors' own precision with one fused per-tensor call (what
    `torch.nn.utils.clip_grad_norm_` uses), which costs half as much as a float64 pass;
    only when that overflows (a hostile update of huge values) is it redone in float64.
    A mapping other than a dict (one that decodes each tensor when read) is read one
    tensor at a time, so no two of its decoded tensors exist at once."""
    if not isinstance(delta, dict):
        squares = 0.0
        for tensor in delta.values():
            if tensor.is_floating_point():
                squares += float(torch.linalg.vector_norm(tensor, dtype=torch.float64)) ** 2
        return math.sqrt(squares)
    floats = [t for t in delta.values() if t.is_floating_point()]
    if not floats:
        return 0.0
    norms = torch._foreach_norm(floats)
    if any(n.dtype != norms[0].dtype for n in norms):
        norms = [n.float() for n in norms]
    total = float(torch.linalg.vector_norm(torch.stack(norms)))
    if math.isfinite(total):
        return total
    return math.sqrt(sum(
        float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in floats))


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
