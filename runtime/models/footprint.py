"""How big a job's model is, on the wire and in memory: the figures `fedkube validate`
prints. Pure arithmetic over a model's tensors and a few job facts; no spec, no I/O.

The memory figures are estimates of the tensors a process holds, not of the Python
interpreter or torch's own start-up (about 300-500 MB for a CPU process):
- a client holds the weights, their gradients, the optimizer's state (none for plain SGD,
  two moments for Adam), the global model it received (to form its delta), and the
  activations of one batch; DP-SGD (Opacus) also keeps one gradient per sample of the batch.
- the coordinator holds the global model, the running weighted sum of updates, one update
  being decoded, the evaluation model, and for robust rules (which need every update) a
  buffer of every update of the round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

# Bytes per element of float32, the dtype of every zoo model.
FLOAT_BYTES = 4
OPTIMIZER_STATES = {"sgd": 0, "adam": 2}


@dataclass(frozen=True)
class JobShape:
    """The few facts of a job that size its tensors."""

    batch_size: int
    optimizer: str  # sgd | adam
    local_dp: bool  # DP-SGD per-sample gradients on each client
    robust: bool  # the strategy buffers every update of a round
    clients_per_round: int
    activation_bytes_per_sample: int  # forward activations of one example


@dataclass(frozen=True)
class Footprint:
    parameters: int
    model_bytes: int  # the weights in memory
    update_bytes: int  # one update on the wire, framing included
    client_memory_bytes: int
    coordinator_memory_bytes: int


def parameter_count(weights: Mapping[str, torch.Tensor]) -> int:
    return sum(tensor.numel() for tensor in weights.values())


def tensor_bytes(weights: Mapping[str, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in weights.values())


def estimate(weights: Mapping[str, torch.Tensor], *, update_bytes: int,
             shape: JobShape) -> Footprint:
    """The footprint of a job training `weights`; `update_bytes` is what the wire format
    encodes them to (the coordinator's `wire.encoded_size`)."""
    if shape.optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer: expected one of {sorted(OPTIMIZER_STATES)}, "
                         f"got {shape.optimizer!r}")
    if shape.batch_size < 1 or shape.clients_per_round < 1:
        raise ValueError("batch_size and clients_per_round must be >= 1")
    model = tensor_bytes(weights)
    trainable = parameter_count(weights) * FLOAT_BYTES
    # weights + gradients + optimizer moments + the received global model
    client = model + trainable * (1 + OPTIMIZER_STATES[shape.optimizer]) + model
    client += shape.batch_size * shape.activation_bytes_per_sample
    if shape.local_dp:
        client += shape.batch_size * trainable
    # global model + running sum + one update being decoded + evaluation copy
    coordinator = 4 * model
    if shape.robust:
        coordinator += shape.clients_per_round * model
    return Footprint(parameters=parameter_count(weights), model_bytes=model,
                     update_bytes=update_bytes, client_memory_bytes=client,
                     coordinator_memory_bytes=coordinator)


def activation_bytes(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """Bytes of every module output in one forward pass of one example: what backward
    keeps per sample (an upper bound: in-place ops share storage)."""
    total = 0

    def count(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        for handle in handles:
            handle.remove()
    return total


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
