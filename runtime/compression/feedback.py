"""A whole update compressed, with error feedback.

Error feedback (Seide et al., 2014, "1-Bit Stochastic Gradient Descent and its
Application to Data-Parallel Distributed Training of Speech DNNs"; Stich et al., 2018,
"Sparsified SGD with Memory") adds to each round's update what earlier rounds did not
send, and keeps what this round does not send: over rounds nothing is lost, so top-k and
coarse quantization converge like the uncompressed run. The accounting is exact:
`sent + new residual == update + old residual`, tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .codec import CompressionConfig, EncodedTensor, decode, encode, encode_with_residual

Weights = dict[str, torch.Tensor]
Part = EncodedTensor | torch.Tensor  # an encoding, or a tensor sent as raw elements


@dataclass(frozen=True)
class CompressedUpdate:
    """What goes on the wire (by tensor name, in the update's order), the residual to keep
    for the next round (None without error feedback), and its size against raw."""

    parts: dict[str, Part]
    residual: Weights | None
    sent_bytes: int
    raw_bytes: int

    @property
    def ratio(self) -> float:
        """Bytes sent as a fraction of the raw elements' bytes."""
        return self.sent_bytes / self.raw_bytes if self.raw_bytes else 1.0


def compressible(tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.float32 and tensor.numel() > 0


def compress_update(update: Mapping[str, torch.Tensor], config: CompressionConfig, *,
                    residual: Mapping[str, torch.Tensor] | None = None,
                    generator: np.random.Generator | None = None) -> CompressedUpdate:
    """Each float32 tensor of `update` (plus its residual under error feedback) encoded by
    `config`; a tensor whose encoding would not be smaller than its raw elements, and
    every non-float32 tensor, is sent raw. `update` and `residual` are not modified."""
    parts: dict[str, Part] = {}
    kept: Weights = {}
    sent = raw = 0
    for name, tensor in update.items():
        size = tensor.numel() * tensor.element_size()
        raw += size
        if not compressible(tensor) or not config.enabled:
            parts[name], sent = tensor, sent + size
            if config.error_feedback and compressible(tensor):
                kept[name] = torch.zeros_like(tensor)
            continue
        target = tensor
        if config.error_feedback and residual is not None and name in residual:
            target = tensor + residual[name].to(tensor.device, tensor.dtype)
        # What is left unsent comes with the encoding (no second decode pass).
        if config.error_feedback:
            encoded, left = encode_with_residual(target, config, generator=generator)
        else:
            encoded, left = encode(target, config, generator=generator), None
        if encoded.nbytes >= size:
            parts[name], sent = target, sent + size
            left = torch.zeros_like(target)
        else:
            parts[name], sent = encoded, sent + encoded.nbytes
        if left is not None:
            kept[name] = left.to(target.device)
    return CompressedUpdate(parts=parts, residual=kept if config.error_feedback else None,
                            sent_bytes=sent, raw_bytes=raw)


def decode_update(parts: Mapping[str, Part]) -> Weights:
    """The dense update a CompressedUpdate stands for (tests and the reference path)."""
    return {name: decode(p) if isinstance(p, EncodedTensor) else p for name, p in parts.items()}
