"""Weighted averaging of client updates: the aggregation step of FedAvg.

FedAvg (McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", Algorithm 1) averages client models weighted by their number of
training examples. Clients send deltas, so the coordinator averages deltas the same way
and the server optimizer (`server.py`) applies the mean.

`WeightedSum` folds updates in as they arrive and keeps only one float64 accumulator (one
flat buffer for the whole model): memory is O(model), whatever the number of clients.
Each update is checked for NaN/Inf, and its norm taken, in one read before anything is
committed; float32 tensors are then folded by compiled loops (`_kernels`) that widen each
value in a register, so no float64 copy of the update ever exists (other dtypes: torch,
slice by slice). With `hold`, several accepted updates are folded in one pass over the
sum. `weighted_mean` computes the
same thing from a list in one go; it is the reference the streaming sum is tested against.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from . import _kernels
from ._tensors import (
    ACCUMULATOR_DTYPE,
    UpdateStats,
    Weights,
    cast_back,
    check_matches,
    layout_of,
    to_accumulator,
)

Bound = Callable[[UpdateStats], float]
"""Decides, from an update's stats, the factor in (0, 1] it is folded with (1: as sent,
less: clipped to a norm bound), or raises to refuse it. Called after the update was
checked and before anything is committed."""

FOLD_CHUNK = 1 << 16
"""Elements per slice of the fold: its float64 temporary (512 KiB) stays in L2 cache."""


_SPARE: list[Tensor] = []
"""Float64 sums of finished rounds, kept for reuse (at most `_SPARE_LIMIT`)."""
_SPARE_LIMIT = 1


def _zeroed(numel: int) -> Tensor:
    """A zeroed flat float64 buffer: a spare one of that size when there is one."""
    for index, spare in enumerate(_SPARE):
        if spare.numel() == numel:
            del _SPARE[index]
            return spare.zero_()
    del _SPARE[: max(0, len(_SPARE) - _SPARE_LIMIT + 1)]
    return torch.zeros(numel, dtype=ACCUMULATOR_DTYPE)


class EmptyAggregationError(ValueError):
    """A mean was asked of no updates."""


def _check_weight(weight: float) -> float:
    value = float(weight)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
    return value


class WeightedSum:
    """A running weighted sum of updates shaped like `template`.

    Every `add` validates the update completely before touching the accumulators, so a
    rejected update leaves the sum exactly as it was. The template's tensors are not
    kept, only their names, shapes, dtypes and devices.

    The sum is one contiguous float64 buffer (a view per tensor). float32 tensors on the
    CPU are folded by compiled loops (`_kernels`) in one read; other dtypes by torch, slice
    by slice. With `hold` > 0, up to `hold` accepted updates are kept by reference (not
    copied; callers must not modify them afterwards) and folded together in one pass
    over the sum: the sum's own reads and writes, which dominate a fold, are shared by
    up to eight updates (`hold` 7). That costs up to `hold` updates of memory; 0 folds each update
    as it arrives and keeps nothing.
    """

    def __init__(self, template: Mapping[str, Tensor], *, hold: int = 0) -> None:
        if isinstance(hold, bool) or not isinstance(hold, int) or hold < 0:
            raise ValueError(f"hold must be an integer >= 0, got {hold!r}")
        self._layout = layout_of(template)
        self._hold = hold
        self._sums: dict[str, Tensor] = {}
        cpu = [meta for meta in self._layout if meta.device.type == "cpu"]
        flat = _zeroed(sum(meta.numel for meta in cpu))
        # Back to the pool when this sum is gone: the next round's sum then reuses its
        # pages instead of faulting in fresh ones (which cost as much as a fold).
        weakref.finalize(self, _SPARE.append, flat)
        offset = 0
        for meta in self._layout:
            if meta.device.type == "cpu":
                self._sums[meta.name] = flat[offset:offset + meta.numel].view(meta.shape)
                offset += meta.numel
            else:
                self._sums[meta.name] = torch.zeros(meta.shape, dtype=ACCUMULATOR_DTYPE,
                                                    device=meta.device)
        self._pending: list[tuple[Mapping[str, Tensor], float, float]] = []
        self._count = 0
        self._total_weight = 0.0

    @property
    def count(self) -> int:
        """How many updates were added."""
        return self._count

    @property
    def total_weight(self) -> float:
        """The sum of their weights."""
        return self._total_weight

    def add(self, update: Mapping[str, Tensor], weight: float, *, what: str = "update",
            bound: Bound | None = None,
            reference: Mapping[str, Tensor] | None = None) -> UpdateStats:
        """Fold `update` in with `weight` (> 0). `update` is not modified (and, unless
        `hold` > 0, not kept).

        Raises ValueError naming the tensor (and `what`, e.g. the node) when names or
        shapes differ from the template, or when a floating tensor holds NaN/Inf. With
        `bound`, the update's stats go to it and it is folded as ``factor * update``
        (its weight still counts whole in the mean's denominator, as a clipped copy
        would); whatever `bound` raises propagates. A refused update leaves the sum
        exactly as it was. Returns the update's stats (of the update as given; with
        `reference`, shaped like the template, its inner product with it too, from the
        same read).
        """
        scale = _check_weight(weight)
        stats = check_matches(self._layout, update, what=what, reference=reference)
        factor = 1.0 if bound is None else float(bound(stats))
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"{what}: the bound's factor must be in (0, 1], got {factor!r}")
        self._pending.append((update, scale, factor))
        self._count += 1
        self._total_weight += scale
        if len(self._pending) > self._hold:
            self._flush()
        return stats

    def state_dict(self) -> dict[str, object]:
        """The running sum as plain data (its float64 accumulators, count, total weight):
        what a checkpoint stores to continue this sum after a restart. O(model)."""
        return {"sums": {name: total.clone() for name, total in self._sums.items()},
                "count": self._count, "total_weight": self._total_weight}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Continue the sum `state_dict` saved. ValueError, naming the tensor, when the
        saved accumulators do not match this sum's template (another model)."""
        sums = state.get("sums")
        count, total = state.get("count"), state.get("total_weight")
        if not isinstance(sums, Mapping) or set(sums) != set(self._sums):
            raise ValueError("saved sum: its tensors are not the model's "
                             f"({sorted(sums) if isinstance(sums, Mapping) else sums!r})")
        for name, mine in self._sums.items():
            saved = sums[name]
            if not isinstance(saved, Tensor) or saved.shape != mine.shape:
                raise ValueError(f"saved sum: tensor {name!r} is not shaped "
                                 f"{list(mine.shape)}")
            if saved.is_floating_point() and not bool(torch.isfinite(saved).all()):
                raise ValueError(f"saved sum: tensor {name!r} holds NaN or Inf")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"saved sum: count must be an integer >= 0, got {count!r}")
        if not isinstance(total, (int, float)) or not math.isfinite(total) or total < 0 \
                or (count > 0) != (total > 0):
            raise ValueError(f"saved sum: total_weight {total!r} does not fit count {count}")
        for name, mine in self._sums.items():
            mine.copy_(sums[name])
        self._count, self._total_weight = count, float(total)

    def mean(self) -> Weights:
        """The weighted mean so far, as new tensors in the template's dtypes."""
        if self._count == 0:
            raise EmptyAggregationError("no updates were added: the mean of nothing is undefined")
        self._flush()
        return {meta.name: self._mean_of(meta.name, meta.dtype) for meta in self._layout}

    @property
    def held(self) -> int:
        """How many accepted updates wait, by reference, to be folded."""
        return len(self._pending)

    def flush(self) -> None:
        """Fold the held updates into the sum now, in arrival order, in one pass over it
        (eight at a time), and drop the references to them. A no-op when none are held."""
        self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        for meta in self._layout:
            tensors = [update[meta.name].detach() for update, _, _ in pending]
            # A clip scales floating tensors only (integer buffers are counters).
            alphas = [scale * factor if tensor.is_floating_point() else scale
                      for tensor, (_, scale, factor) in zip(tensors, pending, strict=True)]
            total = self._sums[meta.name]
            if total.device.type == "cpu" and all(
                    t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors):
                _kernels.fold_group(total.view(-1).numpy(),
                                    [t.reshape(-1).numpy() for t in tensors], alphas)
                continue
            for tensor, alpha in zip(tensors, alphas, strict=True):
                _fold(total, tensor.to(meta.device), alpha)

    def _mean_of(self, name: str, dtype: torch.dtype) -> Tensor:
        # Slice by slice, so the float64 quotient never exists for a whole tensor.
        total = self._sums[name]
        out = torch.empty(total.shape, dtype=dtype, device=total.device)
        flat_out = out.view(-1)
        if dtype == torch.float32 and total.device.type == "cpu":
            _kernels.divide_into(flat_out.numpy(), total.view(-1).numpy(), self._total_weight)
            return out
        for start in range(0, total.numel(), FOLD_CHUNK):
            part = total.view(-1)[start : start + FOLD_CHUNK] / self._total_weight
            flat_out[start : start + FOLD_CHUNK] = cast_back(part, dtype)
        return out


def _fold(total: Tensor, tensor: Tensor, scale: float) -> None:
    """total += scale * tensor, with the product and sum in float64, slice by slice
    (the path for dtypes other than float32, and for tensors off the CPU).

    A plain ``total.add_(tensor, alpha=scale)`` would first convert the whole of `tensor`
    to float64 (a second copy of the update, twice its size, written and read back).
    """
    flat_total = total.view(-1)
    flat = tensor.reshape(-1)
    if flat.numel() <= FOLD_CHUNK:
        flat_total.add_(flat, alpha=scale)
        return
    for total_slice, slice_ in zip(flat_total.split(FOLD_CHUNK), flat.split(FOLD_CHUNK), strict=True):
        total_slice.add_(slice_, alpha=scale)


def weighted_mean(pairs: Sequence[tuple[Mapping[str, Tensor], float]]) -> Weights:
    """The weighted mean of (update, weight) pairs, in the first update's dtypes.

    Holds every update at once (stacked per tensor); the coordinator uses `WeightedSum`.
    """
    if not pairs:
        raise EmptyAggregationError("no updates to average")
    layout = layout_of(pairs[0][0])
    for index, (update, _) in enumerate(pairs):
        check_matches(layout, update, what=f"update {index}")
    weights = torch.tensor(
        [_check_weight(weight) for _, weight in pairs],
        dtype=ACCUMULATOR_DTYPE,
        device=layout[0].device,
    )
    total = weights.sum()
    out: Weights = {}
    for meta in layout:
        stacked = torch.stack([to_accumulator(update[meta.name], meta) for update, _ in pairs])
        mixed = torch.tensordot(weights.to(meta.device), stacked, dims=1) / total.to(meta.device)
        out[meta.name] = cast_back(mixed, meta.dtype)
    return out
