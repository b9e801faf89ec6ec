"""What the clients and the coordinator say to each other in a secure round, as plain
frozen dataclasses (`wire.convert` maps them to protobuf). Four phases, after Bonawitz et
al. 2017, Figure 4 (semi-honest server variant), with the neighbour graph of SecAgg+:

0. advertise: each client sends two X25519 public keys (one to encrypt shares, one to
   agree pairwise masks).                                  -> KeyAdvert
   The coordinator draws the neighbour graph and sends each client its neighbours' keys.
                                                            <- Roster
1. share: each client Shamir-shares its mask key and a fresh self-mask seed t-of-k over
   its neighbours, each share encrypted for its holder.    -> ShareBundle
   The coordinator forwards to each client the shares addressed to it.
                                                            <- ShareDelivery
2. masked input: fixed-point update + self mask + pairwise masks, in Z_2^32.
                                                            -> MaskedInput
3. unmask: each survivor is told which of its neighbours dropped (send their mask-key
   shares) and which survived (send their seed shares), never both for one.
                                                            <- UnmaskRequest
                                                            -> UnmaskResponse
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class Phase(enum.Enum):
    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"
    DONE = "done"


class Refusal(enum.Enum):
    """Why a protocol message is refused (the coordinator maps each to a RejectReason)."""

    WRONG_ROUND = "wrong_round"
    WRONG_PHASE = "wrong_phase"  # not the phase now open: late, early or replayed
    NOT_PARTICIPANT = "not_participant"  # not selected, or dropped from an earlier phase
    DUPLICATE = "duplicate"
    MALFORMED = "malformed"
    BAD_SHAPE = "bad_shape"  # a masked input of the wrong length or type
    FORGED = "forged"  # fails authentication or asks what it must not


class ProtocolError(ValueError):
    """A refused protocol message; `refusal` says why, the text names the field."""

    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal


class RoundFailed(RuntimeError):
    """Too few clients left to finish (or to unmask) the round; it is retried like any
    round below minClients. No partial sum is ever released."""


@dataclass(frozen=True)
class KeyAdvert:
    node_id: str
    round: int
    cipher_public: bytes  # X25519: encrypts shares between neighbours
    mask_public: bytes  # X25519: agrees pairwise masks


@dataclass(frozen=True)
class PeerKeys:
    node_id: str
    cipher_public: bytes
    mask_public: bytes


@dataclass(frozen=True)
class Roster:
    """The coordinator's answer to phase 0 for one client: its neighbours and the
    round's parameters."""

    round: int
    clients: int  # |U1|: sets the fixed-point scale
    threshold: int  # t of t-of-k
    value_range: float
    neighbours: tuple[PeerKeys, ...]


@dataclass(frozen=True)
class EncryptedShare:
    sender: str
    recipient: str
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class ShareBundle:
    node_id: str
    round: int
    seed_commitment: bytes  # SHA-256 of the self-mask seed, to check its reconstruction
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class ShareDelivery:
    round: int
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class MaskedInput:
    node_id: str
    round: int
    vector: np.ndarray  # uint32, the model's length


@dataclass(frozen=True)
class UnmaskRequest:
    round: int
    dropped: tuple[str, ...]  # neighbours whose mask-key shares are wanted
    survivors: tuple[str, ...]  # neighbours whose seed shares are wanted


@dataclass(frozen=True)
class RevealedShare:
    owner: str  # whose secret this is a share of
    index: int
    share: bytes


@dataclass(frozen=True)
class UnmaskResponse:
    node_id: str
    round: int
    key_shares: tuple[RevealedShare, ...]
    seed_shares: tuple[RevealedShare, ...]
