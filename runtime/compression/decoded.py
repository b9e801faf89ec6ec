"""A received update whose tensors are decoded one at a time, when read.

The coordinator holds the encodings (a compressed update's bytes) and hands the
aggregation fold this mapping: each tensor is decoded when the fold reads it and dropped
after, so no densified copy of the whole update exists at once and memory stays O(model)
plus the encoded bytes. Every encoding is parsed and checked when the mapping is built,
so a malformed one is refused before anything reads it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from .codec import EncodedTensor, EncodingError, Parsed, densify, parse


class DecodedUpdate(Mapping[str, torch.Tensor]):
    """`parts` by name: raw tensors as they are, encodings decoded on each read into
    `dtypes[name]` (float32 when absent). Raises EncodingError (naming the tensor) for a
    malformed encoding or one whose shape is not `shapes[name]`."""

    def __init__(self, parts: Mapping[str, EncodedTensor | torch.Tensor],
                 shapes: Mapping[str, tuple[int, ...]],
                 dtypes: Mapping[str, torch.dtype] | None = None) -> None:
        self._parts: dict[str, Parsed | torch.Tensor] = {}
        self._dtypes = dict(dtypes or {})
        for name, part in parts.items():
            if isinstance(part, EncodedTensor):
                if tuple(part.shape) != tuple(shapes.get(name, part.shape)):
                    raise EncodingError(
                        f"tensor {name!r}: shape {part.shape} != expected {shapes[name]}")
                try:
                    self._parts[name] = parse(part)
                except EncodingError as error:
                    raise EncodingError(f"tensor {name!r}: {error}") from None
            else:
                self._parts[name] = part

    def __getitem__(self, name: str) -> torch.Tensor:
        part = self._parts[name]
        if isinstance(part, torch.Tensor):
            return part
        dense = densify(part)
        dtype = self._dtypes.get(name, torch.float32)
        return dense if dense.dtype == dtype else dense.to(dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    @property
    def encoded(self) -> int:
        """How many tensors arrived encoded."""
        return sum(not isinstance(p, torch.Tensor) for p in self._parts.values())
