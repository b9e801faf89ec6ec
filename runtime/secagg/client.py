"""The client's side of a secure round: a small state machine, one method per phase.

It holds its two key pairs, its self-mask seed and the shares its neighbours sent it,
and refuses a coordinator request that would let anyone unmask a single update (the
same neighbour reported both dropped and surviving, a stranger's shares, too few
survivors). Pure: the agent moves its messages over gRPC.
"""

from __future__ import annotations

import os

import numpy as np

from . import shamir
from .messages import (
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    Phase,
    ProtocolError,
    Refusal,
    RevealedShare,
    Roster,
    ShareBundle,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from .primitives import (
    KEY_BYTES,
    RING,
    SEED_BYTES,
    CryptoError,
    KeyPair,
    agree,
    commitment,
    expand,
    open_sealed,
    seal,
)
from .ring import Encoding, encoding_for, reduce

SHARE_LABEL = b"share"
MASK_LABEL = b"mask"
_PLAINTEXT_BYTES = 2 + 2 * shamir.SHARE_BYTES


def share_associated_data(round: int, sender: str, recipient: str) -> bytes:
    """What a share's ciphertext is bound to: replaying it elsewhere fails to decrypt."""
    return f"fedkube-secagg|{round}|{sender}|{recipient}".encode()


def pairwise_sign(node: str, peer: str) -> int:
    """+1 for the lower id of a pair, -1 for the higher: their masks cancel in the sum."""
    return 1 if node < peer else -1


class SecAggClient:
    def __init__(self, node_id: str, round: int, *, quantize_bits: int = 32) -> None:
        self.node_id = node_id
        self.round = round
        self.quantize_bits = quantize_bits  # 32: fixed point; 16/8/4/2: stochastic codes
        self.encoding: Encoding | None = None  # the round's, once the roster is in
        self.phase = Phase.ADVERTISE
        self._cipher = KeyPair.generate()
        self._mask = KeyPair.generate()
        self._seed = os.urandom(SEED_BYTES)
        self._roster: Roster | None = None
        self._peers: dict[str, tuple[bytes, bytes]] = {}
        self._received: dict[str, tuple[int, bytes, bytes]] = {}  # sender -> its shares

    # phase 0
    def advertise(self) -> KeyAdvert:
        self._expect(Phase.ADVERTISE)
        self.phase = Phase.SHARE
        return KeyAdvert(self.node_id, self.round, self._cipher.public, self._mask.public)

    # phase 1
    def share(self, roster: Roster) -> ShareBundle:
        self._expect(Phase.SHARE)
        self._check_round(roster.round, "roster")
        peers = {p.node_id: (p.cipher_public, p.mask_public) for p in roster.neighbours}
        if len(peers) != len(roster.neighbours) or self.node_id in peers:
            raise ProtocolError(Refusal.MALFORMED,
                                "roster.neighbours repeats a node or names this client")
        if not 1 <= roster.threshold <= len(peers):
            raise ProtocolError(Refusal.MALFORMED, f"roster.threshold {roster.threshold} is "
                                f"not within 1..{len(peers)} neighbours")
        for node, (cipher, mask) in peers.items():
            if len(cipher) != KEY_BYTES or len(mask) != KEY_BYTES:
                raise ProtocolError(Refusal.MALFORMED, f"roster: keys of {node!r} are not "
                                    f"{KEY_BYTES} bytes")
        try:  # refuses a nonsensical encoding
            self.encoding = encoding_for(roster.value_range, roster.clients, self.quantize_bits)
        except ValueError as error:
            raise ProtocolError(Refusal.MALFORMED, f"roster: {error}") from None
        self._roster, self._peers = roster, peers
        holders = sorted(peers)
        key_shares = shamir.split(self._mask.private, threshold=roster.threshold,
                                  holders=len(holders))
        seed_shares = shamir.split(self._seed, threshold=roster.threshold,
                                   holders=len(holders))
        sealed = []
        for holder, (index, key_share), (_, seed_share) in zip(holders, key_shares, seed_shares,
                                                               strict=True):
            key = agree(self._cipher.private, peers[holder][0], label=SHARE_LABEL,
                        round=self.round)
            plaintext = index.to_bytes(2, "big") + key_share + seed_share
            nonce, ciphertext = seal(key, plaintext, associated=share_associated_data(
                self.round, self.node_id, holder))
            sealed.append(EncryptedShare(self.node_id, holder, nonce, ciphertext))
        self.phase = Phase.MASKED_INPUT
        return ShareBundle(self.node_id, self.round, commitment(self._seed), tuple(sealed))

    # phase 2
    def mask(self, delivery: ShareDelivery, update: np.ndarray,
             rng: np.random.Generator | None = None) -> MaskedInput:
        """The masked encoding of `update` (a flat float vector): ring elements of
        Z_2^b, b = self.encoding.ring_bits, held in uint32. `rng`: the stochastic
        rounding's randomness (quantized encodings; default a fresh generator)."""
        self._expect(Phase.MASKED_INPUT)
        self._check_round(delivery.round, "share delivery")
        assert self._roster is not None
        received: dict[str, tuple[int, bytes, bytes]] = {}
        for item in delivery.shares:
            if item.recipient != self.node_id or item.sender not in self._peers:
                raise ProtocolError(Refusal.FORGED, f"a share from {item.sender!r} to "
                                    f"{item.recipient!r} is not for this client's neighbourhood")
            if item.sender in received:
                raise ProtocolError(Refusal.DUPLICATE, f"two shares from {item.sender!r}")
            key = agree(self._cipher.private, self._peers[item.sender][0], label=SHARE_LABEL,
                        round=self.round)
            try:
                plaintext = open_sealed(key, item.nonce, item.ciphertext,
                                        associated=share_associated_data(
                                            self.round, item.sender, self.node_id))
            except CryptoError as error:
                raise ProtocolError(Refusal.FORGED, f"share from {item.sender!r}: {error}") from None
            if len(plaintext) != _PLAINTEXT_BYTES:
                raise ProtocolError(Refusal.MALFORMED, f"share from {item.sender!r} has "
                                    f"{len(plaintext)} bytes")
            index = int.from_bytes(plaintext[:2], "big")
            cut = 2 + shamir.SHARE_BYTES
            received[item.sender] = (index, plaintext[2:cut], plaintext[cut:])
        if len(received) < self._roster.threshold:
            raise ProtocolError(Refusal.FORGED, f"only {len(received)} neighbours shared "
                                f"(threshold {self._roster.threshold}): masking with so few "
                                "would let their masks be removed")
        encoding = self.encoding
        assert encoding is not None
        vector = encoding.encode(update, rng)
        vector += expand(self._seed, vector.size)
        for peer in received:  # the pairwise masks with every neighbour still in
            seed = agree(self._mask.private, self._peers[peer][1], label=MASK_LABEL,
                         round=self.round)
            if pairwise_sign(self.node_id, peer) > 0:
                vector += expand(seed, vector.size)
            else:
                vector -= expand(seed, vector.size)
        reduce(vector, encoding.ring_bits)
        self._received = received
        self.phase = Phase.UNMASK
        return MaskedInput(self.node_id, self.round, vector.astype(RING, copy=False))

    # phase 3
    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        self._expect(Phase.UNMASK)
        self._check_round(request.round, "unmask request")
        assert self._roster is not None
        dropped, survivors = set(request.dropped), set(request.survivors)
        if dropped & survivors:
            raise ProtocolError(Refusal.FORGED, f"unmask request names {sorted(dropped & survivors)} "
                                "both dropped and surviving: that would unmask them")
        unknown = (dropped | survivors) - set(self._received)
        if unknown:
            raise ProtocolError(Refusal.FORGED, f"unmask request names {sorted(unknown)}, "
                                "who shared nothing with this client")
        if len(survivors) + 1 < self._roster.threshold:
            raise ProtocolError(Refusal.FORGED, f"only {len(survivors)} surviving neighbours "
                                f"(threshold {self._roster.threshold}): refusing to unmask")
        self.phase = Phase.DONE
        return UnmaskResponse(
            self.node_id, self.round,
            key_shares=tuple(RevealedShare(o, self._received[o][0], self._received[o][1])
                             for o in sorted(dropped)),
            seed_shares=tuple(RevealedShare(o, self._received[o][0], self._received[o][2])
                              for o in sorted(survivors)))

    def _expect(self, phase: Phase) -> None:
        if self.phase is not phase:
            raise ProtocolError(Refusal.WRONG_PHASE, f"client {self.node_id!r} is in phase "
                                f"{self.phase.value}, not {phase.value}")

    def _check_round(self, round: int, what: str) -> None:
        if round != self.round:
            raise ProtocolError(Refusal.WRONG_ROUND, f"{what} is for round {round}, "
                                f"this client is in round {self.round}")
