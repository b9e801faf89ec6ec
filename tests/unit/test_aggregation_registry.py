"""The strategy catalog and registry: every rule declared once, and asked by the API's
validator, the coordinator's mapping and the aggregator."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fedkube.runtime.aggregation import (
    RULES,
    AggregationConfig,
    Feature,
    client_parameters,
    minimum_updates,
    rule_for,
    rule_names,
)
from fedkube.runtime.aggregation.registry import aggregate_buffered
from fedkube.runtime.coordinator.strategy import aggregation_config
from fedkube.runtime.spec import ManifestError, StrategyName, StrategySpec, parse_job_spec


def test_every_rule_is_declared_once_and_is_the_api_enum() -> None:
    assert len(set(rule_names())) == len(RULES)
    assert [member.value for member in StrategyName] == list(rule_names())


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.name)
def test_every_entry_says_what_it_needs(rule) -> None:
    config = AggregationConfig(rule=rule.name)
    assert minimum_updates(config) >= 1
    assert isinstance(client_parameters(config), dict)
    assert rule.summary and rule.cost
    assert all(isinstance(feature, Feature) and reason for feature, reason in rule.incompatible_with.items())


def test_buffered_rules_are_the_robust_ones_and_only_they_buffer() -> None:
    buffered = {rule.name for rule in RULES if rule.buffered}
    assert buffered == {"krum", "multikrum", "median", "trimmedmean", "bulyan"}
    with pytest.raises(ValueError, match="'fedavg' is streaming"):
        aggregate_buffered(AggregationConfig(rule="fedavg"), [])


def test_client_parameters_and_floors() -> None:
    assert client_parameters(AggregationConfig(rule="fedprox", mu=0.3)) == {"proximal_mu": 0.3}
    assert client_parameters(AggregationConfig(rule="fedavg", mu=0.3)) == {}
    assert minimum_updates(AggregationConfig(rule="krum", byzantine=2)) == 7
    assert minimum_updates(AggregationConfig(rule="bulyan", byzantine=1)) == 7


def test_unknown_rule_and_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="unknown aggregation rule 'fedsgd'; expected one of fedavg"):
        rule_for("fedsgd")
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        AggregationConfig(rule="fedsgd")
    with pytest.raises(ValueError, match="trim_beta must be in"):
        AggregationConfig(rule="trimmedmean", trim_beta=0.5)
    with pytest.raises(ValueError, match="byzantine must be an integer"):
        AggregationConfig(rule="krum", byzantine=-1)
    with pytest.raises(ValueError, match="server_momentum must be in"):
        AggregationConfig(server_momentum=1.0)


@pytest.mark.parametrize(
    "rule", [rule for rule in RULES if Feature.central_privacy in rule.incompatible_with],
    ids=lambda rule: rule.name,
)
def test_validator_refuses_what_the_registry_says_naming_both_fields(rule) -> None:
    spec = {"model": "mlp", "strategy": {"name": rule.name},
            "privacy": {"mode": "central", "targetEpsilon": 1}}
    reason = rule.incompatible_with[Feature.central_privacy]
    with pytest.raises(ManifestError) as refused:
        parse_job_spec(spec)
    assert (f"strategy.name {rule.name!r} cannot be combined with privacy.mode central: {reason}"
            in str(refused.value))


@pytest.mark.parametrize(
    "rule", [rule for rule in RULES if Feature.central_privacy not in rule.incompatible_with],
    ids=lambda rule: rule.name,
)
def test_validator_accepts_what_the_registry_allows(rule) -> None:
    spec = parse_job_spec({"model": "mlp", "strategy": {"name": rule.name},
                           "privacy": {"mode": "central", "targetEpsilon": 1}})
    assert spec.strategy.name.value == rule.name


def test_server_momentum_refused_with_an_adaptive_step_naming_the_fields() -> None:
    with pytest.raises(ManifestError, match="serverMomentum cannot be combined with strategy.name 'fedadam'"):
        parse_job_spec({"model": "mlp", "strategy": {"name": "fedadam", "serverMomentum": 0.9}})


def test_coordinator_maps_every_spec_field_to_the_config() -> None:
    spec = StrategySpec(name="trimmedmean", mu=0.2, server_learning_rate=0.5, server_momentum=0.8,
                        beta1=0.7, beta2=0.9, tau=0.01, trim_beta=0.2, byzantine=3)
    assert aggregation_config(spec) == AggregationConfig(
        rule="trimmedmean", byzantine=3, trim_beta=0.2, mu=0.2, server_learning_rate=0.5,
        server_momentum=0.8, beta1=0.7, beta2=0.9, tau=0.01,
    )
    assert aggregation_config(StrategySpec()) == AggregationConfig()


def test_spec_and_the_catalog_load_without_torch() -> None:
    probe = ("import sys; import fedkube.runtime.spec, fedkube.runtime.aggregation.catalog; "
             "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-P", "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
