"""Central (user-level) differential privacy at the coordinator: DP-FedAvg (McMahan et al.
2018, "Learning Differentially Private Recurrent Language Models", Algorithm 1).

Each client's update (new weights minus the global model) is clipped to L2 norm ``S``
across all its tensors, the clipped updates are averaged with equal weights over the ``m``
clients aggregated, and Gaussian noise of standard deviation ``z * S / m``
(``analysis.central_noise_std``) is added to that mean. Epsilon is accounted over rounds
with the client sampling rate (``analysis.central_sample_rate``).

Pure functions: tensors in, new tensors out; inputs are never modified. Only floating-point
tensors carry an update's information in fedkube's models (the zoo has no integer buffers);
other tensors are passed through unclipped and un-noised, so a caller that sends integer
buffers in central mode must drop them first or they leave the mechanism's protection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["add_gaussian_noise", "clip_update", "update_norm"]


def update_norm(delta: Mapping[str, Tensor]) -> float:
    """Global L2 norm of an update over all its floating-point tensors (as if flattened
    into one vector), accumulated in float64 so large models in float16 do not overflow."""
    total = 0.0
    for tensor in delta.values():
        if tensor.is_floating_point():
            total += float(torch.sum(tensor.detach().to(torch.float64) ** 2))
    return math.sqrt(total)


def clip_update(delta: Mapping[str, Tensor], *, max_norm: float) -> dict[str, Tensor]:
    """A copy of ``delta`` scaled by ``min(1, max_norm / norm)``: updates within the bound
    come back unchanged (as copies), larger ones with norm exactly ``max_norm`` (up to
    floating-point rounding). Raises ``ValueError`` for a non-finite update, which has no
    meaningful clipped version."""
    if not (math.isfinite(max_norm) and max_norm > 0.0):
        raise ValueError(f"max_norm must be finite and > 0, got {max_norm}")
    norm = update_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("update has NaN or infinite entries; it cannot be clipped")
    scale = 1.0 if norm <= max_norm else max_norm / norm
    clipped: dict[str, Tensor] = {}
    for name, tensor in delta.items():
        copy = tensor.detach().clone()
        if scale != 1.0 and copy.is_floating_point():
            copy.mul_(scale)
        clipped[name] = copy
    return clipped


def add_gaussian_noise(
    mean_delta: Mapping[str, Tensor], *, std: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """A copy of ``mean_delta`` with independent N(0, std²) noise added to every entry of
    every floating-point tensor, drawn from ``generator`` (whose state the coordinator
    checkpoints with the round, so a resumed job does not replay noise). Noise is drawn in
    float32 or wider and the sum cast back, so half-precision tensors get the intended std."""
    if not (math.isfinite(std) and std >= 0.0):
        raise ValueError(f"std must be finite and >= 0, got {std}")
    noisy: dict[str, Tensor] = {}
    for name, tensor in mean_delta.items():
        if not tensor.is_floating_point():
            noisy[name] = tensor.detach().clone()
            continue
        wide = torch.promote_types(tensor.dtype, torch.float32)
        noise = torch.randn(
            tensor.shape, generator=generator, dtype=wide, device=generator.device
        ).to(tensor.device)
        noisy[name] = (tensor.detach().to(wide) + std * noise).to(tensor.dtype)
    return noisy
