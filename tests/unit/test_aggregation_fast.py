"""The fast paths against straightforward references: the sliced float64 fold of
WeightedSum, and the sorting-network order statistics behind median and trimmed mean."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from fedkube.runtime.aggregation import WeightedSum, coordinate_median, trimmed_mean
from fedkube.runtime.aggregation.order import SLICE, network_for_ranks, sorting_network
from fedkube.runtime.aggregation.weighted import FOLD_CHUNK
from hypothesis import given, settings
from hypothesis import strategies as st

# Long enough to cross slice boundaries of both fast paths, short enough to stay quick.
LONG = FOLD_CHUNK + SLICE + 17


def _exact_mean(values: list[list[float]], weights: list[float]) -> torch.Tensor:
    """Per coordinate, the exactly rounded weighted mean (math.fsum), then float32."""
    total = math.fsum(weights)
    columns = zip(*values, strict=True)
    return torch.tensor(
        [math.fsum(w * v for w, v in zip(weights, column, strict=True)) / total for column in columns],
        dtype=torch.float32,
    )


@settings(max_examples=25, deadline=None)
@given(
    weights=st.lists(st.floats(min_value=1e-3, max_value=1e4), min_size=1, max_size=8),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    spread=st.sampled_from([1.0, 1e4, 1e8]),
)
def test_fold_matches_the_exactly_rounded_mean(weights: list[float], seed: int, spread: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    # Magnitudes that differ by `spread` inside one column make float32 summation lose
    # the small terms; the float64 fold must not.
    updates = [torch.randn(64, generator=generator) * (spread if i % 2 else 1.0) for i in range(len(weights))]
    total = WeightedSum({"w": torch.zeros(64)})
    for update, weight in zip(updates, weights, strict=True):
        total.add({"w": update}, weight)
    expected = _exact_mean([u.double().tolist() for u in updates], weights)
    # float64 accumulation, then one rounding to float32: at most one float32 ulp away.
    torch.testing.assert_close(total.mean()["w"], expected, rtol=1.2e-7, atol=1e-30)


def test_fold_across_slices_equals_a_whole_tensor_float64_sum() -> None:
    generator = torch.Generator().manual_seed(7)
    updates = [torch.randn(LONG, generator=generator) for _ in range(5)]
    weights = [1.0, 3.0, 0.5, 7.0, 2.0]
    total = WeightedSum({"w": torch.zeros(LONG)})
    for update, weight in zip(updates, weights, strict=True):
        total.add({"w": update}, weight)
    reference = sum(w * u.double() for w, u in zip(weights, updates, strict=True)) / sum(weights)
    assert torch.equal(total.mean()["w"], reference.to(torch.float32))


@settings(max_examples=20, deadline=None)
@given(
    position=st.integers(min_value=0, max_value=LONG - 1),
    poison=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    in_second=st.booleans(),
)
def test_rejected_update_leaves_the_sum_bit_identical(position: int, poison: float, in_second: bool) -> None:
    generator = torch.Generator().manual_seed(position)
    template = {"a": torch.zeros(LONG), "b": torch.zeros(3, 5)}
    good = {"a": torch.randn(LONG, generator=generator), "b": torch.randn(3, 5, generator=generator)}
    total = WeightedSum(template)
    total.add(good, 2.0)
    before = total.mean()
    bad = {name: tensor.clone() + 1 for name, tensor in good.items()}
    name = "b" if in_second else "a"
    bad[name].view(-1)[position % bad[name].numel()] = poison
    with pytest.raises(ValueError, match=f"tensor '{name}' contains NaN or Inf"):
        total.add(bad, 1.0)
    after = total.mean()
    assert total.count == 1 and total.total_weight == 2.0
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_huge_finite_values_are_not_mistaken_for_inf() -> None:
    # Their float32 sum overflows; each value is finite, so the update is accepted.
    update = {"w": torch.full((4,), 3e38)}
    total = WeightedSum(update)
    total.add(update, 1.0)
    assert torch.equal(total.mean()["w"], update["w"])


@pytest.mark.parametrize("count", range(1, 12))
def test_sorting_network_sorts_every_zero_one_input(count: int) -> None:
    # Knuth's 0-1 principle: a comparator network that sorts every 0-1 input sorts all.
    network = sorting_network(count)
    for bits in itertools.product((0, 1), repeat=count):
        wires = list(bits)
        for low, high in network:
            if wires[low] > wires[high]:
                wires[low], wires[high] = wires[high], wires[low]
        assert wires == sorted(bits)


def test_pruned_network_keeps_only_what_the_ranks_need() -> None:
    full = sorting_network(50)
    median = network_for_ranks(50, (24, 25))
    assert set(median) <= set(full)
    assert len(median) < len(full)


def _reference(updates: list[torch.Tensor], keep: slice) -> torch.Tensor:
    """Sort in float64, keep ranks, mean: the plain definition."""
    ordered = torch.sort(torch.stack([u.double() for u in updates]), dim=0).values
    return ordered[keep].mean(dim=0).to(updates[0].dtype)


@settings(max_examples=30, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=40),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    ties=st.booleans(),
)
def test_median_equals_the_sorted_reference_exactly(count: int, seed: int, ties: bool) -> None:
    generator = torch.Generator().manual_seed(seed)
    size = 700
    updates = [torch.randn(size, generator=generator) for _ in range(count)]
    if ties:  # few distinct values: the network must move ties like a sort would
        updates = [torch.round(u) for u in updates]
    middle = count // 2
    keep = slice(middle, middle + 1) if count % 2 else slice(middle - 1, middle + 1)
    result = coordinate_median([{"w": u} for u in updates]).aggregate["w"]
    assert torch.equal(result, _reference(updates, keep))


@settings(max_examples=30, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=40),
    beta=st.floats(min_value=0.0, max_value=0.49),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_trimmed_mean_equals_the_sorted_reference_exactly(count: int, beta: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    updates = [torch.randn(700, generator=generator) for _ in range(count)]
    updates[0] = updates[0] * 1e6  # an attacker far out, trimmed away whenever trim >= 1
    trim = int(beta * count)
    result = trimmed_mean([{"w": u} for u in updates], beta=beta).aggregate["w"]
    assert torch.equal(result, _reference(updates, slice(trim, count - trim)))


def test_order_statistics_cross_slices_and_keep_shapes_and_dtypes() -> None:
    generator = torch.Generator().manual_seed(3)
    updates = [{"w": torch.randn(3, LONG // 3, generator=generator),
                "n": torch.randint(0, 9, (5,), generator=generator)} for _ in range(6)]
    median = coordinate_median(updates).aggregate
    assert median["w"].shape == (3, LONG // 3) and median["n"].dtype == torch.int64
    reference = _reference([u["w"] for u in updates], slice(2, 4))
    assert torch.equal(median["w"], reference)
    rows = torch.stack([u["n"].double() for u in updates]).sort(dim=0).values
    assert torch.equal(median["n"], torch.round(rows[2:4].mean(dim=0)).to(torch.int64))


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("rule", ["median", "trimmed"])
def test_order_statistics_refuse_a_non_finite_value_naming_update_and_tensor(
        poison: float, rule: str) -> None:
    # float32 tensors are proven finite inside the compiled order (no read of their own),
    # the float16 one by the plain check: both must name where the poison is.
    generator = torch.Generator().manual_seed(11)
    updates = [{"w": torch.randn(LONG, generator=generator),
                "h": torch.randn(5, generator=generator).to(torch.float16)} for _ in range(7)]
    aggregate = (coordinate_median if rule == "median"
                 else lambda u: trimmed_mean(u, beta=0.2))
    for name, position in (("w", LONG - 2), ("h", 1)):
        poisoned = [{k: v.clone() for k, v in u.items()} for u in updates]
        poisoned[4][name][position] = poison
        with pytest.raises(ValueError, match=f"update 4 tensor '{name}' contains NaN or Inf"):
            aggregate(poisoned)
