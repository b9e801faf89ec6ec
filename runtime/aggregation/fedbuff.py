"""FedBuff: buffered asynchronous aggregation.

Nguyen et al., 2022, "Federated Learning with Buffered Asynchronous Aggregation"
(AISTATS). Clients train continuously on whatever model they last fetched; the server
folds each update into a buffer as it arrives, down-weighted by its staleness s (how many
server steps the global model moved since the client's copy), and steps once the buffer
holds K updates:

    delta = (1/K) * sum_i w(s_i) * delta_i,    w(s) = 1 / (1 + s) ** exponent

(exponent 0.5 is the paper's 1/sqrt(1+s)). Updates staler than `max_staleness` are
refused. Memory is one running sum, O(model), whatever K is; `state_dict` /
`FedBuffBuffer.restore` carry a partly filled buffer across a coordinator restart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ._tensors import Weights
from .weighted import WeightedSum


def staleness_weight(staleness: int, *, exponent: float = 0.5) -> float:
    """w(s) = 1 / (1 + s) ** exponent; 1 for a fresh update (s = 0)."""
    if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
        raise ValueError(f"staleness must be an integer >= 0, got {staleness!r}")
    if not (math.isfinite(exponent) and exponent >= 0):
        raise ValueError(f"exponent must be >= 0, got {exponent!r}")
    return 1.0 / (1.0 + staleness) ** exponent


class StaleUpdateError(ValueError):
    """An update built on a model older than the buffer's max_staleness allows."""


@dataclass(frozen=True)
class FedBuffConfig:
    """buffer_size: K, updates per server step. staleness_exponent: of w(s).
    max_staleness: the stalest update accepted."""

    buffer_size: int = 10
    staleness_exponent: float = 0.5
    max_staleness: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.buffer_size, bool) or not isinstance(self.buffer_size, int) \
                or self.buffer_size < 1:
            raise ValueError(f"buffer_size must be an integer >= 1, got {self.buffer_size!r}")
        staleness_weight(0, exponent=self.staleness_exponent)
        if isinstance(self.max_staleness, bool) or not isinstance(self.max_staleness, int) \
                or self.max_staleness < 0:
            raise ValueError(f"max_staleness must be an integer >= 0, got {self.max_staleness!r}")


@dataclass(frozen=True)
class Flush:
    """A full buffer: the server step's delta, who contributed and how stale each was."""

    mean_delta: Weights
    node_ids: tuple[str, ...]
    staleness: tuple[int, ...]

    @property
    def mean_staleness(self) -> float:
        return sum(self.staleness) / len(self.staleness)


class FedBuffBuffer:
    """One server step's buffer. `add` until `full`, then `flush` (once)."""

    def __init__(self, template: Mapping[str, Tensor], config: FedBuffConfig) -> None:
        self.config = config
        self._sum = WeightedSum(template)
        self._nodes: list[str] = []
        self._staleness: list[int] = []
        self._flushed = False

    @property
    def count(self) -> int:
        return len(self._nodes)

    @property
    def full(self) -> bool:
        return self.count >= self.config.buffer_size

    def add(self, node_id: str, delta: Mapping[str, Tensor], staleness: int) -> bool:
        """Fold `delta`, built `staleness` server steps ago; True when the buffer is now
        full. StaleUpdateError past max_staleness; ValueError for a malformed delta or a
        full or flushed buffer. A refused update changes nothing."""
        if self._flushed or self.full:
            raise ValueError("this buffer is full; flush it and start another")
        if isinstance(staleness, int) and staleness > self.config.max_staleness:
            raise StaleUpdateError(
                f"update from {node_id!r} is {staleness} server steps stale; at most "
                f"{self.config.max_staleness} are accepted (strategy.maxStaleness)")
        weight = staleness_weight(staleness, exponent=self.config.staleness_exponent)
        self._sum.add(delta, weight, what=f"update from {node_id!r}")
        self._nodes.append(node_id)
        self._staleness.append(staleness)
        return self.full

    def state_dict(self) -> dict[str, Any]:
        """What was added so far, as plain data (the running sum, who, how stale)."""
        if self._flushed:
            raise RuntimeError("this buffer was flushed; its successor holds the state")
        return {"sum": self._sum.state_dict(), "node_ids": list(self._nodes),
                "staleness": list(self._staleness)}

    @classmethod
    def restore(cls, template: Mapping[str, Tensor], config: FedBuffConfig,
                state: Mapping[str, Any]) -> FedBuffBuffer:
        """A buffer continuing the one whose `state_dict` is `state`. ValueError when
        `state` does not fit the model or the config (e.g. already full under a smaller
        bufferSize: then it is refused, not flushed with more than K)."""
        buffer = cls(template, config)
        nodes, staleness = list(state.get("node_ids", ())), list(state.get("staleness", ()))
        if len(nodes) != len(staleness) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in staleness):
            raise ValueError("saved buffer: node_ids and staleness do not pair up")
        buffer._sum.load_state_dict(state.get("sum", {}))
        if buffer._sum.count != len(nodes):
            raise ValueError(f"saved buffer: its sum holds {buffer._sum.count} updates, "
                             f"its list {len(nodes)}")
        if len(nodes) >= config.buffer_size:
            raise ValueError(f"saved buffer holds {len(nodes)} updates, bufferSize is "
                             f"{config.buffer_size}")
        buffer._nodes, buffer._staleness = [str(n) for n in nodes], staleness
        return buffer

    def flush(self) -> Flush:
        """(1/K) sum w(s_i) delta_i over what was added (K: the count added)."""
        if self._flushed:
            raise RuntimeError("this buffer was already flushed")
        mean = self._sum.mean()  # sum w d / sum w
        factor = self._sum.total_weight / self.count
        self._flushed = True
        delta = {name: (t.double() * factor).to(t.dtype) if t.is_floating_point() else t
                 for name, t in mean.items()}
        return Flush(delta, tuple(self._nodes), tuple(self._staleness))
