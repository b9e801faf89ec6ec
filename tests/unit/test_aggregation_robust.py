"""Byzantine-robust rules against hand-worked examples, numpy/scipy and attack scenarios."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedkube.runtime.aggregation import (
    TooFewUpdatesError,
    bulyan,
    coordinate_median,
    krum,
    trimmed_mean,
)
from fedkube.runtime.aggregation.robust import _pairwise_squared_distances
from scipy import stats

Weights = dict[str, torch.Tensor]


def _points(values: list[float]) -> list[Weights]:
    return [{"w": torch.tensor([value])} for value in values]


def _cluster(honest: int, outliers: int, *, seed: int = 0) -> list[Weights]:
    """`honest` small updates around 0.01, then `outliers` far away (two different
    attacks, so they are not mutually close to the honest ones either)."""
    generator = torch.Generator().manual_seed(seed)
    updates = [
        {
            "conv": 0.01 + 0.01 * torch.randn(4, 3, generator=generator),
            "bias": 0.01 * torch.randn(3, generator=generator),
            "seen": torch.tensor(7),
        }
        for _ in range(honest)
    ]
    for index in range(outliers):
        sign = 1.0 if index % 2 == 0 else -1.0
        updates.append(
            {"conv": torch.full((4, 3), 50.0 * sign), "bias": torch.full((3,), -30.0 * sign),
             "seen": torch.tensor(10_000)}
        )
    return updates


def _snapshot(updates: list[Weights]) -> list[Weights]:
    return [{name: tensor.clone() for name, tensor in update.items()} for update in updates]


def _assert_unchanged(updates: list[Weights], snapshot: list[Weights]) -> None:
    assert len(updates) == len(snapshot)
    for update, original in zip(updates, snapshot, strict=True):
        assert list(update) == list(original)
        for name, tensor in update.items():
            assert torch.equal(tensor, original[name])


def test_krum_hand_worked() -> None:
    # n = 5, f = 1: each score sums the n - f - 2 = 2 smallest squared distances.
    # 0: 1 + 4 = 5; 1: 1 + 1 = 2; 2: 1 + 4 = 5; 10: 1 + 64 = 65; 11: 1 + 81 = 82.
    updates = _points([0.0, 1.0, 2.0, 10.0, 11.0])
    single = krum(updates, byzantine=1)
    assert single.selected == (1,)
    assert single.set_aside == (0, 2, 3, 4)
    assert single.aggregate["w"].item() == 1.0
    multi = krum(updates, byzantine=1, select=3)
    assert multi.selected == (0, 1, 2)
    assert multi.set_aside == (3, 4)
    assert multi.aggregate["w"].item() == pytest.approx(1.0)


def test_krum_picks_an_honest_update_when_f_outliers_are_far() -> None:
    updates = _cluster(honest=7, outliers=2)
    snapshot = _snapshot(updates)
    result = krum(updates, byzantine=2)
    assert len(result.selected) == 1
    chosen = result.selected[0]
    assert chosen < 7
    assert set(result.set_aside) == set(range(9)) - {chosen}
    # Krum returns the chosen update itself, bit for bit, in its own dtypes.
    for name, tensor in updates[chosen].items():
        assert result.aggregate[name].dtype == tensor.dtype
        assert torch.equal(result.aggregate[name], tensor)
    _assert_unchanged(updates, snapshot)


def test_multikrum_averages_exactly_the_honest_cluster() -> None:
    updates = _cluster(honest=7, outliers=2, seed=3)
    result = krum(updates, byzantine=2, select=7)
    assert result.selected == tuple(range(7))
    assert result.set_aside == (7, 8)
    honest_mean = torch.stack([u["conv"] for u in updates[:7]]).double().mean(0).float()
    torch.testing.assert_close(result.aggregate["conv"], honest_mean)
    assert result.aggregate["seen"].item() == 7


def test_krum_refuses_too_few_updates_and_bad_select() -> None:
    with pytest.raises(TooFewUpdatesError, match=r"byzantine=2 needs at least 7 updates.*got 6"):
        krum(_points([0.0] * 6), byzantine=2)
    with pytest.raises(ValueError, match=r"select must be .* \[1, 5\]"):
        krum(_points([0.0] * 7), byzantine=2, select=6)
    with pytest.raises(ValueError, match="select"):
        krum(_points([0.0] * 7), byzantine=2, select=0)
    with pytest.raises(ValueError, match="byzantine must be"):
        krum(_points([0.0] * 7), byzantine=-1)
    with pytest.raises(ValueError, match="no updates"):
        krum([], byzantine=0)


def test_mismatched_updates_name_the_update_and_tensor() -> None:
    updates = _points([0.0, 1.0, 2.0])
    updates[2] = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"update 2 tensor 'w' has shape \(2,\)"):
        coordinate_median(updates)


def test_distances_match_brute_force_even_far_from_the_origin() -> None:
    generator = torch.Generator().manual_seed(1)
    # Large common offset, tiny differences: the uncentred Gram identity would cancel.
    rows = 1e6 + 1e-3 * torch.randn(6, 50, generator=generator, dtype=torch.float64)
    expected = torch.tensor(
        [[float(((a - b) ** 2).sum()) for b in rows] for a in rows], dtype=torch.float64
    )
    torch.testing.assert_close(_pairwise_squared_distances(rows), expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("count", [1, 4, 5, 8])
def test_median_matches_numpy(count: int) -> None:
    generator = torch.Generator().manual_seed(count)
    updates = [
        {"a": torch.randn(3, 4, generator=generator), "b": torch.randn(5, generator=generator)}
        for _ in range(count)
    ]
    snapshot = _snapshot(updates)
    result = coordinate_median(updates)
    for name in ("a", "b"):
        expected = np.median(np.stack([u[name].numpy() for u in updates]), axis=0)
        np.testing.assert_allclose(result.aggregate[name].numpy(), expected, rtol=1e-6)
    assert result.selected == tuple(range(count))
    assert result.set_aside == ()
    _assert_unchanged(updates, snapshot)


def test_median_ignores_a_minority_of_huge_values() -> None:
    result = coordinate_median(_points([1.0, 2.0, 3.0, 1e9, -1e9]))
    assert result.aggregate["w"].item() == 2.0


def test_median_of_integer_buffers_rounds() -> None:
    updates = [{"n": torch.tensor([1, 5])}, {"n": torch.tensor([2, 8])}]
    result = coordinate_median(updates)
    assert result.aggregate["n"].dtype == torch.int64
    assert result.aggregate["n"].tolist() == [2, 6]  # 1.5 -> 2 (half to even), 6.5 -> 6


@pytest.mark.parametrize(("count", "beta"), [(10, 0.1), (10, 0.25), (7, 0.3), (5, 0.0), (9, 0.49)])
def test_trimmed_mean_matches_scipy(count: int, beta: float) -> None:
    generator = torch.Generator().manual_seed(count)
    updates = [{"w": torch.randn(6, 2, generator=generator, dtype=torch.float64)} for _ in range(count)]
    snapshot = _snapshot(updates)
    result = trimmed_mean(updates, beta=beta)
    expected = stats.trim_mean(np.stack([u["w"].numpy() for u in updates]), beta, axis=0)
    np.testing.assert_allclose(result.aggregate["w"].numpy(), expected, rtol=1e-12)
    _assert_unchanged(updates, snapshot)


def test_trimmed_mean_drops_outliers_and_validates_beta() -> None:
    result = trimmed_mean(_points([1.0, 2.0, 3.0, 4.0, 1e9]), beta=0.2)
    assert result.aggregate["w"].item() == pytest.approx(3.0)  # mean of 2, 3, 4
    for beta in (-0.1, 0.5):
        with pytest.raises(ValueError, match="beta must be in"):
            trimmed_mean(_points([1.0, 2.0]), beta=beta)


def test_bulyan_sets_aside_outliers_and_stays_in_the_honest_range() -> None:
    updates = _cluster(honest=9, outliers=2, seed=5)
    snapshot = _snapshot(updates)
    result = bulyan(updates, byzantine=2)
    # theta = n - 2f = 7 picked, the two attackers among the four left out.
    assert len(result.selected) == 7
    assert {9, 10} <= set(result.set_aside)
    for name in ("conv", "bias"):
        honest = torch.stack([u[name] for u in updates[:9]])
        assert bool((result.aggregate[name] >= honest.min(0).values).all())
        assert bool((result.aggregate[name] <= honest.max(0).values).all())
    assert result.aggregate["seen"].item() == 7
    _assert_unchanged(updates, snapshot)


def test_bulyan_hand_worked() -> None:
    # n = 7, f = 1: theta = 5 picks by Krum, then per coordinate the beta = 3 picked
    # values closest to the median are averaged.
    # Krum picks 2, then 1 (tied with 3: ties go to the lower index), 3, 0, and last 4,
    # scored on its single nearest neighbour and tied with 40, its mutual nearest.
    # Median of {0, 1, 2, 3, 4} = 2, the three closest {1, 2, 3} average to 2.
    result = bulyan(_points([0.0, 1.0, 2.0, 3.0, 4.0, 40.0, -60.0]), byzantine=1)
    assert result.selected == (0, 1, 2, 3, 4)
    assert result.set_aside == (5, 6)
    assert result.aggregate["w"].item() == pytest.approx(2.0)


def test_bulyan_without_attackers_is_the_plain_mean() -> None:
    updates = _cluster(honest=4, outliers=0, seed=2)
    result = bulyan(updates, byzantine=0)
    expected = torch.stack([u["conv"] for u in updates]).double().mean(0).float()
    torch.testing.assert_close(result.aggregate["conv"], expected)
    assert result.set_aside == ()


def test_bulyan_refuses_too_few_updates() -> None:
    with pytest.raises(TooFewUpdatesError, match=r"byzantine=2 needs at least 11 updates.*got 10"):
        bulyan(_cluster(honest=10, outliers=0), byzantine=2)
