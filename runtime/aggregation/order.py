"""Order statistics across updates, coordinate by coordinate, for median and trimmed mean.

A per-coordinate sort or `torch.kthvalue` walks each coordinate's n values one by one
(tens of nanoseconds per value). Here the n updates are rows of one slice of the model,
and a sorting network orders every column at once: each comparator is one
`torch.minimum` and one `torch.maximum` over whole rows, vectorised, on a slice small
enough to stay in cache. Min and max only move values, so the order is exact in the
updates' own dtype; only the ranks a rule keeps are summed, in float64, and cast back.

The network is Batcher's odd-even merge sort (Knuth, TAOCP vol. 3, 5.3.4, Algorithm M),
built for the next power of two and cut down to n wires (comparators that touch a wire
>= n only ever meet +inf there and are dropped), then pruned to the comparators that
the wanted ranks depend on, or to those that the other ranks depend on when that is
fewer: comparators only swap values, so once the other wires hold exactly their sorted
values, the wanted wires hold exactly the wanted values, in some order (a trimmed mean
with beta 0 needs no comparator at all).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from . import _kernels
from ._tensors import ACCUMULATOR_DTYPE, TensorMeta, cast_back

SLICE = 1 << 13
"""Columns per slice: n rows of 8192 float32 values (1.6 MB for 50 updates) stay in cache."""

COMPILED_SLICE = 1 << 8
"""Columns per slice of the compiled path (float32): 52 KB for 50 updates, about L1's
size, so each comparator's loads and stores hit L1 (4096 columns, in L2, were 1.2x
slower at 50 x 11.7M: bench/README.md)."""

Comparator = tuple[int, int]


@functools.lru_cache(maxsize=128)
def sorting_network(count: int) -> tuple[Comparator, ...]:
    """Comparators (low, high) that sort `count` wires ascending when each puts the
    minimum of its two wires on `low` and the maximum on `high`, applied in order."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    size = 1
    while size < count:
        size *= 2
    comparators: list[Comparator] = []
    merge = 1
    while merge < size:
        step = merge
        while step >= 1:
            for base in range(step % merge, size - step, 2 * step):
                for offset in range(min(step, size - base - step)):
                    low, high = base + offset, base + offset + step
                    if low // (2 * merge) == high // (2 * merge) and high < count:
                        comparators.append((low, high))
            step //= 2
        merge *= 2
    return tuple(comparators)


@functools.lru_cache(maxsize=128)
def network_for_ranks(count: int, ranks: tuple[int, ...]) -> tuple[Comparator, ...]:
    """The comparators of `sorting_network(count)` that the values at `ranks` depend on."""
    needed = set(ranks)
    kept: list[Comparator] = []
    for low, high in reversed(sorting_network(count)):
        if low in needed or high in needed:
            kept.append((low, high))
            needed.update((low, high))
    return tuple(reversed(kept))


@functools.lru_cache(maxsize=128)
def network_placing(count: int, ranks: tuple[int, ...]) -> tuple[Comparator, ...]:
    """The fewest comparators after which wires `ranks` hold the values of those ranks
    (as a multiset; in rank order only when the ranks themselves were pruned for)."""
    others = tuple(rank for rank in range(count) if rank not in set(ranks))
    return min(network_for_ranks(count, ranks), network_for_ranks(count, others), key=len)


class NonFiniteError(ValueError):
    """A tensor the compiled path ordered holds NaN or Inf (which update: `check_finite`)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"tensor {name!r} contains NaN or Inf")


def proves_finite(updates: Sequence[Mapping[str, Tensor]], meta: TensorMeta) -> bool:
    """Whether `coordinate_statistic` takes tensor `meta` through the compiled path, which
    raises NonFiniteError when a value is NaN or Inf (so callers need not read it first):
    float32 on the CPU in every update."""
    return meta.dtype == torch.float32 and meta.device.type == "cpu" and all(
        update[meta.name].dtype == torch.float32 and update[meta.name].device.type == "cpu"
        for update in updates)


def coordinate_statistic(
    updates: Sequence[Mapping[str, Tensor]], meta: TensorMeta, ranks: range
) -> Tensor:
    """Per coordinate of tensor `meta`, the mean of the values at `ranks` (0 = smallest)
    among the updates', in the tensor's shape and dtype (integers rounded half to even).
    NonFiniteError where `proves_finite` and some value is NaN or Inf; other tensors
    must have been checked."""
    count = len(updates)
    if not ranks or ranks.start < 0 or ranks.stop > count:
        raise ValueError(f"ranks {ranks} do not fit {count} updates")
    work = meta.dtype if meta.dtype.is_floating_point else ACCUMULATOR_DTYPE
    flats = [update[meta.name].detach().to(meta.device).reshape(-1) for update in updates]
    network = network_placing(count, tuple(ranks))
    if proves_finite(updates, meta):
        return _compiled_statistic(flats, meta, network, ranks)
    out = torch.empty(meta.numel, dtype=meta.dtype, device=meta.device)
    spare = torch.empty(min(SLICE, meta.numel), dtype=work, device=meta.device)
    for start in range(0, meta.numel, SLICE):
        stop = min(start + SLICE, meta.numel)
        block = torch.stack([flat[start:stop] for flat in flats]).to(work)
        rows = list(block.unbind(0))
        free = spare[: stop - start]
        for low, high in network:
            a, b = rows[low], rows[high]
            torch.minimum(a, b, out=free)
            torch.maximum(a, b, out=b)
            rows[low], free = free, a
        # A float64 add_ per kept row: several times faster than sum(dtype=float64) over
        # a stack, which converts element by element.
        total = rows[ranks[0]].to(ACCUMULATOR_DTYPE, copy=True)
        for rank in ranks[1:]:
            total.add_(rows[rank])
        out[start:stop] = cast_back(total.div_(len(ranks)), meta.dtype)
    return out.reshape(meta.shape)


def _compiled_statistic(flats: Sequence[Tensor], meta: TensorMeta,
                        network: Sequence[Comparator], ranks: range) -> Tensor:
    """`coordinate_statistic` for float32 on the CPU: the same network and the same
    float64 sums (so bit for bit the same result), in one compiled call for the whole
    tensor, which also proves every value finite in the copy each slice needs anyway."""
    comparators = np.array(network, dtype=np.int64).reshape(-1, 2)
    kept = np.array(list(ranks), dtype=np.int64)
    out = torch.empty(meta.numel, dtype=torch.float32)
    sources = [flat.contiguous().numpy() for flat in flats]
    if not _kernels.order_columns(sources, comparators, kept, out.numpy(),
                                  min(COMPILED_SLICE, meta.numel)):
        raise NonFiniteError(meta.name)
    return out.reshape(meta.shape)
