"""Shared checks and conversions for the aggregation rules.

Every rule works on the same shape of data: a model's tensors by name, in state_dict
order. Aggregation arithmetic runs in float64 and is cast back to each tensor's own dtype
at the end, so float32 models lose nothing to summation order and integer buffers (such
as BatchNorm's ``num_batches_tracked``) come back as integers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import _kernels

Weights = dict[str, Tensor]
"""A model's tensors by name, in state_dict order (a model, or a delta from one)."""

ACCUMULATOR_DTYPE = torch.float64


class TensorMeta(NamedTuple):
    """What aggregation needs to know about one tensor of the template."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


Layout = tuple[TensorMeta, ...]


def layout_of(template: Mapping[str, Tensor]) -> Layout:
    """The names, shapes and dtypes of `template`, in its order.

    Complex tensors are refused: averaging them in float64 would drop the imaginary
    part silently, and no model in the zoo has any.
    """
    if not template:
        raise ValueError("the template has no tensors")
    metas = []
    for name, tensor in template.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.is_complex():
            raise TypeError(f"tensor {name!r}: complex dtype {tensor.dtype} is not supported")
        metas.append(TensorMeta(name, tensor.shape, tensor.dtype, tensor.device))
    return tuple(metas)


def check_matches(layout: Layout, update: Mapping[str, Tensor], *,
                  what: str = "update", reference: Mapping[str, Tensor] | None = None
                  ) -> UpdateStats:
    """Raise ValueError naming the first tensor of `update` that does not fit `layout`;
    return its `UpdateStats` (taken in the same read as the finiteness check; with
    `reference`, its inner product with it too: `measure`).

    Checked: the same names (none missing, none extra), the same shapes, no complex
    dtype, and only finite values in floating tensors (one NaN would poison the global
    model for every later round).
    """
    check_structure(layout, update, what=what)
    return measure(layout, update, what=what, reference=reference)


def check_structure(layout: Layout, update: Mapping[str, Tensor], *, what: str = "update") -> None:
    """`check_matches` without the finiteness check (names, types, shapes, dtypes)."""
    expected = {meta.name for meta in layout}
    missing = [meta.name for meta in layout if meta.name not in update]
    if missing:
        raise ValueError(f"{what} lacks tensor {missing[0]!r} ({len(missing)} missing)")
    extra = [name for name in update if name not in expected]
    if extra:
        raise ValueError(f"{what} has unexpected tensor {extra[0]!r} ({len(extra)} extra)")
    for meta in layout:
        tensor = update[meta.name]
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f"{what} tensor {meta.name!r}: expected a torch.Tensor, "
                f"got {type(tensor).__name__}"
            )
        if tensor.shape != meta.shape:
            raise ValueError(
                f"{what} tensor {meta.name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(meta.shape)}"
            )
        if tensor.is_complex():
            raise ValueError(f"{what} tensor {meta.name!r}: complex dtype {tensor.dtype}")


class UpdateStats(NamedTuple):
    """What one read of an update tells: the L2 norm of all its floating tensors as one
    vector (the update as sent), and, when it was measured against a reference, the inner
    product with it (over the floating tensors the reference has). Only finite updates
    get stats; others are refused."""

    norm: float
    dot: float | None = None


def _dot(tensor: Tensor, other: Tensor) -> float:
    return float(tensor.reshape(-1).to(torch.float64).dot(other.reshape(-1).to(torch.float64)))


def _fusable(tensor: Tensor, other: Tensor) -> bool:
    """Whether `other` can be read beside float32 CPU `tensor` in one compiled loop."""
    return (other.dtype == torch.float32 and other.device.type == "cpu"
            and other.shape == tensor.shape and other.is_contiguous())


def measure(layout: Layout, update: Mapping[str, Tensor], *, what: str = "update",
            reference: Mapping[str, Tensor] | None = None) -> UpdateStats:
    """Finiteness and norm of `update` in one read of each floating tensor (and, with
    `reference`, the inner product with it: for float32 tensors in that same read).

    float32 tensors on the CPU go through one compiled loop each (`_kernels`), squares
    summed in float64. Other floating dtypes: one fused call (``torch._foreach_norm``, what `torch.nn.utils.clip_grad_norm_` uses)
    gives each tensor's norm in its own precision. Every norm finite proves every element
    finite; a non-finite norm is either a NaN/Inf (named in a ValueError after an
    element-wise look) or finite values whose squares overflow (a hostile update of huge
    values), whose norm is then redone in float64: a second pass only for those.

    A mapping other than a dict (a compressed update, which decodes each tensor when it
    is read) is measured one tensor at a time instead, so its decoded tensors never all
    exist at once; in float64, where float32 values cannot overflow.
    """
    dot = None if reference is None else 0.0
    if not isinstance(update, dict):
        squares = 0.0
        for meta in layout:
            tensor = update[meta.name]
            if tensor.is_floating_point():
                norm = float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float64))
                if not math.isfinite(norm):
                    check_finite(layout, update, what=what, confirmed=False)
                squares += norm * norm
                if reference is not None and meta.name in reference:
                    dot += _dot(tensor.detach(), reference[meta.name])
            del tensor
        return UpdateStats(math.sqrt(squares), dot)
    # float32 on the CPU (nearly every model): one compiled pass per tensor, summing
    # squares in float64, where they cannot overflow, so a non-finite sum is a NaN/Inf.
    compiled = 0.0
    floating = []
    for meta in layout:
        tensor = update[meta.name].detach()
        other = None if reference is None else reference.get(meta.name)
        if tensor.dtype == torch.float32 and tensor.device.type == "cpu":
            flat = tensor.reshape(-1).numpy()
            if other is not None and _fusable(tensor, other):
                squares_of, dot_of = _kernels.squares_and_dot(flat, other.reshape(-1).numpy())
                dot += dot_of
            else:
                squares_of = _kernels.sum_of_squares(flat)
                if other is not None:
                    dot += _dot(tensor, other)
            if not math.isfinite(squares_of):
                check_finite(layout, update, what=what, confirmed=False)
            compiled += squares_of
        elif tensor.is_floating_point():
            floating.append(tensor)
            if other is not None:
                dot += _dot(tensor, other)
    if not floating:
        return UpdateStats(math.sqrt(compiled), dot)
    norms = torch._foreach_norm(floating)
    squares = torch.stack([n.to(torch.float64) for n in norms]).square()
    if bool(torch.isfinite(squares).all()):
        return UpdateStats(math.sqrt(compiled + float(squares.sum())), dot)
    check_finite(layout, update, what=what, confirmed=False)
    return UpdateStats(math.sqrt(compiled + sum(
        float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in floating)), dot)


def check_finite(layout: Layout, update: Mapping[str, Tensor], *, what: str = "update",
                 confirmed: bool = True) -> None:
    """Raise ValueError naming the first floating tensor of `update` holding NaN or Inf.

    With `confirmed` (the default) one read of each tensor first (a finite sum proves
    every term finite; a sum that overflowed costs one more pass, never a rejection);
    without it, straight to the element-wise look (the caller already saw a non-finite
    reduction).
    """
    # Tensor by tensor, keeping only each sum: an update that decodes its tensors when
    # read (a compressed one) never has two of them decoded at once.
    partial = []
    for meta in layout:
        tensor = update[meta.name]
        if tensor.is_floating_point():
            partial.append(tensor.detach().sum().to(torch.float32))
        del tensor
    if not partial:
        return
    if confirmed:
        sums = torch.stack(partial)
        if bool(torch.isfinite(sums).all()):
            return
    for meta in layout:
        tensor = update[meta.name]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{what} tensor {meta.name!r} contains NaN or Inf")


def to_accumulator(tensor: Tensor, meta: TensorMeta) -> Tensor:
    """`tensor` as float64 on the template's device (a copy whenever a cast is needed)."""
    return tensor.detach().to(device=meta.device, dtype=ACCUMULATOR_DTYPE)


def cast_back(value: Tensor, dtype: torch.dtype) -> Tensor:
    """A float64 result in the template's `dtype`.

    Non-floating tensors are rounded half to even before the cast: a plain cast would
    truncate towards zero, so the mean of counters 1 and 2 would become 1 and negative
    deltas would drift upward.
    """
    if dtype.is_floating_point:
        return value.to(dtype)
    return torch.round(value).to(dtype)


def flatten(updates: Sequence[Mapping[str, Tensor]], layout: Layout) -> Tensor:
    """The updates as rows of one float64 matrix ``[len(updates), numel of the model]``.

    Each update must already have passed `check_matches`.
    """
    rows = torch.empty(
        (len(updates), sum(meta.numel for meta in layout)),
        dtype=ACCUMULATOR_DTYPE,
        device=layout[0].device,
    )
    offset = 0
    for meta in layout:
        end = offset + meta.numel
        for row, update in enumerate(updates):
            rows[row, offset:end] = to_accumulator(update[meta.name], meta).reshape(-1)
        offset = end
    return rows


def unflatten(vector: Tensor, layout: Layout) -> Weights:
    """Split a flat float64 vector back into tensors of the template's shapes and dtypes."""
    out: Weights = {}
    offset = 0
    for meta in layout:
        end = offset + meta.numel
        out[meta.name] = cast_back(vector[offset:end].reshape(meta.shape), meta.dtype)
        offset = end
    return out


def check_updates(updates: Sequence[Mapping[str, Tensor]]) -> Layout:
    """The layout shared by all `updates` (taken from the first); ValueError otherwise."""
    if not updates:
        raise ValueError("no updates to aggregate")
    layout = layout_of(updates[0])
    for index, update in enumerate(updates):
        check_matches(layout, update, what=f"update {index}")
    return layout
