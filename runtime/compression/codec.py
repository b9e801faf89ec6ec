"""One tensor, encoded: top-k sparsification, stochastic quantization, lossless framing.

An encoded tensor is a few numbers (`count` entries sent, `sparse`, `bits`, `block`,
`lossless`) and one payload. The payload, before lossless framing, is laid out as

    [indices: int32 x count, strictly increasing]   if sparse
    [lows: float32 x blocks][steps: float32 x blocks]  if bits < 32
    [values: float32 x count | codes: bits x count, packed little-end first]

so its length follows from the numbers alone and a decoder can refuse anything else
before reading it. Quantization is per block of `block` entries with stochastic
rounding, so the decoded tensor is an unbiased estimate of the one encoded (Alistarh et
al., 2017, "QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding";
the min-max levels of Suresh et al., 2017, "Distributed Mean Estimation with Limited
Communication"). Top-k keeps the largest entries by magnitude (Aji & Heafield, 2017,
"Sparse Communication for Distributed Gradient Descent"); error feedback (`feedback.py`)
makes it converge.

Pure functions on tensors; no protocol types. Malformed input raises `EncodingError`
naming what is wrong.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Lossless = Literal["none", "zstd", "lz4"]
BITS = (32, 16, 8, 4, 2)
LOSSLESS: tuple[Lossless, ...] = ("none", "zstd", "lz4")
DEFAULT_BLOCK = 1024
MAX_BLOCK = 1 << 20
ZSTD_LEVEL = 1  # the fastest level: the codes leave little for higher levels to find


class EncodingError(ValueError):
    """An encoded tensor that cannot be decoded; the text says which part is wrong."""


@dataclass(frozen=True)
class CompressionConfig:
    """How one update is compressed. `top_k`: the fraction of each tensor's entries kept
    (None: all); `bits`: 32 sends float32 values, 16/8/4/2 quantized codes; `lossless`
    frames the result; `error_feedback` carries what was not sent into the next round."""

    top_k: float | None = None
    bits: int = 32
    error_feedback: bool = False
    lossless: Lossless = "none"
    block: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        if self.top_k is not None and not 0.0 < self.top_k <= 1.0:
            raise ValueError(f"top_k must be in (0, 1], got {self.top_k!r}")
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits!r}")
        if self.lossless not in LOSSLESS:
            raise ValueError(f"lossless must be one of {LOSSLESS}, got {self.lossless!r}")
        if not 1 <= self.block <= MAX_BLOCK:
            raise ValueError(f"block must be in [1, {MAX_BLOCK}], got {self.block!r}")

    @property
    def lossy(self) -> bool:
        return self.top_k is not None or self.bits < 32

    @property
    def enabled(self) -> bool:
        return self.lossy or self.lossless != "none"

    def describe(self) -> str:
        """A short label, e.g. 'top1%+q8+zstd' or 'fp32'."""
        parts = []
        if self.top_k is not None:
            parts.append(f"top{self.top_k * 100:g}%")
        if self.bits < 32:
            parts.append(f"q{self.bits}")
        if self.lossless != "none":
            parts.append(self.lossless)
        return "+".join(parts) or "fp32"


@dataclass(frozen=True)
class EncodedTensor:
    shape: tuple[int, ...]
    count: int  # entries sent
    sparse: bool
    bits: int
    block: int
    lossless: Lossless
    payload: bytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return len(self.payload)


def raw_size(*, count: int, sparse: bool, bits: int, block: int) -> int:
    """Bytes of the payload before lossless framing."""
    size = 4 * count if sparse else 0
    if bits < 32:
        size += 8 * _blocks(count, block) + (count * bits + 7) // 8
    else:
        size += 4 * count
    return size


def _blocks(count: int, block: int) -> int:
    return (count + block - 1) // block


# ------------------------------------------------------------------ quantization


def quantize(values: torch.Tensor | np.ndarray, *, bits: int, block: int,
             generator: np.random.Generator | None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lows, steps, codes) of a flat float32 tensor: per block of `block` entries, codes
    in [0, 2**bits - 1] with lows + codes * steps an unbiased estimate of `values`."""
    lows, steps, codes = _quantize(_flat_numpy(values), bits=bits, block=block,
                                   generator=generator)
    return lows, steps, _pack(codes, bits)


def _flat_numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values.reshape(-1).astype(np.float32, copy=False)
    return values.detach().reshape(-1).to("cpu", torch.float32).numpy()


def _blockwise(flat: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The full blocks as a (blocks, block) view, and the shorter last block (or None)."""
    full = len(flat) // block
    head = flat[:full * block].reshape(full, block)
    return head, (flat[full * block:] if full * block < len(flat) else None)


def _quantize(flat: np.ndarray, *, bits: int, block: int,
              generator: np.random.Generator | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lows, steps, unpacked codes: uint8, or uint16 for 16 bits). Numpy, in place where
    it can be: a few passes over float32, no float64, no per-element Python."""
    count = len(flat)
    levels = np.float32((1 << bits) - 1)
    blocks = _blocks(count, block)
    head, tail = _blockwise(flat, block)
    full = len(head)
    lows = np.empty(blocks, dtype=np.float32)
    highs = np.empty(blocks, dtype=np.float32)
    if full:
        np.min(head, axis=1, out=lows[:full])
        np.max(head, axis=1, out=highs[:full])
    if tail is not None:
        lows[full], highs[full] = tail.min(), tail.max()
    steps = (highs - lows) / levels
    inverse = np.zeros(blocks, dtype=np.float32)
    np.divide(np.float32(1.0), steps, out=inverse, where=steps > 0)
    # (x - low) / step + U[0, 1), truncated, is floor with stochastic rounding (it is
    # >= 0), so E[code] = (x - low) / step exactly; the min catches x == high with noise.
    rng = generator if generator is not None else np.random.default_rng()
    scaled = rng.random(count, dtype=np.float32)
    s_head, s_tail = _blockwise(scaled, block)
    if full:
        shifted = np.subtract(head, lows[:full, None])
        shifted *= inverse[:full, None]
        s_head += shifted
    if tail is not None:
        assert s_tail is not None
        s_tail += (tail - lows[full]) * inverse[full]
    np.minimum(scaled, levels, out=scaled)
    return lows, steps, scaled.astype(np.uint16 if bits == 16 else np.uint8)


def dequantize(lows: np.ndarray, steps: np.ndarray, codes: np.ndarray, *, count: int,
               block: int) -> torch.Tensor:
    """float32 values lows + codes * steps, blockwise (the inverse of `quantize`)."""
    out = codes[:count].astype(np.float32)  # the cast, one pass
    head, tail = _blockwise(out, block)
    full = len(head)
    if full:
        head *= steps[:full, None]
        head += lows[:full, None]
    if tail is not None:
        tail *= steps[full]
        tail += lows[full]
    return torch.from_numpy(out)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    if bits == 16:
        return codes.astype("<u2", copy=False)
    if bits == 8:
        return codes
    per_byte = 8 // bits
    pad = (-len(codes)) % per_byte
    if pad:
        codes = np.concatenate([codes, np.zeros(pad, dtype=np.uint8)])
    grid = codes.reshape(-1, per_byte)
    packed = np.zeros(len(grid), dtype=np.uint8)
    for slot in range(per_byte):
        packed |= grid[:, slot] << np.uint8(slot * bits)
    return packed


def _unpack(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 16:
        return data.view("<u2")
    if bits == 8:
        return data
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    grid = np.empty((len(data), per_byte), dtype=np.uint8)
    for slot in range(per_byte):
        grid[:, slot] = (data >> np.uint8(slot * bits)) & mask
    return grid.reshape(-1)[:count]


# ------------------------------------------------------------------ lossless


def frame(data: bytes, lossless: Lossless) -> bytes:
    if lossless == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    if lossless == "lz4":
        import lz4.frame

        return lz4.frame.compress(data, store_size=True)
    return data


def unframe(data: bytes, lossless: str, *, expected: int) -> bytes:
    """The framed bytes decompressed, refused unless they come to exactly `expected`
    bytes; never more than `expected + 1` bytes are produced, so a small frame cannot
    expand into a large allocation."""
    if lossless == "none":
        out = data
    elif lossless == "zstd":
        import zstandard

        try:
            declared = zstandard.frame_content_size(data)
            if declared not in (-1, expected):
                raise EncodingError(f"zstd frame declares {declared} bytes, expected {expected}")
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
            out = reader.read(expected + 1)
        except zstandard.ZstdError as error:
            raise EncodingError(f"zstd frame is corrupt: {error}") from None
    elif lossless == "lz4":
        import lz4.frame

        try:
            out = lz4.frame.LZ4FrameDecompressor().decompress(data, max_length=expected + 1)
        except RuntimeError as error:
            raise EncodingError(f"lz4 frame is corrupt: {error}") from None
    else:
        raise EncodingError(f"lossless {lossless!r} is not one of {', '.join(LOSSLESS)}")
    if len(out) != expected:
        raise EncodingError(f"payload holds {len(out)} bytes, its encoding needs {expected}")
    return bytes(out)


# ------------------------------------------------------------------ one tensor


def top_k_indices(values: torch.Tensor | np.ndarray, fraction: float) -> torch.Tensor:
    """The indices (int64, increasing) of the top-k entries by magnitude (`_top_k`)."""
    return torch.from_numpy(_top_k(_flat_numpy(values), fraction).astype(np.int64))


def _top_k(flat: np.ndarray, fraction: float) -> np.ndarray:
    """The indices (int64, increasing) of the ceil(fraction * n) entries of largest
    magnitude of a flat tensor; at least one for a non-empty tensor. Ties at the k-th
    magnitude go to the lowest indices."""
    n = len(flat)
    k = min(n, max(1, math.ceil(fraction * n))) if n else 0
    if k == n:
        return np.arange(n)
    magnitude = np.abs(flat)
    candidates: np.ndarray | None = None
    if n >= _SAMPLED_TOP_K:
        # A threshold from a strided sample, set loose enough that at least k entries
        # pass it (checked): the k largest are then all among those candidates, so the
        # exact selection below runs over a few k entries instead of all n.
        step = max(1, n // _SAMPLE)
        sample = magnitude[::step]
        rank = max(0, len(sample) - math.ceil(2 * k / step) - 8)
        threshold = np.partition(sample, rank)[rank]
        candidates = np.flatnonzero(magnitude >= threshold)
        if len(candidates) < k:
            candidates = None
    pool = magnitude if candidates is None else magnitude[candidates]
    # The k-th largest magnitude by selection (no sort); everything above it is kept,
    # and as many entries equal to it as are needed, first come first kept. Indices
    # come out increasing because masks keep order.
    kth = np.partition(pool, len(pool) - k)[len(pool) - k]
    keep = pool > kth
    missing = k - int(np.count_nonzero(keep))
    if missing:
        keep[np.flatnonzero(pool == kth)[:missing]] = True
    chosen = np.flatnonzero(keep)
    return chosen if candidates is None else candidates[chosen]


_SAMPLED_TOP_K = 1 << 16  # tensors this large pick top-k through a sampled threshold
_SAMPLE = 1 << 14


def encode(tensor: torch.Tensor, config: CompressionConfig, *,
           generator: np.random.Generator | None = None) -> EncodedTensor:
    """`tensor` (floating point) encoded as `config` says."""
    return encode_with_sent(tensor, config, generator=generator, sent=False)[0]


def encode_with_sent(tensor: torch.Tensor, config: CompressionConfig, *,
                     generator: np.random.Generator | None = None, sent: bool = True
                     ) -> tuple[EncodedTensor, torch.Tensor | None]:
    """`tensor` encoded, and (when `sent`) the dense float32 tensor the encoding decodes
    to, bit for bit what `decode` returns, built from the parts in hand instead of by
    decoding the payload again."""
    encoded, flat, indices, decoded = _encode(tensor, config, generator=generator,
                                              decoded=sent)
    if not sent:
        return encoded, None
    if indices is None:
        # A copy where `decoded` is the caller's own values (32 bits, dense).
        dense = decoded.copy() if decoded is flat else decoded
        if dense is None:
            dense = np.zeros(0, dtype=np.float32)
    else:
        dense = np.zeros(len(flat), dtype=np.float32)
        if decoded is not None:
            dense[indices] = decoded
    return encoded, torch.from_numpy(dense).reshape(tensor.shape)


def encode_with_residual(tensor: torch.Tensor, config: CompressionConfig, *,
                         generator: np.random.Generator | None = None
                         ) -> tuple[EncodedTensor, torch.Tensor]:
    """`tensor` encoded, and what it leaves unsent: `tensor - decode(encoded)`, bit for
    bit (float32), for error feedback. Under top-k only the sent entries are computed:
    the rest is the tensor itself, one copy instead of a dense decode and a subtraction."""
    encoded, flat, indices, decoded = _encode(tensor, config, generator=generator,
                                              decoded=True)
    if indices is None:
        residual = (np.zeros(len(flat), dtype=np.float32) if decoded is flat or decoded is None
                    else np.subtract(flat, decoded))
    else:
        residual = flat.copy()
        if decoded is not None:
            residual[indices] -= decoded
    return encoded, torch.from_numpy(residual).reshape(tensor.shape)


def _encode(tensor: torch.Tensor, config: CompressionConfig, *,
            generator: np.random.Generator | None, decoded: bool
            ) -> tuple[EncodedTensor, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(the encoding, the flat float32 input, the top-k indices or None, and when
    `decoded` the values the encoding decodes to at those indices, or everywhere)."""
    flat = _flat_numpy(tensor)
    sparse = config.top_k is not None and config.top_k < 1.0
    parts: list[bytes | np.ndarray] = []
    indices = None
    if sparse:
        assert config.top_k is not None
        indices = _top_k(flat, config.top_k)
        parts.append(indices.astype("<i4"))
        values = flat[indices]
    else:
        values = flat
    count = len(values)
    sent = None
    if config.bits < 32 and count:
        lows, steps, codes = _quantize(values, bits=config.bits, block=config.block,
                                       generator=generator)
        parts += [lows, steps, _pack(codes, config.bits)]
        if decoded:
            sent = dequantize(lows, steps, codes, count=count, block=config.block).numpy()
    elif count:
        parts.append(values)
        sent = values
    raw = b"".join(np.ascontiguousarray(part).data if isinstance(part, np.ndarray) else part
                   for part in parts)
    lossless = config.lossless
    payload = frame(raw, lossless)
    if lossless != "none" and len(payload) >= len(raw):  # incompressible: send it as is
        payload, lossless = raw, "none"
    encoded = EncodedTensor(shape=tuple(tensor.shape), count=count, sparse=sparse,
                            bits=config.bits, block=config.block, lossless=lossless,
                            payload=payload)
    return encoded, flat, indices, sent


@dataclass(frozen=True)
class Parsed:
    """An encoded tensor's parts, checked, as views of its unframed payload (no decoded
    copy is kept: `densify` decodes it whenever it is read)."""

    shape: tuple[int, ...]
    indices: np.ndarray | None  # int32, strictly increasing, in range
    values: np.ndarray | None  # float32 values (bits 32), finite
    quantized: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # lows, steps, packed codes
    count: int
    bits: int
    block: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def check_header(encoded: EncodedTensor) -> int:
    """The payload size before framing; EncodingError if the numbers make no sense."""
    numel = encoded.numel
    if encoded.bits not in BITS:
        raise EncodingError(f"bits {encoded.bits} is not one of {BITS}")
    if not 1 <= encoded.block <= MAX_BLOCK:
        raise EncodingError(f"block {encoded.block} is not in [1, {MAX_BLOCK}]")
    if encoded.sparse:
        if not 0 <= encoded.count <= numel:
            raise EncodingError(f"{encoded.count} sparse entries for {numel} elements")
    elif encoded.count != numel:
        raise EncodingError(f"dense encoding of {encoded.count} entries for {numel} elements")
    return raw_size(count=encoded.count, sparse=encoded.sparse, bits=encoded.bits,
                    block=encoded.block)


def parse(encoded: EncodedTensor) -> Parsed:
    """Unframe and check every part: indices in range and strictly increasing, lows and
    steps finite (steps >= 0), values finite. Raises EncodingError."""
    expected = check_header(encoded)
    raw = unframe(encoded.payload, encoded.lossless, expected=expected)
    count, numel = encoded.count, encoded.numel
    # A writable copy of the (compressed-sized) payload: torch reads its views in place.
    buffer = np.frombuffer(bytearray(raw), dtype=np.uint8)
    at = 0
    indices = None
    if encoded.sparse:
        indices = buffer[:4 * count].view("<i4")
        at = 4 * count
        if count and (int(indices[0]) < 0 or int(indices[-1]) >= numel):
            raise EncodingError(f"sparse indices out of range [0, {numel})")
        if count > 1 and not bool((np.diff(indices) > 0).all()):
            raise EncodingError("sparse indices are not strictly increasing (or out of range)")
    values = quantized = None
    if encoded.bits < 32:
        blocks = _blocks(count, encoded.block)
        lows = buffer[at:at + 4 * blocks].view("<f4")
        steps = buffer[at + 4 * blocks:at + 8 * blocks].view("<f4")
        at += 8 * blocks
        if not (np.isfinite(lows).all() and np.isfinite(steps).all()):
            raise EncodingError("quantization scale is NaN or infinite")
        if (steps < 0).any():
            raise EncodingError("quantization scale is negative")
        # Every decoded value lies between low and low + levels * step: finite if these are.
        levels = np.float32((1 << encoded.bits) - 1)
        with np.errstate(over="ignore"):
            if not np.isfinite(lows + levels * steps).all():
                raise EncodingError("quantization scale overflows float32 (NaN or Inf)")
        quantized = (lows, steps, buffer[at:])
    else:
        values = buffer[at:].view("<f4")
        if count and not _finite(values):
            raise EncodingError("values hold NaN or Inf")
    return Parsed(shape=encoded.shape, indices=indices, values=values, quantized=quantized,
                  count=count, bits=encoded.bits, block=encoded.block)


def _finite(values: np.ndarray) -> bool:
    """No NaN or Inf, in one pass: a finite sum proves it (only an overflow is rechecked)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(values.sum(dtype=np.float32)):
            return True
    return bool(np.isfinite(values).all())


def decode(encoded: EncodedTensor) -> torch.Tensor:
    """The dense float32 tensor an encoding stands for (zeros where top-k sent nothing)."""
    return densify(parse(encoded))


def densify(parsed: Parsed) -> torch.Tensor:
    """The dense float32 tensor of a parsed encoding, newly decoded."""
    if parsed.quantized is not None:
        lows, steps, packed = parsed.quantized
        codes = _unpack(packed, parsed.bits, parsed.count)
        values = dequantize(lows, steps, codes, count=parsed.count, block=parsed.block)
    else:
        assert parsed.values is not None
        values = torch.from_numpy(parsed.values.copy())
    if parsed.indices is None:
        return values.reshape(parsed.shape)
    out = torch.zeros(parsed.numel, dtype=torch.float32)
    out[torch.from_numpy(parsed.indices.astype(np.int64))] = values
    return out.reshape(parsed.shape)
