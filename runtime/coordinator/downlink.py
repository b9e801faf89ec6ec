"""What GetModel sends: the global model serialised once per version however many
clients ask, and under spec.compression.downlink delta the exact change from a version
the client still holds, computed once per (held version, current version).

Memory stays O(model): the current version plus the `keep` versions before it that
clients downloaded (references to the engine's weights, which each server step replaces
rather than writes into), the current version's chunks, and at most `keep` deltas.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass

import torch

from .. import wire
from ..compression.downlink import ModelDelta, delta_of

Weights = dict[str, torch.Tensor]

#: Earlier versions kept for deltas: a client picked every other round still gets one.
KEEP_VERSIONS = 2


def delta_base(held: int | None, current: int, stored: Collection[int]) -> int | None:
    """The version to send a delta from, or None for the whole model: only from a
    version the client holds that is still stored and not newer than the current one
    (first round, a client that missed versions, a restarted coordinator: whole)."""
    if held is None or held > current or held not in stored:
        return None
    return held


class VersionStore:
    """The latest `keep + 1` versions added, oldest dropped first."""

    def __init__(self, keep: int = KEEP_VERSIONS) -> None:
        if keep < 0:
            raise ValueError(f"keep must be >= 0, not {keep}")
        self.keep = keep
        self._versions: OrderedDict[int, Weights] = OrderedDict()

    def add(self, version: int, weights: Weights) -> None:
        if version in self._versions:
            return
        self._versions[version] = weights
        while len(self._versions) > self.keep + 1:
            self._versions.popitem(last=False)

    def get(self, version: int) -> Weights | None:
        return self._versions.get(version)

    def versions(self) -> list[int]:
        return list(self._versions)


@dataclass(frozen=True)
class Download:
    """One GetModel response: its encoded chunks, the payload bytes they carry, and the
    version the tensors sent as deltas start from (None: the whole model)."""

    chunks: list[bytes]
    nbytes: int
    base: int | None


def _parts_for(old: Weights, new: Weights, lossless: str
               ) -> tuple[dict[str, torch.Tensor | ModelDelta], int]:
    """Each tensor as a delta from `old`, or raw where the delta would be no smaller."""
    parts: dict[str, torch.Tensor | ModelDelta] = {}
    nbytes = 0
    for name, tensor in new.items():
        delta = delta_of(old[name], tensor, lossless=lossless)  # type: ignore[arg-type]
        raw = tensor.numel() * tensor.element_size()
        if delta.lossless == "none" or delta.nbytes >= raw:
            parts[name], nbytes = tensor, nbytes + raw
        else:
            parts[name], nbytes = delta, nbytes + delta.nbytes
    return parts, nbytes


class ModelDownlink:
    """GetModel's responses for the engine's current (version, weights)."""

    def __init__(self, *, deltas: bool = False, lossless: str = "zstd",
                 keep: int = KEEP_VERSIONS) -> None:
        self.deltas = deltas
        self.lossless = lossless
        self.store = VersionStore(keep if deltas else 0)
        self._current: int | None = None
        self._whole: Download | None = None
        self._from: dict[int, Download] = {}  # base version -> delta to current
        self._building = asyncio.Lock()

    async def download(self, version: int, weights: Weights, *, held: int | None = None
                       ) -> Download:
        """The response for a client holding `held` (None: nothing usable)."""
        async with self._building:  # one build per response however many clients wait
            if version != self._current:
                # The old version's bytes go before the new ones are built.
                self._current, self._whole, self._from = version, None, {}
                self.store.add(version, weights)
            base = delta_base(held, version, self.store.versions()) if self.deltas else None
            if base is None:
                if self._whole is None:
                    self._whole = Download(
                        list(wire.serialized_chunks(weights, model_version=version)),
                        wire.encoded_size(weights), None)
                return self._whole
            cached = self._from.get(base)
            if cached is None:
                old = self.store.get(base)
                assert old is not None  # delta_base picks only stored versions
                cached = self._from[base] = await asyncio.to_thread(
                    self._build_delta, old, weights, version, base)
            return cached

    def _build_delta(self, old: Weights, new: Weights, version: int, base: int) -> Download:
        parts, nbytes = _parts_for(old, new, self.lossless)
        chunks = list(wire.serialized_model_chunks(parts, model_version=version,
                                                   base_version=base))
        return Download(chunks, nbytes, base)
