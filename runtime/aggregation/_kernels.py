"""Compiled loops for the FedAvg fold: one pass over float32 data into a float64 sum.

torch has no fused "float64 += w * float32" kernel: ``acc64.add_(x32, alpha=w)`` goes
through a type-promoting element loop that runs at a fraction of memory speed, and a
cast to a float64 temporary first costs a write and a read of twice the update's size.
These numba loops read each float32 value once, widen it in a register and add it to
the float64 sum in the same order as the plain sequential sum (so results are bit for
bit those of ``sum(w * x.double())``).

`fold_group` folds up to eight updates per pass, so the float64 sum (16 bytes of traffic
per element: a read and a write) is read and written once for up to eight updates
instead of once each: that, not the arithmetic, is what bounds a fold.

Functions take flat numpy views of contiguous CPU tensors (``tensor.numpy()`` shares
memory, it does not copy). Compiled on first use and cached on disk when numba can
find a writable cache directory (``NUMBA_CACHE_DIR`` to choose one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np
from numba import typed


def _jit(function: Callable[..., Any] | None = None, **options: Any) -> Any:
    """numba.njit, cached on disk where numba finds a writable place (it raises at
    decoration otherwise: then compiled once per process)."""
    def wrap(function: Callable[..., Any]) -> Any:
        try:
            return numba.njit(cache=True, boundscheck=False, nogil=True, **options)(function)
        except RuntimeError:
            return numba.njit(boundscheck=False, nogil=True, **options)(function)
    return wrap if function is None else wrap(function)


# A single core reads one sequential stream well below what the memory system gives
# several at once (few lines in flight per stream). So the loops below read four parts
# of each array side by side: `_sum_of_squares` over four quarters ran 1.85x as fast as
# over one stream, on the same bytes (bench/README.md). Each quarter has its own sum;
# the order of a norm's or an inner product's terms is free (reassociated anyway).


@_jit(fastmath={"reassoc", "contract"})
def _sum_of_squares(x: np.ndarray) -> float:
    # Reassociation lets LLVM vectorise the reduction (a norm needs no fixed order). A
    # float32 value's square cannot overflow float64, and NaN/Inf still propagate (no
    # "nnan"/"ninf" flags), so a non-finite result means the array holds one.
    quarter = x.size // 4
    s0 = s1 = s2 = s3 = 0.0
    for i in range(quarter):
        v0 = np.float64(x[i])
        v1 = np.float64(x[quarter + i])
        v2 = np.float64(x[2 * quarter + i])
        v3 = np.float64(x[3 * quarter + i])
        s0 += v0 * v0
        s1 += v1 * v1
        s2 += v2 * v2
        s3 += v3 * v3
    for i in range(4 * quarter, x.size):
        v0 = np.float64(x[i])
        s0 += v0 * v0
    return (s0 + s1) + (s2 + s3)


@_jit(fastmath={"reassoc", "contract"})
def _dot(x: np.ndarray, y: np.ndarray) -> float:
    # Quarters like `_sum_of_squares`; float32 products cannot overflow float64.
    quarter = x.size // 4
    s0 = s1 = s2 = s3 = 0.0
    for i in range(quarter):
        s0 += np.float64(x[i]) * np.float64(y[i])
        s1 += np.float64(x[quarter + i]) * np.float64(y[quarter + i])
        s2 += np.float64(x[2 * quarter + i]) * np.float64(y[2 * quarter + i])
        s3 += np.float64(x[3 * quarter + i]) * np.float64(y[3 * quarter + i])
    for i in range(4 * quarter, x.size):
        s0 += np.float64(x[i]) * np.float64(y[i])
    return (s0 + s1) + (s2 + s3)


@_jit(fastmath={"reassoc", "contract"})
def _squares_and_dot(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    # `_sum_of_squares` and `_dot` in one read of x (y is read once too): two halves of
    # each, so four streams in all.
    half = x.size // 2
    q0 = q1 = d0 = d1 = 0.0
    for i in range(half):
        a = np.float64(x[i])
        b = np.float64(x[half + i])
        q0 += a * a
        q1 += b * b
        d0 += a * np.float64(y[i])
        d1 += b * np.float64(y[half + i])
    for i in range(2 * half, x.size):
        a = np.float64(x[i])
        q0 += a * a
        d0 += a * np.float64(y[i])
    return q0 + q1, d0 + d1


@_jit
def _divide_into(out: np.ndarray, acc: np.ndarray, divisor: float) -> None:
    for i in range(acc.size):
        out[i] = np.float32(acc[i] / divisor)


@_jit
def _fold1(acc: np.ndarray, x0: np.ndarray, w0: float) -> None:
    # Four quarters side by side (see above); each element's sum is the same.
    quarter = acc.size // 4
    for i in range(quarter):
        acc[i] += w0 * np.float64(x0[i])
        acc[quarter + i] += w0 * np.float64(x0[quarter + i])
        acc[2 * quarter + i] += w0 * np.float64(x0[2 * quarter + i])
        acc[3 * quarter + i] += w0 * np.float64(x0[3 * quarter + i])
    for i in range(4 * quarter, acc.size):
        acc[i] += w0 * np.float64(x0[i])


@_jit
def _fold2(acc: np.ndarray, x0: np.ndarray, x1: np.ndarray, w0: float, w1: float) -> None:
    half = acc.size // 2
    for i in range(half):
        s = acc[i] + w0 * np.float64(x0[i])
        acc[i] = s + w1 * np.float64(x1[i])
        j = half + i
        s = acc[j] + w0 * np.float64(x0[j])
        acc[j] = s + w1 * np.float64(x1[j])
    for i in range(2 * half, acc.size):
        s = acc[i] + w0 * np.float64(x0[i])
        acc[i] = s + w1 * np.float64(x1[i])


@_jit
def _fold4(acc: np.ndarray, x0: np.ndarray, x1: np.ndarray, x2: np.ndarray, x3: np.ndarray,
           w0: float, w1: float, w2: float, w3: float) -> None:
    for i in range(acc.size):
        s = acc[i] + w0 * np.float64(x0[i])
        s += w1 * np.float64(x1[i])
        s += w2 * np.float64(x2[i])
        acc[i] = s + w3 * np.float64(x3[i])


@_jit
def _fold8(acc: np.ndarray, x0: np.ndarray, x1: np.ndarray, x2: np.ndarray, x3: np.ndarray,
           x4: np.ndarray, x5: np.ndarray, x6: np.ndarray, x7: np.ndarray,
           w0: float, w1: float, w2: float, w3: float,
           w4: float, w5: float, w6: float, w7: float) -> None:
    for i in range(acc.size):
        s = acc[i] + w0 * np.float64(x0[i])
        s += w1 * np.float64(x1[i])
        s += w2 * np.float64(x2[i])
        s += w3 * np.float64(x3[i])
        s += w4 * np.float64(x4[i])
        s += w5 * np.float64(x5[i])
        s += w6 * np.float64(x6[i])
        acc[i] = s + w7 * np.float64(x7[i])


def sum_of_squares(x: np.ndarray) -> float:
    """The sum of squares of a flat float32 array, in float64 (NaN/Inf if it holds one)."""
    return float(_sum_of_squares(x))


def dot(x: np.ndarray, y: np.ndarray) -> float:
    """The inner product of two flat float32 arrays of one length, in float64, with no
    float64 copy of either."""
    if x.shape != y.shape:
        raise ValueError(f"arrays of {x.size} and {y.size} values")
    return float(_dot(x, y))


def squares_and_dot(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """`sum_of_squares(x)` and `dot(x, y)` from one read of each array."""
    if x.shape != y.shape:
        raise ValueError(f"arrays of {x.size} and {y.size} values")
    squares, total = _squares_and_dot(x, y)
    return float(squares), float(total)


def divide_into(out: np.ndarray, acc: np.ndarray, divisor: float) -> None:
    """``out = float32(acc / divisor)`` element by element (flat float32 out, float64 acc):
    one rounding, as ``(acc / divisor).to(torch.float32)``."""
    _divide_into(out, acc, float(divisor))


def fold_group(acc: np.ndarray, xs: Sequence[np.ndarray], weights: Sequence[float]) -> None:
    """``acc += weights[0] * xs[0]; acc += weights[1] * xs[1]; ...`` element by element in
    float64, in that order, with ``acc`` (flat float64) read and written once per eight
    arrays (flat float32, each as long as ``acc``)."""
    if len(xs) != len(weights):
        raise ValueError(f"{len(xs)} arrays but {len(weights)} weights")
    start = 0
    while len(xs) - start >= 8:
        _fold8(acc, *xs[start:start + 8], *(float(w) for w in weights[start:start + 8]))
        start += 8
    if len(xs) - start >= 4:
        _fold4(acc, *xs[start:start + 4], *(float(w) for w in weights[start:start + 4]))
        start += 4
    if len(xs) - start >= 2:
        _fold2(acc, *xs[start:start + 2], *(float(w) for w in weights[start:start + 2]))
        start += 2
    if len(xs) - start == 1:
        _fold1(acc, xs[start], float(weights[start]))


@_jit
def _order_block(block: np.ndarray, count: int, columns: int, network: np.ndarray,
                 ranks: np.ndarray, wires: np.ndarray, total: np.ndarray, out: np.ndarray) -> None:
    # Each comparator writes the min and max of two wires' rows into two spare rows,
    # which become those wires (the old rows become the spares): every store is then
    # unconditional. Updating in place lets LLVM turn the store of an unchanged value
    # into a masked store, which AMD's Zen cores run several times slower. Min and max
    # only move values, so each column keeps its values exactly.
    for w in range(count):
        wires[w] = w
    spare_low = count
    spare_high = count + 1
    for c in range(network.shape[0]):
        low = network[c, 0]
        high = network[c, 1]
        row_a = block[wires[low]]
        row_b = block[wires[high]]
        to_low = block[spare_low]
        to_high = block[spare_high]
        for j in range(columns):
            a = row_a[j]
            b = row_b[j]
            ordered = a <= b
            to_low[j] = a if ordered else b
            to_high[j] = b if ordered else a
        spare_low, wires[low] = wires[low], spare_low
        spare_high, wires[high] = wires[high], spare_high
    # Row by row (contiguous, vectorised), each column's sum still in rank order.
    kept = ranks.size
    first = block[wires[ranks[0]]]
    for j in range(columns):
        total[j] = np.float64(first[j])
    for r in range(1, kept):
        row = block[wires[ranks[r]]]
        for j in range(columns):
            total[j] += np.float64(row[j])
    for j in range(columns):
        out[j] = np.float32(total[j] / kept)


@_jit
def _order_columns(sources: Any, network: np.ndarray, ranks: np.ndarray, out: np.ndarray,
                   width: int) -> bool:
    count = len(sources)
    block = np.empty((count + 2, width), dtype=np.float32)
    wires = np.empty(count, dtype=np.int64)
    total = np.empty(width, dtype=np.float64)
    # x - x is 0 for every finite x and NaN for NaN and +-Inf: one add per value, in the
    # copy that brings it into the slice anyway, tells whether every value was finite.
    poison = np.zeros(width, dtype=np.float32)
    size = out.size
    for start in range(0, size, width):
        columns = min(width, size - start)
        for r in range(count):
            source = sources[r]
            row = block[r]
            for j in range(columns):
                value = source[start + j]
                row[j] = value
                poison[j] += value - value
        _order_block(block, count, columns, network, ranks, wires, total, out[start:])
    for j in range(width):
        if poison[j] != 0:  # NaN compares unequal to everything
            return False
    return True


def order_columns(sources: Sequence[np.ndarray], network: np.ndarray, ranks: np.ndarray,
                  out: np.ndarray, width: int) -> bool:
    """For every column of the rows `sources` (flat float32 arrays as long as `out`),
    `width` columns at a time: apply the comparators `network` (int64 ``[m, 2]``: low,
    high wires), then write to `out` (float32) the column's mean of the wires `ranks`
    (int64), summed in float64 in that order and rounded once. False when some source
    holds NaN or Inf (then `out` means nothing)."""
    return bool(_order_columns(typed.List(sources), network, ranks, out, int(width)))
