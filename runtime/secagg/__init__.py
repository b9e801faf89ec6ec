"""Secure aggregation: the coordinator learns the sum of the clients' updates, never one
of them (Bonawitz et al. 2017, CCS; with the sparse neighbour graph of SecAgg+, Bell et
al. 2020, CCS). Pure protocol logic, no network: `SecAggClient` and `SecAggServer` are
small state machines over the four phases; the agent and the coordinator move their
messages over gRPC.
"""

from .client import SecAggClient
from .graph import build_graph, neighbour_count, share_threshold
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
from .ring import Encoding, FixedPoint, Quantized, encoding_for, from_wire, to_wire
from .server import PhaseDeadlines, SecAggConfig, SecAggResult, SecAggServer

__all__ = [
    "Encoding", "EncryptedShare", "FixedPoint", "KeyAdvert", "MaskedInput", "PeerKeys", "Phase",
    "PhaseDeadlines", "ProtocolError", "Quantized", "Refusal", "RevealedShare", "Roster", "RoundFailed",
    "SecAggClient", "SecAggConfig", "SecAggResult", "SecAggServer", "ShareBundle",
    "ShareDelivery", "UnmaskRequest", "UnmaskResponse", "build_graph", "encoding_for",
    "from_wire", "neighbour_count", "share_threshold", "to_wire",
]
