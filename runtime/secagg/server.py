"""The coordinator's side of a secure round: a state machine over the four phases with a
deadline each, holding per client only keys, a commitment and small shares, and for the
inputs one running sum in Z_2^32 (memory O(model), never one client's vector).

Dropouts are handled in every phase:
- before or during advertising: the client is simply not in the roster;
- after advertising, before its shares are in: left out of every delivery, so no one
  masks with it; clients left with fewer than t neighbours who shared are pruned too;
- after sharing, before its masked input: its neighbours' pairwise masks with it are in
  the sum, so its mask key is reconstructed from t neighbours' shares and they are removed;
- after its masked input, during unmasking: its self mask is removed from its
  neighbours' seed shares like any survivor's.
Below `min_clients`, or with fewer than t shares for a secret that is needed, the round
fails (`RoundFailed`) and releases nothing.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from . import shamir
from .client import MASK_LABEL, pairwise_sign
from .graph import build_graph, share_threshold
from .messages import (
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    PeerKeys,
    Phase,
    ProtocolError,
    Refusal,
    RevealedShare,
    Roster,
    RoundFailed,
    ShareBundle,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from .primitives import KEY_BYTES, RING, CryptoError, agree, commitment, expand, public_of
from .ring import Encoding, encoding_for

# How many other subsets of t shares to try when the first does not reconstruct a secret
# that matches its commitment (a holder sent a bad share).
_MAX_RETRIES = 32


@dataclass(frozen=True)
class PhaseDeadlines:
    """Seconds each phase stays open; then it closes with whoever answered."""

    advertise: float = 30.0
    share: float = 30.0
    masked_input: float = 120.0
    unmask: float = 30.0

    def of(self, phase: Phase) -> float:
        return {Phase.ADVERTISE: self.advertise, Phase.SHARE: self.share,
                Phase.MASKED_INPUT: self.masked_input, Phase.UNMASK: self.unmask}[phase]


@dataclass(frozen=True)
class SecAggConfig:
    """The secure-aggregation settings of a job (mapped from the API by the coordinator).

    threshold: share of a client's neighbours whose shares recover its secrets, in
    (0.5, 1]. neighbours: degree of the SecAgg+ graph (None: 2*ceil(log2 n)+2; n-1 or more:
    every pair, as in Bonawitz et al.). value_range: each coordinate is clipped to
    ±value_range before fixed-point encoding. min_clients: fewest survivors whose sum is
    released. quantize_bits: 32 encodes in fixed point; 16/8/4/2 quantizes stochastically
    into the smallest ring that holds the sum (ring.Quantized).
    """

    threshold: float = 0.67
    neighbours: int | None = None
    value_range: float = 4.0
    min_clients: int = 2
    deadlines: PhaseDeadlines = PhaseDeadlines()
    quantize_bits: int = 32

    def __post_init__(self) -> None:
        share_threshold(4, self.threshold)  # raises for a threshold outside (0.5, 1]
        if self.neighbours is not None and self.neighbours < 1:
            raise ValueError(f"neighbours must be >= 1, got {self.neighbours}")
        if self.min_clients < 2:
            raise ValueError("min_clients must be >= 2: the sum of one update is that update")
        if self.quantize_bits not in (32, 16, 8, 4, 2):
            raise ValueError(f"quantize_bits must be 32, 16, 8, 4 or 2, got {self.quantize_bits}")


@dataclass(frozen=True)
class SecAggResult:
    total: np.ndarray  # float64 sum of the survivors' (clipped, fixed-point) updates
    survivors: tuple[str, ...]  # whose updates are in the sum (U3)
    dropped: tuple[str, ...]  # selected but not in the sum


class SecAggServer:
    def __init__(self, *, round: int, selected: Iterable[str], length: int,
                 config: SecAggConfig, seed: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.round = round
        self.config = config
        self.length = length
        self.selected = frozenset(selected)
        self.seed = seed
        self.clock = clock
        self.phase = Phase.ADVERTISE
        self.deadline = clock() + config.deadlines.advertise
        self._adverts: dict[str, KeyAdvert] = {}
        self._graph: dict[str, tuple[str, ...]] = {}
        self._threshold = 0
        self._encoding: Encoding | None = None
        self._commitments: dict[str, bytes] = {}
        self._bundles: dict[str, tuple[EncryptedShare, ...]] = {}
        self._sharers: frozenset[str] = frozenset()  # U2
        self._total = np.zeros(0, dtype=RING)
        self._masked: set[str] = set()  # U3 as it fills
        self._requests: dict[str, UnmaskRequest] = {}
        self._revealed: dict[str, UnmaskResponse] = {}

    # ------------------------------------------------------------ bookkeeping

    def expected(self) -> frozenset[str]:
        """Who may still answer the open phase."""
        answered = {Phase.ADVERTISE: set(self._adverts), Phase.SHARE: set(self._bundles),
                    Phase.MASKED_INPUT: self._masked, Phase.UNMASK: set(self._revealed),
                    Phase.DONE: set()}[self.phase]
        return self._eligible() - answered

    def all_in(self) -> bool:
        return not self.expected()

    def expired(self) -> bool:
        return self.clock() >= self.deadline

    def _eligible(self) -> frozenset[str]:
        return {Phase.ADVERTISE: self.selected, Phase.SHARE: frozenset(self._graph),
                Phase.MASKED_INPUT: self._sharers, Phase.UNMASK: frozenset(self._requests),
                Phase.DONE: frozenset()}[self.phase]

    def _open(self, phase: Phase) -> None:
        self.phase = phase
        if phase is not Phase.DONE:
            self.deadline = self.clock() + self.config.deadlines.of(phase)

    def _admit(self, node_id: str, round: int, phase: Phase) -> None:
        if round != self.round:
            raise ProtocolError(Refusal.WRONG_ROUND, f"message for round {round}, the "
                                f"secure round open is {self.round}")
        if self.phase is not phase:
            raise ProtocolError(Refusal.WRONG_PHASE, f"a {phase.value} message while phase "
                                f"{self.phase.value} is open (late, early or replayed)")
        if node_id not in self._eligible():
            raise ProtocolError(Refusal.NOT_PARTICIPANT, f"node {node_id!r} takes no part in "
                                f"phase {phase.value} of round {self.round}")
        if node_id not in self.expected():
            raise ProtocolError(Refusal.DUPLICATE, f"node {node_id!r} already answered "
                                f"phase {phase.value}")

    def _enough(self, nodes: Iterable[str], what: str) -> None:
        count = len(set(nodes))
        if count < self.config.min_clients:
            raise RoundFailed(f"round {self.round}: {count} clients {what}, fewer than the "
                              f"{self.config.min_clients} needed to release a sum")

    # ------------------------------------------------------------- phase 0

    def receive_advert(self, advert: KeyAdvert) -> None:
        self._admit(advert.node_id, advert.round, Phase.ADVERTISE)
        for field, key in (("cipher_public", advert.cipher_public),
                           ("mask_public", advert.mask_public)):
            if len(key) != KEY_BYTES:
                raise ProtocolError(Refusal.MALFORMED, f"{field} must be {KEY_BYTES} bytes, "
                                    f"got {len(key)}")
        if advert.cipher_public == advert.mask_public or any(
                advert.mask_public == a.mask_public for a in self._adverts.values()):
            raise ProtocolError(Refusal.FORGED, "advertised keys repeat a key already in use "
                                "(a replayed advertisement)")
        self._adverts[advert.node_id] = advert

    def close_advertising(self) -> dict[str, Roster]:
        self._enough(self._adverts, "advertised keys")
        self._graph = build_graph(self._adverts, neighbours=self.config.neighbours,
                                  seed=self.seed)
        degree = min(len(p) for p in self._graph.values())
        self._threshold = share_threshold(degree, self.config.threshold)
        self._encoding = encoding_for(self.config.value_range, len(self._adverts),
                                      self.config.quantize_bits)
        self._total = np.zeros(self.length, dtype=RING)
        rosters = {}
        for node, peers in self._graph.items():
            rosters[node] = Roster(
                round=self.round, clients=len(self._adverts), threshold=self._threshold,
                value_range=self.config.value_range,
                neighbours=tuple(PeerKeys(p, self._adverts[p].cipher_public,
                                          self._adverts[p].mask_public) for p in peers))
        self._open(Phase.SHARE)
        return rosters

    # ------------------------------------------------------------- phase 1

    def receive_shares(self, bundle: ShareBundle) -> None:
        self._admit(bundle.node_id, bundle.round, Phase.SHARE)
        if len(bundle.seed_commitment) != 32:
            raise ProtocolError(Refusal.MALFORMED, "seed_commitment must be 32 bytes")
        recipients = [s.recipient for s in bundle.shares]
        if sorted(recipients) != list(self._graph[bundle.node_id]) or any(
                s.sender != bundle.node_id for s in bundle.shares):
            raise ProtocolError(Refusal.FORGED, f"node {bundle.node_id!r} must send one share "
                                "to each of its neighbours, and only to them")
        self._commitments[bundle.node_id] = bundle.seed_commitment
        self._bundles[bundle.node_id] = bundle.shares

    def close_sharing(self) -> dict[str, ShareDelivery]:
        sharers = set(self._bundles)
        while True:  # prune clients whose secrets too few sharing neighbours could recover
            short = {n for n in sharers
                     if len(set(self._graph[n]) & sharers) < self._threshold}
            if not short:
                break
            sharers -= short
        self._enough(sharers, "shared their keys")
        self._sharers = frozenset(sharers)
        inbox: dict[str, list[EncryptedShare]] = {n: [] for n in sharers}
        for sender in sharers:
            for item in self._bundles[sender]:
                if item.recipient in inbox:
                    inbox[item.recipient].append(item)
        self._bundles = {}  # delivered: nothing of them is needed again
        self._open(Phase.MASKED_INPUT)
        return {n: ShareDelivery(self.round, tuple(items)) for n, items in inbox.items()}

    # ------------------------------------------------------------- phase 2

    def receive_masked(self, masked: MaskedInput) -> None:
        """Fold a masked input into the running sum. The vector is not kept."""
        self._admit(masked.node_id, masked.round, Phase.MASKED_INPUT)
        vector = masked.vector
        if not isinstance(vector, np.ndarray) or vector.dtype != RING or vector.ndim != 1:
            raise ProtocolError(Refusal.BAD_SHAPE, f"masked input must be a flat "
                                f"{np.dtype(RING).name} vector")
        if vector.size != self.length:
            raise ProtocolError(Refusal.BAD_SHAPE, f"masked input has {vector.size} elements, "
                                f"the model has {self.length}")
        assert self._encoding is not None
        bits = self._encoding.ring_bits
        if bits < 32 and vector.size and int(vector.max()) >> bits:
            raise ProtocolError(Refusal.MALFORMED, f"masked input has elements outside the "
                                f"ring Z_2^{bits} of this round")
        np.add(self._total, vector, out=self._total)
        self._masked.add(masked.node_id)

    def close_masking(self) -> dict[str, UnmaskRequest]:
        survivors = set(self._masked)
        self._enough(survivors, "sent masked inputs")
        dropped = self._sharers - survivors
        self._requests = {
            node: UnmaskRequest(
                self.round,
                dropped=tuple(p for p in self._graph[node] if p in dropped),
                survivors=tuple(p for p in self._graph[node] if p in survivors))
            for node in sorted(survivors)}
        self._open(Phase.UNMASK)
        return dict(self._requests)

    # ------------------------------------------------------------- phase 3

    def receive_unmask(self, response: UnmaskResponse) -> None:
        self._admit(response.node_id, response.round, Phase.UNMASK)
        request = self._requests[response.node_id]
        for got, wanted, what in ((response.key_shares, request.dropped, "key_shares"),
                                  (response.seed_shares, request.survivors, "seed_shares")):
            owners = [s.owner for s in got]
            if sorted(owners) != sorted(wanted):
                raise ProtocolError(Refusal.FORGED, f"{what} must cover exactly "
                                    f"{sorted(wanted)}, got {sorted(owners)}")
            for share in got:
                if len(share.share) != shamir.SHARE_BYTES or not 1 <= share.index <= len(
                        self._graph[share.owner]):
                    raise ProtocolError(Refusal.MALFORMED, f"{what}: the share of "
                                        f"{share.owner!r} is malformed")
        self._revealed[response.node_id] = response

    def finish(self) -> SecAggResult:
        """Remove the masks and decode the sum; RoundFailed when it cannot be done."""
        if self.phase is not Phase.UNMASK:
            raise ProtocolError(Refusal.WRONG_PHASE, f"finish() in phase {self.phase.value}")
        self._enough(self._revealed, "answered the unmask request")
        assert self._encoding is not None
        survivors = sorted(self._masked)
        dropped = sorted(self._sharers - self._masked)
        seed_shares = self._collect(lambda r: r.seed_shares)
        key_shares = self._collect(lambda r: r.key_shares)
        total = self._total
        for node in survivors:
            seed = self._recover(node, seed_shares.get(node, []),
                                 lambda s, n=node: commitment(s) == self._commitments[n],
                                 "self-mask seed")
            total -= expand(seed, self.length)
        for node in dropped:
            key = self._recover(node, key_shares.get(node, []),
                                lambda s, n=node: public_of(s) == self._adverts[n].mask_public,
                                "mask key")
            for peer in self._graph[node]:
                if peer not in self._masked:
                    continue
                pair = expand(agree(key, self._adverts[peer].mask_public, label=MASK_LABEL,
                                    round=self.round), self.length)
                if pairwise_sign(peer, node) > 0:
                    total -= pair
                else:
                    total += pair
        self._open(Phase.DONE)
        result = self._encoding.decode(total)
        self._total = np.zeros(0, dtype=RING)
        return SecAggResult(result, tuple(survivors),
                            tuple(sorted(self.selected - set(survivors))))

    def _collect(self, pick: Callable[[UnmaskResponse], tuple[RevealedShare, ...]]
                 ) -> dict[str, list[tuple[int, bytes]]]:
        shares: dict[str, list[tuple[int, bytes]]] = {}
        for response in self._revealed.values():
            for item in pick(response):
                shares.setdefault(item.owner, []).append((item.index, item.share))
        return shares

    def _recover(self, owner: str, shares: list[tuple[int, bytes]],
                 valid: Callable[[bytes], bool], what: str) -> bytes:
        if len({i for i, _ in shares}) < self._threshold:
            raise RoundFailed(f"round {self.round}: {len(shares)} shares of {owner!r}'s "
                              f"{what}, {self._threshold} needed")
        points = dict(shares)
        for chosen in itertools.islice(itertools.combinations(sorted(points), self._threshold),
                                       _MAX_RETRIES):
            try:
                secret = shamir.combine([(i, points[i]) for i in chosen],
                                        threshold=self._threshold)
                if valid(secret):
                    return secret
            except (shamir.ShareError, CryptoError):
                continue
        raise RoundFailed(f"round {self.round}: the shares of {owner!r}'s {what} do not "
                          "reconstruct it (a neighbour sent a bad share)")

    @property
    def encoding(self) -> Encoding | None:
        """The round's encoding, once advertising has closed (it depends on n)."""
        return self._encoding

    # ---------------------------------------------------------- checkpoints

    def state_summary(self) -> Mapping[str, object]:
        """What a checkpoint or status may show: counts only, no vector, no share."""
        return {"round": self.round, "phase": self.phase.value,
                "advertised": len(self._adverts), "shared": len(self._sharers),
                "masked": len(self._masked), "unmasked": len(self._revealed)}
