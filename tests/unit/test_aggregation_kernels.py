"""The compiled fold: held updates folded together give bit for bit the sequential float64
sum, a refused update leaves held ones and the sum alone, and dtypes other than float32
still take the torch path beside it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedkube.runtime.aggregation import RoundAggregator, WeightedSum
from fedkube.runtime.aggregation._kernels import (
    dot,
    fold_group,
    squares_and_dot,
    sum_of_squares,
)
from fedkube.runtime.aggregation.catalog import AggregationConfig

SIZE = 5_003  # not a multiple of anything the loops unroll by


def _updates(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{
        "w": torch.randn(SIZE, generator=generator) * (1e6 if i % 3 == 1 else 1.0),
        "h": torch.randn(7, generator=generator).to(torch.float16),
        "n": torch.tensor(i + 1),
    } for i in range(count)]


def _reference(updates: list[dict[str, torch.Tensor]], weights: list[float], name: str) -> torch.Tensor:
    total = sum(w * u[name].double() for w, u in zip(weights, updates, strict=True))
    return total / sum(weights)


@pytest.mark.parametrize("count", [1, 3, 9, 15])
@pytest.mark.parametrize("hold", [0, 3, 14])
def test_held_fold_is_bit_identical_to_the_sequential_float64_sum(count: int, hold: int) -> None:
    updates = _updates(count)
    weights = [float(3 + 2 * i) for i in range(count)]
    total = WeightedSum(updates[0], hold=hold)
    for update, weight in zip(updates, weights, strict=True):
        total.add(update, weight)
    mean = total.mean()
    assert torch.equal(mean["w"], _reference(updates, weights, "w").to(torch.float32))
    assert torch.equal(mean["h"], _reference(updates, weights, "h").to(torch.float16))
    assert mean["n"].dtype == torch.int64
    assert int(mean["n"]) == round(float(_reference(updates, weights, "n")))


def test_refused_update_leaves_held_updates_and_sum_alone() -> None:
    updates = _updates(3)
    clean = WeightedSum(updates[0])
    held = WeightedSum(updates[0], hold=4)
    for update in updates[:2]:
        clean.add(update, 2.0)
        held.add(update, 2.0)
    bad = {name: tensor.clone() for name, tensor in updates[2].items()}
    bad["w"][SIZE - 1] = float("nan")
    with pytest.raises(ValueError, match="tensor 'w' contains NaN or Inf"):
        held.add(bad, 1.0)

    def refuse(_stats: object) -> float:
        raise ValueError("over the norm bound")

    with pytest.raises(ValueError, match="over the norm bound"):
        held.add(updates[2], 1.0, bound=refuse)
    assert held.count == 2 and held.total_weight == 4.0
    assert all(torch.equal(held.mean()[k], clean.mean()[k]) for k in ("w", "h", "n"))


def test_clipped_factor_applies_to_floating_tensors_only_when_held() -> None:
    updates = _updates(2)
    total = WeightedSum(updates[0], hold=2)
    total.add(updates[0], 1.0, bound=lambda _stats: 0.5)
    total.add(updates[1], 1.0)
    mean = total.mean()
    expected = (0.5 * updates[0]["w"].double() + updates[1]["w"].double()) / 2
    assert torch.equal(mean["w"], expected.to(torch.float32))
    assert int(mean["n"]) == 2  # (1 + 2) / 2 = 1.5, rounded half to even; counters not clipped


def test_held_updates_are_not_modified() -> None:
    updates = _updates(4)
    before = [{k: v.clone() for k, v in u.items()} for u in updates]
    aggregator = RoundAggregator(AggregationConfig(rule="fedavg"), updates[0], max_buffered=0, hold=3)
    for index, update in enumerate(updates):
        aggregator.add(f"node-{index}", update, 10 + index)
    aggregator.finish()
    for update, original in zip(updates, before, strict=True):
        assert all(torch.equal(update[k], original[k]) for k in update)


@pytest.mark.parametrize("hold", [-1, 1.5, True])
def test_hold_must_be_a_non_negative_integer(hold: object) -> None:
    with pytest.raises(ValueError, match="hold must be an integer >= 0"):
        WeightedSum({"w": torch.zeros(2)}, hold=hold)  # type: ignore[arg-type]


def test_kernels_against_numpy() -> None:
    generator = np.random.default_rng(3)
    xs = [generator.standard_normal(SIZE).astype(np.float32) for _ in range(7)]
    weights = [1.5, 2.0, 3.25, 0.5, 7.0, 1.0, 4.0]
    acc = np.zeros(SIZE)
    fold_group(acc, xs, weights)
    expected = np.zeros(SIZE)
    for x, w in zip(xs, weights, strict=True):
        expected = expected + w * x.astype(np.float64)
    assert np.array_equal(acc, expected)
    squares = float(np.sum(xs[0].astype(np.float64) ** 2))
    assert sum_of_squares(xs[0]) == pytest.approx(squares, rel=1e-12)
    inner = float(np.dot(xs[0].astype(np.float64), xs[1].astype(np.float64)))
    assert dot(xs[0], xs[1]) == pytest.approx(inner, rel=1e-12)
    assert squares_and_dot(xs[0], xs[1]) == pytest.approx((squares, inner), rel=1e-12)
    with pytest.raises(ValueError, match="arrays of 5003 and 5002 values"):
        dot(xs[0], xs[1][1:])
    xs[0][17] = np.inf
    assert not np.isfinite(sum_of_squares(xs[0]))
    with pytest.raises(ValueError, match="7 arrays but 6 weights"):
        fold_group(acc, xs, weights[:6])


def test_fednova_holds_like_fedavg_and_a_transform_holds_nothing() -> None:
    updates = _updates(3)
    fednova = RoundAggregator(AggregationConfig(rule="fednova"), updates[0], max_buffered=0,
                              hold=3)
    one_at_a_time = RoundAggregator(AggregationConfig(rule="fednova"), updates[0],
                                    max_buffered=0)
    for index, update in enumerate(updates):
        fednova.add(f"node-{index}", update, 10 + index, local_steps=index + 1)
        one_at_a_time.add(f"node-{index}", update, 10 + index, local_steps=index + 1)
    assert fednova.held == 3
    fednova.flush()
    assert fednova.held == 0
    held, plain = fednova.finish().mean_delta, one_at_a_time.finish().mean_delta
    assert all(torch.equal(held[k], plain[k]) for k in plain)
    # A transform's output is a fresh copy: holding it would cost memory.
    transformed = RoundAggregator(AggregationConfig(rule="fedavg"), updates[0], max_buffered=0,
                                  hold=3, transform=lambda delta: {k: v.clone() for k, v in delta.items()})
    transformed.add("node-0", updates[0], 10)
    assert transformed.held == 0


def test_the_check_read_also_gives_the_inner_product_with_a_reference() -> None:
    updates = _updates(2, seed=5)
    reference = {k: v for k, v in updates[1].items() if k != "n"}  # floating tensors only
    stats = WeightedSum(updates[0]).add(updates[0], 1.0, reference=reference)
    expected = sum(float(updates[0][k].double().dot(reference[k].double())) for k in ("w", "h"))
    assert stats.dot == pytest.approx(expected, rel=1e-12)
    norm = float(torch.cat([updates[0][k].double() for k in ("w", "h")]).norm())
    assert stats.norm == pytest.approx(norm, rel=1e-5)  # float16's norm is taken in float16
    assert WeightedSum(updates[0]).add(updates[0], 1.0).dot is None
