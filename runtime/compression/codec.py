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


def quantize(values: torch.Tensor, *, bits: int, block: int, generator: np.random.Generator | None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lows, steps, codes) of a flat float32 tensor: per block of `block` entries, codes
    in [0, 2**bits - 1] with lows + codes * steps an unbiased estimate of `values`."""
    count = values.numel()
    levels = (1 << bits) - 1
    blocks = _blocks(count, block)
    flat = values.detach().reshape(-1).to(torch.float32)
    full = count // block
    lows = torch.empty(blocks, dtype=torch.float32)
    highs = torch.empty(blocks, dtype=torch.float32)
    if full:
        grid = flat[:full * block].view(full, block)
        torch.amin(grid, dim=1, out=lows[:full])
        torch.amax(grid, dim=1, out=highs[:full])
    if full < blocks:  # the last, shorter block
        lows[full], highs[full] = flat[full * block:].min(), flat[full * block:].max()
    steps = (highs - lows) / levels
    inverse = torch.where(steps > 0, 1.0 / steps, torch.zeros_like(steps))
    # In place, one pass each: x / step - low / step + U[0, 1), truncated, is floor with
    # stochastic rounding (everything is >= 0); the clamp catches x == high with noise.
    rng = generator if generator is not None else np.random.default_rng()
    scaled = torch.from_numpy(rng.random(count, dtype=np.float32))
    offsets = lows * inverse
    if full:
        head = scaled[:full * block].view(full, block)
        head.addcmul_(flat[:full * block].view(full, block), inverse[:full, None])
        head.sub_(offsets[:full, None])
    if full < blocks:
        tail = scaled[full * block:]
        tail.addcmul_(flat[full * block:], inverse[full]).sub_(offsets[full])
    codes = scaled.clamp_(0, levels)
    dtype = torch.int32 if bits == 16 else torch.uint8
    return lows.numpy(), steps.numpy(), _pack(codes.to(dtype).numpy(), bits)


def dequantize(lows: np.ndarray, steps: np.ndarray, codes: np.ndarray, *, count: int,
               block: int) -> torch.Tensor:
    """float32 values lows + codes * steps, blockwise (the inverse of `quantize`)."""
    out = torch.empty(count, dtype=torch.float32)
    source = torch.from_numpy(codes.astype(np.int32) if codes.dtype != np.uint8 else codes)
    out.copy_(source)  # the cast to float32 in the same pass
    full = count // block
    low, step = torch.from_numpy(lows), torch.from_numpy(steps)
    if full:
        head = out[:full * block].view(full, block)
        head.mul_(step[:full, None]).add_(low[:full, None])
    if full * block < count:
        out[full * block:].mul_(step[full]).add_(low[full])
    return out


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    if bits == 16:
        return codes.astype("<u2")
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


def top_k_indices(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """The indices (int64, increasing) of the ceil(fraction * n) entries of largest
    magnitude of a flat tensor; at least one for a non-empty tensor."""
    n = values.numel()
    k = min(n, max(1, math.ceil(fraction * n))) if n else 0
    if k == n:
        return torch.arange(n)
    magnitude = values.abs()
    if n >= _SAMPLED_TOP_K:
        # A threshold from a strided sample, set loose enough that at least k entries
        # pass it (checked): the k largest are then all among those candidates, so the
        # exact top-k costs one comparison pass instead of a selection over all n.
        step = max(1, n // _SAMPLE)
        sample = magnitude[::step]
        rank = max(1, sample.numel() - math.ceil(2 * k / step) - 8)
        threshold = torch.kthvalue(sample, rank).values
        candidates = (magnitude >= threshold).nonzero().squeeze(1)
        if candidates.numel() >= k:
            chosen = torch.topk(magnitude[candidates], k, sorted=False).indices
            return candidates[_in_order(chosen, candidates.numel())]
    return _in_order(torch.topk(magnitude, k, sorted=False).indices, n)


def _in_order(chosen: torch.Tensor, n: int) -> torch.Tensor:
    """Distinct indices into range(n), increasing; through a mask, because torch.sort of
    a few ten thousand integers takes a large part of a second on some CPUs."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return mask.nonzero().squeeze(1)


_SAMPLED_TOP_K = 1 << 16  # tensors this large pick top-k through a sampled threshold
_SAMPLE = 1 << 14


def encode(tensor: torch.Tensor, config: CompressionConfig, *,
           generator: np.random.Generator | None = None) -> EncodedTensor:
    """`tensor` (floating point) encoded as `config` says."""
    flat = tensor.detach().reshape(-1).to("cpu", torch.float32)
    sparse = config.top_k is not None and config.top_k < 1.0
    parts: list[bytes] = []
    if sparse:
        assert config.top_k is not None
        indices = top_k_indices(flat, config.top_k)
        parts.append(indices.to(torch.int32).numpy().tobytes())
        values = flat[indices]
    else:
        values = flat
    count = values.numel()
    if config.bits < 32 and count:
        lows, steps, codes = quantize(values, bits=config.bits, block=config.block,
                                      generator=generator)
        parts += [lows.tobytes(), steps.tobytes(), codes.tobytes()]
    elif count:
        parts.append(values.contiguous().numpy().tobytes())
    raw = b"".join(parts)
    lossless = config.lossless
    payload = frame(raw, lossless)
    if lossless != "none" and len(payload) >= len(raw):  # incompressible: send it as is
        payload, lossless = raw, "none"
    return EncodedTensor(shape=tuple(tensor.shape), count=count, sparse=sparse,
                         bits=config.bits, block=config.block, lossless=lossless,
                         payload=payload)


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
