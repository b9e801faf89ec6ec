"""The strategy registry: the catalog's rules (`catalog.py`) bound to their arithmetic.

`catalog.py` says what each rule needs; this module adds what torch must do for it: the
aggregate function of every buffered rule and the server step that follows any rule.
Adding a rule is its catalog entry plus, if it is buffered, one line in `_BUFFERED`
(import fails, naming the rule, when the two disagree).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

from ._tensors import Weights
from .catalog import RULES, AggregationConfig, StrategyRule, rule_for
from .robust import RobustResult, bulyan, coordinate_median, krum, trimmed_mean
from .server import ServerOptimizer, ServerOptimizerConfig

BufferedAggregate = Callable[[Sequence[Weights], AggregationConfig], RobustResult]
"""A buffered rule: the round's updates (never modified) and the job's config."""

_BUFFERED: Mapping[str, BufferedAggregate] = MappingProxyType({
    "krum": lambda updates, config: krum(updates, byzantine=config.byzantine),
    # Blanchard et al. average the m = n - f best-scored updates.
    "multikrum": lambda updates, config: krum(
        updates, byzantine=config.byzantine, select=len(updates) - config.byzantine
    ),
    "median": lambda updates, config: coordinate_median(updates),
    "trimmedmean": lambda updates, config: trimmed_mean(updates, beta=config.trim_beta),
    "bulyan": lambda updates, config: bulyan(updates, byzantine=config.byzantine),
})


def _check_bound() -> None:
    buffered = {rule.name for rule in RULES if rule.buffered}
    unbound = sorted(buffered - set(_BUFFERED))
    stray = sorted(set(_BUFFERED) - buffered)
    if unbound or stray:
        raise ImportError(
            f"strategy registry out of step with the catalog: buffered rules without an "
            f"aggregate function {unbound}, aggregate functions of no buffered rule {stray}"
        )


_check_bound()


def aggregate_buffered(config: AggregationConfig, updates: Sequence[Weights]) -> RobustResult:
    """Apply `config`'s buffered rule to a round's `updates`."""
    rule = rule_for(config.rule)
    if not rule.buffered:
        raise ValueError(f"rule {rule.name!r} is streaming; fold its updates into a WeightedSum")
    return _BUFFERED[rule.name](updates, config)


def server_optimizer_for(config: AggregationConfig) -> ServerOptimizer:
    """The server step for `config`: fedadam and fedyogi are their own; every other rule
    (fedprox's proximal term acts on clients only) applies its aggregate with a fedavg
    step of size server_learning_rate, with heavy-ball momentum (FedAvgM) when
    server_momentum > 0."""
    rule: StrategyRule = rule_for(config.rule)
    name = rule.server_step
    if name == "fedavg" and config.server_momentum > 0:
        name = "fedavgm"
    return ServerOptimizer(
        ServerOptimizerConfig(
            name=name,
            learning_rate=config.server_learning_rate,
            beta1=config.beta1,
            beta2=config.beta2,
            tau=config.tau,
            momentum=config.server_momentum,
        )
    )
