"""Split a training set between federated clients: IID, Dirichlet by label, or shards.

Pure functions over numpy arrays (no torch, no I/O), deterministic by seed. Every
training index goes to exactly one client and no client is left empty, so the same
(labels, num_clients, kind, seed) gives the coordinator and every simulated agent the
same split without talking to each other.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

PartitionKind = Literal["iid", "dirichlet", "shards"]

# Dirichlet draws with small alpha often leave a client with nothing; draw again this
# many times before falling back to moving examples (see _dirichlet).
DIRICHLET_REDRAWS = 100


def partition_indices(
    labels: np.ndarray,
    num_clients: int,
    *,
    kind: PartitionKind,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Indices into `labels` for each of `num_clients` clients, each sorted ascending.

    - ``iid``: a seeded permutation cut into near-equal parts.
    - ``dirichlet``: per class, client shares drawn from Dir(alpha); small alpha gives
      each client few labels (Hsu, Qi and Brown 2019, "Measuring the Effects of
      Non-Identical Data Distribution for Federated Visual Classification").
    - ``shards``: sort by label, cut into ``num_clients * shards_per_client`` shards and
      deal ``shards_per_client`` to each client (McMahan et al. 2017,
      "Communication-Efficient Learning of Deep Networks from Decentralized Data").

    Raises ValueError when the split is impossible (more clients, or shards, than
    examples) or an argument is out of range.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    n = len(labels)
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if num_clients > n:
        raise ValueError(
            f"cannot split {n} examples between {num_clients} clients without leaving one empty"
        )
    rng = np.random.default_rng(seed)
    if kind == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif kind == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"dirichlet alpha must be positive, got {alpha}")
        parts = _dirichlet(labels, num_clients, alpha, rng)
    elif kind == "shards":
        if shards_per_client < 1:
            raise ValueError(f"shards_per_client must be at least 1, got {shards_per_client}")
        parts = _shards(labels, num_clients, shards_per_client, rng)
    else:
        raise ValueError(f"unknown partition kind {kind!r}: expected iid, dirichlet or shards")
    return [np.sort(part).astype(np.int64) for part in parts]


def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label-skewed split. Draws again (up to DIRICHLET_REDRAWS times) while a client is
    empty, as NIID-Bench does (Li et al. 2022, "Federated Learning on Non-IID Data Silos:
    An Experimental Study"); if every draw leaves one empty (tiny alpha, many clients),
    each empty client takes one example from whichever client holds the most, which
    changes the drawn proportions as little as possible."""
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    parts: list[list[np.ndarray]] = []
    for _ in range(DIRICHLET_REDRAWS):
        parts = [[] for _ in range(num_clients)]
        for members in by_class:
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for client, piece in enumerate(np.split(members, cuts)):
                parts[client].append(piece)
        if all(sum(len(p) for p in pieces) for pieces in parts):
            break
    merged = [np.concatenate(pieces) for pieces in parts]
    for client in range(num_clients):
        if len(merged[client]) == 0:
            donor = max(range(num_clients), key=lambda c: len(merged[c]))
            merged[client] = merged[donor][-1:]
            merged[donor] = merged[donor][:-1]
    return merged


def _shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-IID split: each client holds a few label-sorted runs."""
    total = num_clients * shards_per_client
    if total > len(labels):
        raise ValueError(
            f"{num_clients} clients x {shards_per_client} shards = {total} shards, "
            f"more than the {len(labels)} examples"
        )
    # Shuffle first so ties within a label are broken by the seed, not by file order.
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, total)
    dealt = rng.permutation(total).reshape(num_clients, shards_per_client)
    return [np.concatenate([shards[s] for s in row]) for row in dealt]
