"""The cryptographic building blocks of secure aggregation, all from `cryptography`: key
agreement, key derivation, authenticated encryption and the mask generator (Shamir
sharing is in `shamir.py`).

- X25519 key agreement, its shared secret run through HKDF-SHA256 with a label and the
  round, so the keys of one round (or one purpose) say nothing about another's.
- ChaCha20-Poly1305 for the shares a client sends its neighbours through the coordinator:
  the associated data binds sender, recipient and round, so a share cannot be replayed
  to another client or in another round.
- AES-256-CTR as the PRG that expands a 32-byte seed into a mask in the ring Z_2^32.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
SEED_BYTES = 32
NONCE_BYTES = 12
RING = np.uint32  # the ring Z_2^32: numpy's uint32 arithmetic wraps around

_RAW = serialization.Encoding.Raw
_RAW_PRIVATE = serialization.PrivateFormat.Raw
_RAW_PUBLIC = serialization.PublicFormat.Raw


class CryptoError(ValueError):
    """A protocol value that fails a cryptographic check (a forged or corrupted share,
    a key of the wrong size, a secret that does not reconstruct)."""


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw bytes (the private half never leaves the client except
    as Shamir shares)."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        key = X25519PrivateKey.generate()
        return cls(private=key.private_bytes(_RAW, _RAW_PRIVATE, serialization.NoEncryption()),
                   public=key.public_key().public_bytes(_RAW, _RAW_PUBLIC))


def public_of(private: bytes) -> bytes:
    """The public key of a raw X25519 private key (to check a reconstructed key)."""
    key = X25519PrivateKey.from_private_bytes(_exact(private, KEY_BYTES, "private key"))
    return key.public_key().public_bytes(_RAW, _RAW_PUBLIC)


def agree(private: bytes, peer_public: bytes, *, label: bytes, round: int) -> bytes:
    """A 32-byte key both ends derive alone: HKDF-SHA256 over the X25519 secret, bound to
    `label` (what the key is for) and the round."""
    key = X25519PrivateKey.from_private_bytes(_exact(private, KEY_BYTES, "private key"))
    try:
        peer = X25519PublicKey.from_public_bytes(_exact(peer_public, KEY_BYTES, "public key"))
        secret = key.exchange(peer)
    except ValueError as error:  # e.g. a low-order point: the exchange yields all zeros
        raise CryptoError(f"key agreement failed: {error}") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"fedkube-secagg/" + label + b"/" + str(round).encode()).derive(secret)


def seal(key: bytes, plaintext: bytes, *, associated: bytes) -> tuple[bytes, bytes]:
    """(nonce, ciphertext) of `plaintext` under ChaCha20-Poly1305."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce, ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, nonce: bytes, ciphertext: bytes, *, associated: bytes) -> bytes:
    """The plaintext of `seal`; CryptoError when it was forged, altered or replayed under
    other associated data."""
    try:
        return ChaCha20Poly1305(key).decrypt(_exact(nonce, NONCE_BYTES, "nonce"), ciphertext,
                                             associated)
    except InvalidTag:
        raise CryptoError("share ciphertext fails authentication (forged, altered or "
                          "replayed)") from None


def expand(seed: bytes, length: int) -> np.ndarray:
    """`length` pseudo-random elements of Z_2^32 from a 32-byte seed: AES-256-CTR
    keystream (a PRG under the usual assumption on AES)."""
    encryptor = Cipher(algorithms.AES(_exact(seed, SEED_BYTES, "seed")),
                       modes.CTR(b"\0" * 16)).encryptor()
    stream = encryptor.update(bytes(4 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(RING, copy=False)


def commitment(secret: bytes) -> bytes:
    """A binding, hiding-for-random-secrets commitment: SHA-256 with a domain label. Lets
    the coordinator check a reconstructed self-mask seed."""
    return hashlib.sha256(b"fedkube-secagg/seed/" + secret).digest()


def _exact(value: bytes, size: int, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != size:
        got = len(value) if isinstance(value, bytes | bytearray) else type(value).__name__
        raise CryptoError(f"{what} must be {size} bytes, got {got}")
    return bytes(value)
