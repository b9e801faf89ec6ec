"""RoundAggregator: what the coordinator folds a round's updates into."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from fedkube.runtime.aggregation import (
    AggregationConfig,
    BufferFullError,
    EmptyAggregationError,
    RoundAggregator,
    TooFewUpdatesError,
    minimum_updates,
    rule_for,
    rule_names,
    server_optimizer_for,
    weighted_mean,
)

Weights = dict[str, torch.Tensor]

TEMPLATE: Weights = {
    "layer.weight": torch.zeros(4, 3),
    "layer.bias": torch.zeros(3),
    "bn.num_batches_tracked": torch.zeros((), dtype=torch.int64),
}


def _delta(seed: int, scale: float = 0.01) -> Weights:
    generator = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": scale * torch.randn(4, 3, generator=generator),
        "layer.bias": scale * torch.randn(3, generator=generator),
        "bn.num_batches_tracked": torch.tensor(3),
    }


def _far(sign: float) -> Weights:
    return {
        "layer.weight": torch.full((4, 3), 40.0 * sign),
        "layer.bias": torch.full((3,), 40.0 * sign),
        "bn.num_batches_tracked": torch.tensor(3),
    }


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi"])
def test_averaging_strategies_weight_by_num_samples(name: str) -> None:
    aggregator = RoundAggregator(AggregationConfig(rule=name), TEMPLATE, max_buffered=0)
    pairs = [(_delta(seed), samples) for seed, samples in ((1, 10), (2, 30), (3, 60))]
    for index, (delta, samples) in enumerate(pairs):
        aggregator.add(f"node-{index}", delta, samples)
    outcome = aggregator.finish()
    expected = weighted_mean([(delta, float(samples)) for delta, samples in pairs])
    for tensor_name, tensor in expected.items():
        torch.testing.assert_close(outcome.mean_delta[tensor_name], tensor)
    assert outcome.used == ("node-0", "node-1", "node-2")
    assert outcome.set_aside == ()


def test_fedavg_keeps_no_per_client_tensors() -> None:
    aggregator = RoundAggregator(AggregationConfig(rule="fedavg"), TEMPLATE, max_buffered=0)
    alive = []
    for index in range(20):
        delta = _delta(index)
        alive.extend(weakref.ref(tensor) for tensor in delta.values())
        aggregator.add(f"node-{index}", delta, 5)
        del delta
        assert aggregator.buffered == 0
    gc.collect()
    # Nothing inside the aggregator still refers to any client's tensors.
    assert all(ref() is None for ref in alive)
    assert aggregator.count == 20
    assert aggregator.finish().used == tuple(f"node-{i}" for i in range(20))


def test_uniform_weights_ignore_num_samples_and_transform_applies_to_each_delta() -> None:
    def clip_to_unit_norm(delta: Weights) -> Weights:
        norm = torch.sqrt(sum(t.double().pow(2).sum() for t in delta.values() if t.is_floating_point()))
        factor = min(1.0, 1.0 / float(norm))
        return {k: t * factor if t.is_floating_point() else t.clone() for k, t in delta.items()}

    deltas = [_delta(seed, scale=5.0) for seed in range(3)]
    originals = [{k: t.clone() for k, t in d.items()} for d in deltas]
    aggregator = RoundAggregator(
        AggregationConfig(rule="fedavg"), TEMPLATE, max_buffered=0,
        transform=clip_to_unit_norm, uniform_weights=True,
    )
    for index, (delta, samples) in enumerate(zip(deltas, (1, 1000, 0), strict=True)):
        aggregator.add(f"node-{index}", delta, samples)
    outcome = aggregator.finish()
    expected = weighted_mean([(clip_to_unit_norm(d), 1.0) for d in deltas])
    torch.testing.assert_close(outcome.mean_delta["layer.weight"], expected["layer.weight"])
    for delta, original in zip(deltas, originals, strict=True):
        for name, tensor in delta.items():
            assert torch.equal(tensor, original[name])


def test_krum_round_sets_attackers_aside_by_node_id() -> None:
    config = AggregationConfig(rule="krum", byzantine=2)
    aggregator = RoundAggregator(config, TEMPLATE, max_buffered=10)
    for index in range(5):
        aggregator.add(f"honest-{index}", _delta(index), 10)
    aggregator.add("evil-a", _far(1.0), 10_000)
    aggregator.add("evil-b", _far(-1.0), 10_000)
    assert aggregator.buffered == 7
    outcome = aggregator.finish()
    assert len(outcome.used) == 1
    assert outcome.used[0].startswith("honest-")
    assert {"evil-a", "evil-b"} <= set(outcome.set_aside)
    assert aggregator.buffered == 0  # finish frees the buffer


def test_multikrum_round_averages_n_minus_f() -> None:
    aggregator = RoundAggregator(AggregationConfig(rule="multikrum", byzantine=1), TEMPLATE, max_buffered=8)
    for index in range(4):
        aggregator.add(f"honest-{index}", _delta(index), 10)
    aggregator.add("evil", _far(1.0), 10)
    outcome = aggregator.finish()
    assert outcome.used == ("honest-0", "honest-1", "honest-2", "honest-3")
    assert outcome.set_aside == ("evil",)


@pytest.mark.parametrize("name", ["median", "trimmedmean", "bulyan"])
def test_coordinatewise_rounds_ignore_one_attacker(name: str) -> None:
    aggregator = RoundAggregator(
        AggregationConfig(rule=name, byzantine=1, trim_beta=0.2), TEMPLATE, max_buffered=10
    )
    for index in range(6):
        aggregator.add(f"honest-{index}", _delta(index), 10)
    aggregator.add("evil", _far(1.0), 10)
    outcome = aggregator.finish()
    assert float(outcome.mean_delta["layer.weight"].abs().max()) < 0.1
    assert outcome.mean_delta["bn.num_batches_tracked"].item() == 3


def test_robust_buffer_is_bounded() -> None:
    aggregator = RoundAggregator(AggregationConfig(rule="median"), TEMPLATE, max_buffered=2)
    aggregator.add("a", _delta(1), 1)
    aggregator.add("b", _delta(2), 1)
    with pytest.raises(BufferFullError, match=r"'c' refused.*max_buffered=2"):
        aggregator.add("c", _delta(3), 1)
    assert aggregator.count == 2
    assert aggregator.finish().used == ("a", "b")


def test_too_few_for_robust_rule_can_be_topped_up() -> None:
    aggregator = RoundAggregator(AggregationConfig(rule="krum", byzantine=1), TEMPLATE, max_buffered=8)
    for index in range(4):
        aggregator.add(f"n{index}", _delta(index), 1)
    with pytest.raises(TooFewUpdatesError, match="needs at least 5"):
        aggregator.finish()
    aggregator.add("n4", _delta(4), 1)
    assert len(aggregator.finish().used) == 1


@pytest.mark.parametrize("name", ["fedavg", "krum"])
def test_wrong_shape_or_name_names_node_and_tensor(name: str) -> None:
    aggregator = RoundAggregator(AggregationConfig(rule=name), TEMPLATE, max_buffered=4)
    bad_shape = _delta(1) | {"layer.bias": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"update from 'x' tensor 'layer.bias' has shape \(4,\)"):
        aggregator.add("x", bad_shape, 1)
    renamed = {("fc.weight" if k == "layer.weight" else k): v for k, v in _delta(1).items()}
    with pytest.raises(ValueError, match=r"update from 'y' lacks tensor 'layer.weight'"):
        aggregator.add("y", renamed, 1)
    poisoned = _delta(1) | {"layer.weight": torch.full((4, 3), float("nan"))}
    with pytest.raises(ValueError, match="'layer.weight' contains NaN"):
        aggregator.add("z", poisoned, 1)
    assert aggregator.count == 0
    assert aggregator.buffered == 0
    aggregator.add("x", _delta(1), 1)  # a node whose update was refused may retry
    assert aggregator.node_ids == ("x",)


def test_transform_output_is_checked() -> None:
    aggregator = RoundAggregator(
        AggregationConfig(), TEMPLATE, max_buffered=0,
        transform=lambda delta: {k: v for k, v in delta.items() if k != "layer.bias"},
    )
    with pytest.raises(ValueError, match="transformed update from 'a' lacks tensor 'layer.bias'"):
        aggregator.add("a", _delta(1), 1)


def test_protocol_misuse_is_refused() -> None:
    aggregator = RoundAggregator(AggregationConfig(), TEMPLATE, max_buffered=0)
    with pytest.raises(EmptyAggregationError, match="no client updates"):
        aggregator.finish()
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        aggregator.add("a", _delta(1), 0)
    aggregator.add("a", _delta(1), 3)
    with pytest.raises(ValueError, match="'a' already submitted"):
        aggregator.add("a", _delta(2), 3)
    aggregator.finish()
    with pytest.raises(RuntimeError, match="already aggregated"):
        aggregator.add("b", _delta(2), 3)
    with pytest.raises(RuntimeError, match="already called"):
        aggregator.finish()
    with pytest.raises(ValueError, match="max_buffered must be an integer >= 1"):
        RoundAggregator(AggregationConfig(rule="median"), TEMPLATE, max_buffered=0)


def test_minimum_updates() -> None:
    assert minimum_updates(AggregationConfig(rule="fedavg")) == 1
    assert minimum_updates(AggregationConfig(rule="median")) == 1
    assert minimum_updates(AggregationConfig(rule="krum", byzantine=2)) == 7
    assert minimum_updates(AggregationConfig(rule="multikrum", byzantine=0)) == 3
    assert minimum_updates(AggregationConfig(rule="bulyan", byzantine=2)) == 11


@pytest.mark.parametrize("name", rule_names())
def test_server_optimizer_for_each_rule(name: str) -> None:
    config = AggregationConfig(rule=name, server_learning_rate=0.3, beta1=0.8, beta2=0.95, tau=0.01)
    optimizer = server_optimizer_for(config)
    expected = name if name in ("fedadam", "fedyogi") else "fedavg"
    assert optimizer.config.name == expected == rule_for(name).server_step
    assert optimizer.config.learning_rate == 0.3
    assert (optimizer.config.beta1, optimizer.config.beta2, optimizer.config.tau) == (0.8, 0.95, 0.01)
    if expected == "fedavg":
        step = optimizer.step({"w": torch.zeros(2)}, {"w": torch.tensor([1.0, -2.0])})
        torch.testing.assert_close(step["w"], torch.tensor([0.3, -0.6]))


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "median", "krum"])
def test_server_momentum_turns_the_fedavg_step_into_fedavgm(name: str) -> None:
    optimizer = server_optimizer_for(AggregationConfig(rule=name, server_momentum=0.5))
    assert optimizer.config.name == "fedavgm"
    assert optimizer.config.momentum == 0.5


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_momentum_refused_with_adaptive_steps(name: str) -> None:
    with pytest.raises(ValueError, match=f"server momentum applies to the fedavg server step; '{name}'"):
        AggregationConfig(rule=name, server_momentum=0.5)
