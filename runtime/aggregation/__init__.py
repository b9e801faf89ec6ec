"""Aggregation: pure functions and small stateful folds over model tensors.

- `catalog`: the strategy catalog (one `StrategyRule` per rule, `AggregationConfig`);
  pure data, no torch, so the API's validator can read it.
- `registry`: the catalog bound to arithmetic (`aggregate_buffered`, `server_optimizer_for`).
- `weighted`: FedAvg's weighted mean, streaming (`WeightedSum`) and reference.
- `robust`: Krum / Multi-Krum, coordinate-wise median, trimmed mean, Bulyan.
- `server`: the server step (FedAvg, FedAvgM, FedAdam, FedYogi) with checkpointable state.
- `round`: `RoundAggregator`, what the coordinator uses for one round.
- `fednova`: FedNova's normalised sum for unequal local steps.
- `fedbuff`: FedBuff's staleness-weighted buffer for asynchronous rounds.

No network, cluster, API-model or I/O code lives here (import-linter contracts enforce
it). The torch-backed names below are imported on first use, not with the package:
`fedkube.runtime.spec` imports `catalog`, and the operator, which imports spec, must not
pay torch's start-up for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .catalog import (
    RULES,
    AggregationConfig,
    Feature,
    StrategyRule,
    bulyan_minimum,
    client_parameters,
    krum_minimum,
    minimum_updates,
    rule_for,
    rule_names,
)

if TYPE_CHECKING:
    from ._tensors import UpdateStats, Weights
    from .fedbuff import FedBuffBuffer, FedBuffConfig, Flush, StaleUpdateError, staleness_weight
    from .fednova import NormalizedSum, fednova_reference
    from .registry import aggregate_buffered, server_optimizer_for
    from .robust import (
        RobustResult,
        TooFewUpdatesError,
        bulyan,
        coordinate_median,
        krum,
        trimmed_mean,
    )
    from .round import AggregateOutcome, BufferFullError, RoundAggregator, UpdateTransform
    from .server import ServerOptimizer, ServerOptimizerConfig, ServerOptimizerName
    from .weighted import Bound, EmptyAggregationError, WeightedSum, weighted_mean

_LAZY = {
    "UpdateStats": "_tensors",
    "Weights": "_tensors",
    "aggregate_buffered": "registry",
    "server_optimizer_for": "registry",
    "RobustResult": "robust",
    "TooFewUpdatesError": "robust",
    "bulyan": "robust",
    "coordinate_median": "robust",
    "krum": "robust",
    "trimmed_mean": "robust",
    "AggregateOutcome": "round",
    "BufferFullError": "round",
    "RoundAggregator": "round",
    "UpdateTransform": "round",
    "ServerOptimizer": "server",
    "ServerOptimizerConfig": "server",
    "ServerOptimizerName": "server",
    "Bound": "weighted",
    "EmptyAggregationError": "weighted",
    "FedBuffBuffer": "fedbuff",
    "FedBuffConfig": "fedbuff",
    "Flush": "fedbuff",
    "StaleUpdateError": "fedbuff",
    "staleness_weight": "fedbuff",
    "NormalizedSum": "fednova",
    "fednova_reference": "fednova",
    "WeightedSum": "weighted",
    "weighted_mean": "weighted",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "RULES",
    "AggregateOutcome",
    "AggregationConfig",
    "Bound",
    "BufferFullError",
    "EmptyAggregationError",
    "Feature",
    "FedBuffBuffer",
    "FedBuffConfig",
    "Flush",
    "NormalizedSum",
    "RobustResult",
    "RoundAggregator",
    "ServerOptimizer",
    "ServerOptimizerConfig",
    "ServerOptimizerName",
    "StaleUpdateError",
    "StrategyRule",
    "TooFewUpdatesError",
    "UpdateStats",
    "UpdateTransform",
    "WeightedSum",
    "Weights",
    "aggregate_buffered",
    "bulyan",
    "bulyan_minimum",
    "client_parameters",
    "coordinate_median",
    "fednova_reference",
    "krum",
    "krum_minimum",
    "minimum_updates",
    "rule_for",
    "rule_names",
    "server_optimizer_for",
    "staleness_weight",
    "trimmed_mean",
    "weighted_mean",
]
