"""Partitioners: every index used once, no client empty, deterministic, skewed as asked."""

from __future__ import annotations

import numpy as np
import pytest
from fedkube.runtime.data import Dataset, client_data, partition_indices
from fedkube.runtime.spec import DataSpec
from hypothesis import given, settings
from hypothesis import strategies as st

KINDS = ("iid", "dirichlet", "shards")


@st.composite
def labelled(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    num_classes = draw(st.integers(1, 10))
    n = draw(st.integers(1, 400))
    seed = draw(st.integers(0, 2**16))
    labels = np.random.default_rng(seed).integers(0, num_classes, n)
    clients = draw(st.integers(1, min(n, 30)))
    return labels, clients


def _check_complete_and_disjoint(parts: list[np.ndarray], n: int, clients: int) -> None:
    assert len(parts) == clients
    assert all(len(p) > 0 for p in parts), [len(p) for p in parts]
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats


@settings(max_examples=60, deadline=None)
@given(labelled(), st.sampled_from(KINDS), st.floats(0.01, 100), st.integers(0, 1000))
def test_every_index_exactly_once_and_no_client_empty(
    case: tuple[np.ndarray, int], kind: str, alpha: float, seed: int
) -> None:
    labels, clients = case
    shards = 2 if kind != "shards" or 2 * clients <= len(labels) else 1
    parts = partition_indices(
        labels, clients, kind=kind, alpha=alpha, shards_per_client=shards, seed=seed
    )
    _check_complete_and_disjoint(parts, len(labels), clients)


@settings(max_examples=25, deadline=None)
@given(labelled(), st.sampled_from(KINDS), st.integers(0, 1000))
def test_deterministic_by_seed(case: tuple[np.ndarray, int], kind: str, seed: int) -> None:
    labels, clients = case
    first = partition_indices(labels, clients, kind=kind, shards_per_client=1, seed=seed)
    again = partition_indices(labels.copy(), clients, kind=kind, shards_per_client=1, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_different_seeds_give_different_splits(kind: str) -> None:
    labels = np.repeat(np.arange(10), 50)
    a = partition_indices(labels, 10, kind=kind, seed=1)
    b = partition_indices(labels, 10, kind=kind, seed=2)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_labels_are_not_mutated() -> None:
    labels = np.random.default_rng(0).integers(0, 10, 300)
    before = labels.copy()
    for kind in KINDS:
        partition_indices(labels, 7, kind=kind, seed=3)
    assert np.array_equal(labels, before)


def test_iid_sizes_differ_by_at_most_one() -> None:
    parts = partition_indices(np.zeros(1003, dtype=np.int64), 10, kind="iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def _mean_labels_per_client(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([len(np.unique(labels[p])) for p in parts]))


def test_dirichlet_skews_labels_as_alpha_shrinks() -> None:
    labels = np.repeat(np.arange(10), 200)
    spread = {
        alpha: np.mean([
            _mean_labels_per_client(
                labels, partition_indices(labels, 20, kind="dirichlet", alpha=alpha, seed=s)
            )
            for s in range(3)
        ])
        for alpha in (100.0, 1.0, 0.05)
    }
    assert spread[100.0] > 9.5  # near-IID: almost every client sees every label
    assert spread[100.0] > spread[1.0] > spread[0.05]
    assert spread[0.05] < 3.5  # strongly skewed: a few labels per client


def test_dirichlet_tiny_alpha_many_clients_still_leaves_nobody_empty() -> None:
    labels = np.repeat(np.arange(2), 15)
    parts = partition_indices(labels, 30, kind="dirichlet", alpha=0.001, seed=0)
    _check_complete_and_disjoint(parts, 30, 30)
    assert all(len(p) == 1 for p in parts)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 10),  # classes
    st.integers(1, 6),  # shards per class
    st.integers(1, 4),  # shards per client
    st.integers(0, 1000),
)
def test_shards_give_each_client_at_most_shards_per_client_labels(
    num_classes: int, per_class: int, shards_per_client: int, seed: int
) -> None:
    # When a class is a whole number of shards, each shard holds a single label.
    total = num_classes * per_class
    if total % shards_per_client:
        return
    clients = total // shards_per_client
    shard_size = 7
    labels = np.random.default_rng(seed).permutation(
        np.repeat(np.arange(num_classes), per_class * shard_size)
    )
    parts = partition_indices(
        labels, clients, kind="shards", shards_per_client=shards_per_client, seed=seed
    )
    _check_complete_and_disjoint(parts, len(labels), clients)
    for part in parts:
        assert len(part) == shards_per_client * shard_size
        assert len(np.unique(labels[part])) <= shards_per_client


def test_shards_are_label_skewed_compared_with_iid() -> None:
    labels = np.repeat(np.arange(10), 100)
    shards = partition_indices(labels, 10, kind="shards", shards_per_client=2, seed=0)
    iid = partition_indices(labels, 10, kind="iid", seed=0)
    assert _mean_labels_per_client(labels, shards) <= 2
    assert _mean_labels_per_client(labels, iid) == 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 11}, "between 11 clients"),
        ({"num_clients": 0}, "at least 1"),
        ({"num_clients": 6, "kind": "shards", "shards_per_client": 2}, "12 shards"),
        ({"num_clients": 2, "kind": "dirichlet", "alpha": 0.0}, "alpha must be positive"),
        ({"num_clients": 2, "kind": "stripes"}, "unknown partition kind 'stripes'"),
    ],
)
def test_impossible_splits_say_why(kwargs: dict, message: str) -> None:
    arguments = {"kind": "iid", **kwargs}
    with pytest.raises(ValueError, match=message):
        partition_indices(np.arange(10) % 3, **arguments)


def _toy_dataset() -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 1, 2, 2)).astype(np.float32)
    y = np.repeat(np.arange(3), 20)
    return Dataset(x, y, x[:6], y[:6], num_classes=3, input_shape=(1, 2, 2))


def test_client_data_returns_that_clients_partition() -> None:
    dataset = _toy_dataset()
    spec = DataSpec(partition="shards", shards_per_client=1)
    seen = []
    for index in range(3):
        x, y = client_data(dataset, spec, index=index, num_clients=3, seed=5)
        assert len(np.unique(y)) == 1  # one shard of 20 = one whole class
        rows = [int(np.flatnonzero((dataset.x_train == row).all(axis=(1, 2, 3)))[0]) for row in x]
        assert np.array_equal(dataset.y_train[rows], y)
        seen.extend(rows)
    assert sorted(seen) == list(range(60))


def test_client_data_rejects_an_index_out_of_range() -> None:
    with pytest.raises(ValueError, match="client index 3 is outside 0..2"):
        client_data(_toy_dataset(), DataSpec(), index=3, num_clients=3, seed=0)
