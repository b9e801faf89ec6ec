"""The strategy catalog: what each aggregation rule needs and what it cannot combine with.

One `StrategyRule` per rule, in `RULES`. The coordinator, the aggregator and the API's
validator all read it: the validator takes the rule names and the incompatibilities
from here, the coordinator its client parameters (FedProx's mu) and floors
(`minimum_updates`), the aggregator whether a rule buffers and which server step follows.
The arithmetic of buffered rules is bound to these names in `registry.py`.

This module is pure data and standard library only, so `fedkube.runtime.spec` (and through
it the operator) can read it without loading torch; `aggregation/__init__.py` imports its
torch-heavy modules lazily for the same reason. An import-linter contract keeps it so.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, get_args

ServerStep = Literal["fedavg", "fedadam", "fedyogi"]
"""The server step that applies a round's aggregate (Reddi et al., 2021)."""

Fold = Literal["weighted", "centered_clip"]
"""How a streaming rule folds each update: into a weighted sum, or clipped around the
previous aggregate first (centered clipping)."""


class Feature(str, enum.Enum):
    """Job features a rule may be unable to work with (the value is how messages name it)."""

    central_privacy = "central privacy"
    secure_aggregation = "secure aggregation"
    asynchronous_rounds = "asynchronous rounds"


@dataclass(frozen=True)
class AggregationConfig:
    """The aggregation layer's own settings for one job (mapped from the API's
    StrategySpec by the coordinator; this layer never sees the API models).

    rule: a name in `RULES`. byzantine: attackers tolerated (krum, multikrum, bulyan).
    trim_beta: share trimmed from each end (trimmedmean). mu: FedProx's proximal weight.
    server_learning_rate, server_momentum, beta1, beta2, tau: the server step's settings.
    """

    rule: str = "fedavg"
    byzantine: int = 1
    clip_radius: float | None = None
    trim_beta: float = 0.1
    mu: float = 0.01
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        rule = rule_for(self.rule)
        if isinstance(self.byzantine, bool) or not isinstance(self.byzantine, int) or self.byzantine < 0:
            raise ValueError(f"byzantine must be an integer >= 0, got {self.byzantine!r}")
        if self.clip_radius is not None and not (
                math.isfinite(self.clip_radius) and self.clip_radius > 0):
            raise ValueError(f"clip_radius must be a finite number > 0, got {self.clip_radius!r}")
        if not 0 <= self.trim_beta < 0.5:
            raise ValueError(f"trim_beta must be in [0, 0.5), got {self.trim_beta!r}")
        if not (math.isfinite(self.mu) and self.mu >= 0):
            raise ValueError(f"mu must be >= 0, got {self.mu!r}")
        if not (math.isfinite(self.server_learning_rate) and self.server_learning_rate > 0):
            raise ValueError(
                f"server_learning_rate must be > 0, got {self.server_learning_rate!r}"
            )
        if not 0 <= self.server_momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1), got {self.server_momentum!r}")
        if self.server_momentum and rule.server_step != "fedavg":
            raise ValueError(momentum_refusal(rule))


def _no_client_parameters(_: AggregationConfig) -> Mapping[str, float]:
    return {}


def _one_update(_: AggregationConfig) -> int:
    return 1


def krum_minimum(byzantine: int) -> int:
    """Fewest updates Krum accepts with `byzantine` attackers: n > 2f + 2."""
    return 2 * _check_byzantine(byzantine) + 3


def bulyan_minimum(byzantine: int) -> int:
    """Fewest updates Bulyan accepts with `byzantine` attackers: n >= 4f + 3."""
    return 4 * _check_byzantine(byzantine) + 3


def _check_byzantine(byzantine: int) -> int:
    if isinstance(byzantine, bool) or not isinstance(byzantine, int) or byzantine < 0:
        raise ValueError(f"byzantine must be an integer >= 0, got {byzantine!r}")
    return byzantine


_ROBUST_REFUSALS = MappingProxyType({
    Feature.central_privacy: "DP-FedAvg noise is calibrated to a clipped mean",
    Feature.secure_aggregation: "the server sees only the masked sum, never single updates",
    Feature.asynchronous_rounds: "it needs a whole round's updates at once; asynchronous "
    "rounds fold each update as it arrives",
})

_STREAMING_COST = ("memory: one float64 running sum (2x a float32 model); time: one read per "
                   "update to check it, one pass over the sum per 8 waiting updates")


@dataclass(frozen=True)
class StrategyRule:
    """One aggregation rule and what it asks of the rest of the system.

    buffered: True when the rule needs every update of the round at once (the robust
    rules); False when updates are folded into a running weighted sum as they arrive.
    server_step: which server step applies the aggregate. minimum_updates: the fewest
    updates with which a round may close. client_parameters: extra hyper-parameters sent
    to clients in each task. incompatible_with: features the rule cannot run with, and
    why. cost: memory and time per round, for the docs (`cost_table`). fold: how a
    streaming rule folds each update (ignored for buffered rules).
    """

    name: str
    summary: str
    buffered: bool
    server_step: ServerStep
    cost: str
    minimum_updates: Callable[[AggregationConfig], int] = _one_update
    client_parameters: Callable[[AggregationConfig], Mapping[str, float]] = _no_client_parameters
    incompatible_with: Mapping[Feature, str] = field(default_factory=lambda: MappingProxyType({}))
    fold: Fold = "weighted"

    def __post_init__(self) -> None:
        if self.server_step not in get_args(ServerStep):
            raise ValueError(f"rule {self.name!r}: unknown server step {self.server_step!r}")


RULES: tuple[StrategyRule, ...] = (
    StrategyRule(
        name="fedavg",
        summary="FedAvg (McMahan et al., 2017): the mean delta weighted by num_samples.",
        buffered=False, server_step="fedavg", cost=_STREAMING_COST,
    ),
    StrategyRule(
        name="fedprox",
        summary="FedProx (Li et al., 2020): FedAvg whose clients add mu/2 ||w - w_global||^2.",
        buffered=False, server_step="fedavg", cost=_STREAMING_COST,
        client_parameters=lambda config: {"proximal_mu": config.mu},
    ),
    StrategyRule(
        name="fednova",
        summary="FedNova (Wang et al., 2020): each delta divided by its local steps, the mean "
        "scaled by the mean steps, so unequal local work keeps the objective consistent.",
        buffered=False, server_step="fedavg", cost=_STREAMING_COST,
        incompatible_with=MappingProxyType({
            Feature.asynchronous_rounds: "it normalises one round's updates by their local "
            "steps; asynchronous rounds weight each update by its staleness instead",
            Feature.secure_aggregation: "it divides each update by its own local steps; the "
            "server sees only the masked sum",
        }),
    ),
    StrategyRule(
        name="fedadam",
        summary="FedAdam (Reddi et al., 2021): the weighted mean, applied by an Adam step.",
        buffered=False, server_step="fedadam",
        cost=_STREAMING_COST + "; the server step keeps two more moments (2 models)",
    ),
    StrategyRule(
        name="fedyogi",
        summary="FedYogi (Reddi et al., 2021): the weighted mean, applied by a Yogi step.",
        buffered=False, server_step="fedyogi",
        cost=_STREAMING_COST + "; the server step keeps two more moments (2 models)",
    ),
    StrategyRule(
        name="centeredclip",
        summary="Centered clipping (Karimireddy et al., 2021): each update clipped to a radius "
        "around the previous aggregate as it arrives, then averaged; robust and streaming.",
        buffered=False, server_step="fedavg", fold="centered_clip",
        cost="memory: one float64 running sum plus the previous aggregate (3x a float32 "
        "model); time: two passes per update",
        incompatible_with=MappingProxyType({
            Feature.central_privacy: "DP-FedAvg clips around zero and calibrates its noise to "
            "that clip; centered clipping clips around the previous aggregate",
            Feature.secure_aggregation: "it clips each update, which the server never sees "
            "under secure aggregation",
            Feature.asynchronous_rounds: "it clips around the previous round's aggregate; "
            "asynchronous rounds have no rounds to clip around",
        }),
    ),
    StrategyRule(
        name="krum",
        summary="Krum (Blanchard et al., 2017): the update closest to its n - f - 2 neighbours.",
        buffered=True, server_step="fedavg",
        cost="memory: every update plus one float64 matrix of them (n models, 2n in float64); "
        "time: one n x n Gram product",
        minimum_updates=lambda config: krum_minimum(config.byzantine),
        incompatible_with=_ROBUST_REFUSALS,
    ),
    StrategyRule(
        name="multikrum",
        summary="Multi-Krum (Blanchard et al., 2017): the mean of the n - f best Krum scores.",
        buffered=True, server_step="fedavg",
        cost="memory: every update plus one float64 matrix of them (n models, 2n in float64); "
        "time: one n x n Gram product",
        minimum_updates=lambda config: krum_minimum(config.byzantine),
        incompatible_with=_ROBUST_REFUSALS,
    ),
    StrategyRule(
        name="median",
        summary="Coordinate-wise median (Yin et al., 2018).",
        buffered=True, server_step="fedavg",
        cost="memory: every update (n models) plus an n-row slice of the model; "
        "time: a sorting network over model slices, about 1-1.7x FedAvg one update at a time "
        "(1.1-3x batched) at 50 updates (bench/aggregation.py)",
        incompatible_with=_ROBUST_REFUSALS,
    ),
    StrategyRule(
        name="trimmedmean",
        summary="Coordinate-wise trimmed mean (Yin et al., 2018): drop the extremes, average.",
        buffered=True, server_step="fedavg",
        cost="memory: every update (n models) plus an n-row slice of the model; "
        "time: a sorting network over model slices, about 1-1.7x FedAvg one update at a time "
        "(1.1-3x batched) at 50 updates (bench/aggregation.py)",
        incompatible_with=_ROBUST_REFUSALS,
    ),
    StrategyRule(
        name="bulyan",
        summary="Bulyan (El Mhamdi et al., 2018): Krum picks, then a trimmed mean around the median.",
        buffered=True, server_step="fedavg",
        cost="memory: every update plus one float64 matrix of them (n models, 2n in float64); "
        "time: n - 2f Krum picks and a sort per coordinate",
        minimum_updates=lambda config: bulyan_minimum(config.byzantine),
        incompatible_with=_ROBUST_REFUSALS,
    ),
)

_BY_NAME: Mapping[str, StrategyRule] = MappingProxyType({rule.name: rule for rule in RULES})


def rule_names() -> tuple[str, ...]:
    """Every rule's name, in the catalog's order."""
    return tuple(_BY_NAME)


def rule_for(name: str) -> StrategyRule:
    """The rule called `name`; ValueError listing the known names otherwise."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown aggregation rule {name!r}; expected one of {', '.join(_BY_NAME)}"
        ) from None


ANOMALY_COST = ("anomaly scores (every rule): two floats per update and the previous "
                "aggregate (1 model), one more pass per update; buffered rules add, at close, "
                "a coordinate-wise median of the buffer (as the median rule) and two passes "
                "over it")
"""What the per-update anomaly scores cost on top of each rule (aggregation/anomaly.py)."""


def cost_table() -> str:
    """Every rule's memory and time per round, as a Markdown table (README's)."""
    lines = ["| rule | buffers updates | memory and time per round |", "|---|---|---|"]
    lines += [f"| {rule.name} | {'yes' if rule.buffered else 'no'} | {rule.cost} |"
              for rule in RULES]
    return "\n".join(lines)


def minimum_updates(config: AggregationConfig) -> int:
    """The fewest updates with which a round under `config` can close."""
    return rule_for(config.rule).minimum_updates(config)


def client_parameters(config: AggregationConfig) -> Mapping[str, float]:
    """Hyper-parameters the rule asks each client to train with (e.g. proximal_mu)."""
    return dict(rule_for(config.rule).client_parameters(config))


def momentum_refusal(rule: StrategyRule) -> str:
    """Why server momentum cannot go with `rule` (its step has a first moment of its own)."""
    return (
        f"server momentum applies to the fedavg server step; {rule.name!r} uses "
        f"{rule.server_step}, whose first moment is set by beta1"
    )
