"""FedAvg's weighted mean: the streaming WeightedSum against hand-computed numbers and
against the reference weighted_mean."""

from __future__ import annotations

import pytest
import torch
from fedkube.runtime.aggregation import EmptyAggregationError, WeightedSum, weighted_mean
from hypothesis import given, settings
from hypothesis import strategies as st


def _clone(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in weights.items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name, tensor in a.items():
        assert tensor.dtype == b[name].dtype, name
        assert torch.equal(tensor, b[name]), name


def test_hand_computed_weighted_mean() -> None:
    first = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    second = {"w": torch.tensor([4.0, 8.0]), "b": torch.tensor([[-4.0]])}
    total = WeightedSum(first)
    total.add(first, 1)
    total.add(second, 3)
    mean = total.mean()
    # (1*1 + 3*4) / 4 = 3.25, (1*2 + 3*8) / 4 = 6.5, (0 + 3*-4) / 4 = -3
    torch.testing.assert_close(mean["w"], torch.tensor([3.25, 6.5]))
    torch.testing.assert_close(mean["b"], torch.tensor([[-3.0]]))
    assert total.count == 2
    assert total.total_weight == 4.0
    _assert_same(mean, weighted_mean([(first, 1), (second, 3)]))


def test_dtypes_kept_and_integer_buffers_rounded_half_to_even() -> None:
    template = {
        "half": torch.zeros(2, dtype=torch.float16),
        "count": torch.zeros(3, dtype=torch.int64),
    }
    total = WeightedSum(template)
    total.add({"half": torch.tensor([1.0, 2.0], dtype=torch.float16),
               "count": torch.tensor([1, 2, -1])}, 1.0)
    total.add({"half": torch.tensor([2.0, 4.0], dtype=torch.float16),
               "count": torch.tensor([2, 3, -2])}, 1.0)
    mean = total.mean()
    assert mean["half"].dtype == torch.float16
    assert mean["count"].dtype == torch.int64
    torch.testing.assert_close(mean["half"], torch.tensor([1.5, 3.0], dtype=torch.float16))
    # 1.5 -> 2, 2.5 -> 2, -1.5 -> -2: a truncating cast would give 1, 2, -1.
    assert mean["count"].tolist() == [2, 2, -2]


def test_accumulates_in_float64() -> None:
    template = {"w": torch.zeros(1)}
    total = WeightedSum(template)
    for value in (1e8, 1.0, -1e8):
        total.add({"w": torch.tensor([value])}, 1.0)
    # In float32, 1e8 + 1 == 1e8 and the 1 would be lost.
    torch.testing.assert_close(total.mean()["w"], torch.tensor([1.0 / 3.0]))


def test_inputs_not_mutated_and_mean_is_a_copy() -> None:
    updates = [{"w": torch.randn(4, 3), "n": torch.tensor(5)} for _ in range(3)]
    before = [_clone(u) for u in updates]
    total = WeightedSum(updates[0])
    for update, weight in zip(updates, (1.0, 2.0, 3.0), strict=True):
        total.add(update, weight)
    first = total.mean()
    first["w"].add_(100.0)
    reference = weighted_mean([(u, w) for u, w in zip(updates, (1.0, 2.0, 3.0), strict=True)])
    for update, original in zip(updates, before, strict=True):
        _assert_same(update, original)
    _assert_same(total.mean(), reference)


def test_empty_mean_raises() -> None:
    total = WeightedSum({"w": torch.zeros(2)})
    with pytest.raises(EmptyAggregationError, match="no updates"):
        total.mean()
    with pytest.raises(EmptyAggregationError):
        weighted_mean([])


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"w": torch.zeros(2, 3), "b": torch.zeros(2)}, "tensor 'w' has shape \\(2, 3\\)"),
        ({"w": torch.zeros(3, 2)}, "lacks tensor 'b'"),
        ({"w": torch.zeros(3, 2), "b": torch.zeros(2), "x": torch.zeros(1)}, "unexpected tensor 'x'"),
        ({"w": torch.zeros(3, 2), "b": torch.tensor([0.0, float("nan")])}, "'b' contains NaN"),
        ({"w": torch.zeros(3, 2), "b": torch.tensor([float("inf"), 0.0])}, "'b' contains NaN or Inf"),
    ],
)
def test_bad_update_rejected_naming_the_tensor_and_sum_untouched(
    update: dict[str, torch.Tensor], message: str
) -> None:
    template = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    good = {"w": torch.ones(3, 2), "b": torch.full((2,), 2.0)}
    total = WeightedSum(template)
    total.add(good, 2.0)
    with pytest.raises(ValueError, match=message):
        total.add(update, 1.0)
    assert total.count == 1
    assert total.total_weight == 2.0
    _assert_same(total.mean(), good)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_weight_must_be_positive_and_finite(weight: float) -> None:
    total = WeightedSum({"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="weight must be"):
        total.add({"w": torch.ones(1)}, weight)
    with pytest.raises(ValueError, match="weight must be"):
        weighted_mean([({"w": torch.ones(1)}, weight)])


def test_complex_template_refused() -> None:
    with pytest.raises(TypeError, match="complex"):
        WeightedSum({"z": torch.zeros(2, dtype=torch.complex64)})


_shapes = st.lists(
    st.lists(st.integers(min_value=1, max_value=4), min_size=0, max_size=3).map(tuple),
    min_size=1,
    max_size=4,
)


@settings(max_examples=40, deadline=None)
@given(
    shapes=_shapes,
    weights=st.lists(st.floats(min_value=1e-3, max_value=1e4), min_size=1, max_size=6),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_streaming_sum_equals_reference(
    shapes: list[tuple[int, ...]], weights: list[float], seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    updates = [
        {f"t{i}": torch.randn(shape, generator=generator) * 10 for i, shape in enumerate(shapes)}
        for _ in weights
    ]
    total = WeightedSum(updates[0])
    # Folding in reverse arrival order must not matter either.
    for update, weight in reversed(list(zip(updates, weights, strict=True))):
        total.add(update, weight)
    streamed = total.mean()
    reference = weighted_mean(list(zip(updates, weights, strict=True)))
    assert total.count == len(weights)
    assert total.total_weight == pytest.approx(sum(weights))
    for name in reference:
        torch.testing.assert_close(streamed[name], reference[name], rtol=1e-6, atol=1e-6)
