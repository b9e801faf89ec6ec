"""The neighbour graph of SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS): each client masks with, and shares its secrets among, k
neighbours instead of all n - 1 others, so its cost grows with log n.

The graph is a Harary graph H(k, n) over a random permutation of the round's clients
drawn from the round seed: client at position i is joined to positions i ± 1 .. i ± k/2
(mod n). It is k-regular, connected and symmetric, and nobody can place itself next to
a chosen victim before the seed is drawn. The coordinator computes it; clients never
claim neighbours (what a client says about its neighbours is never read).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping


def neighbour_count(clients: int, wanted: int | None) -> int:
    """The degree k for `clients` clients: `wanted` (rounded up to even), or the SecAgg+
    default 2 * ceil(log2 n) + 2 rounded to even; at most n - 1 (then the graph is
    complete: plain SecAgg of Bonawitz et al. 2017)."""
    if clients < 2:
        return 0
    if wanted is None:
        wanted = 2 * math.ceil(math.log2(clients)) + 2
    if wanted < 1:
        raise ValueError(f"neighbours must be >= 1, got {wanted}")
    k = wanted + (wanted % 2)
    return min(clients - 1, k)


def share_threshold(neighbours: int, fraction: float) -> int:
    """t of t-of-k: the fewest of a client's k neighbours whose shares recover its
    secrets. More than half, so two disjoint groups can never both recover."""
    if not 0.5 < fraction <= 1.0:
        raise ValueError(f"threshold must be in (0.5, 1], got {fraction}")
    return max(1, min(neighbours, math.ceil(fraction * neighbours)))


def build_graph(clients: Iterable[str], *, neighbours: int | None,
                seed: int) -> dict[str, tuple[str, ...]]:
    """Each client's neighbours (sorted), for the round whose seed is `seed`."""
    ordered = sorted(set(clients))
    n = len(ordered)
    k = neighbour_count(n, neighbours)
    random.Random(seed).shuffle(ordered)
    graph: dict[str, set[str]] = {node: set() for node in ordered}
    if k == n - 1:
        return {node: tuple(sorted(set(ordered) - {node})) for node in ordered}
    for i, node in enumerate(ordered):
        for step in range(1, k // 2 + 1):
            for j in ((i + step) % n, (i - step) % n):
                graph[node].add(ordered[j])
                graph[ordered[j]].add(node)
    return {node: tuple(sorted(peers)) for node, peers in graph.items()}


def is_symmetric(graph: Mapping[str, tuple[str, ...]]) -> bool:
    return all(node in graph.get(peer, ()) for node, peers in graph.items() for peer in peers)
