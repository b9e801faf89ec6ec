"""The API's StrategySpec mapped to the aggregation layer's own frozen config.

`aggregation/` never sees the API models (an import-linter contract): the coordinator
hands it an `AggregationConfig` built here, by one pure function.
"""

from __future__ import annotations

from ..aggregation.catalog import AggregationConfig
from ..spec import StrategySpec


def aggregation_config(spec: StrategySpec) -> AggregationConfig:
    """The aggregation settings that `spec` asks for."""
    return AggregationConfig(
        rule=spec.name.value,
        byzantine=spec.byzantine,
        clip_radius=spec.clip_radius,
        trim_beta=spec.trim_beta,
        mu=spec.mu,
        server_learning_rate=spec.server_learning_rate,
        server_momentum=spec.server_momentum,
        beta1=spec.beta1,
        beta2=spec.beta2,
        tau=spec.tau,
    )
