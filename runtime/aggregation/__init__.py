"""Aggregation: pure functions and small stateful folds over model tensors.

- `weighted`: FedAvg's weighted mean, streaming (`WeightedSum`) and reference.
- `robust`: Krum / Multi-Krum, coordinate-wise median, trimmed mean, Bulyan.
- `server`: the server step (FedAvg, FedAdam, FedYogi) with checkpointable state.
- `round`: `RoundAggregator`, what the coordinator uses for one round.

No network, cluster or I/O code lives here (an import-linter contract enforces it).
"""

from ._tensors import Weights
from .robust import (
    RobustResult,
    TooFewUpdatesError,
    bulyan,
    bulyan_minimum,
    coordinate_median,
    krum,
    krum_minimum,
    trimmed_mean,
)
from .round import (
    AggregateOutcome,
    BufferFullError,
    RoundAggregator,
    UpdateTransform,
    minimum_updates,
    server_optimizer_for,
)
from .server import ServerOptimizer, ServerOptimizerConfig, ServerOptimizerName
from .weighted import EmptyAggregationError, WeightedSum, weighted_mean

__all__ = [
    "AggregateOutcome",
    "BufferFullError",
    "EmptyAggregationError",
    "RobustResult",
    "RoundAggregator",
    "ServerOptimizer",
    "ServerOptimizerConfig",
    "ServerOptimizerName",
    "TooFewUpdatesError",
    "UpdateTransform",
    "WeightedSum",
    "Weights",
    "bulyan",
    "bulyan_minimum",
    "coordinate_median",
    "krum",
    "krum_minimum",
    "minimum_updates",
    "server_optimizer_for",
    "trimmed_mean",
    "weighted_mean",
]
