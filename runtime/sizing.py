"""A job's model size and memory, as `fedkube validate` prints them: builds the job's model
for its dataset's shape and asks the pure estimator in `models/footprint.py`."""

from __future__ import annotations

from . import wire
from .aggregation.catalog import rule_for
from .models import build_model
from .models.footprint import Footprint, JobShape, activation_bytes, estimate, human_bytes
from .spec import FederatedJobSpec


def job_footprint(spec: FederatedJobSpec) -> Footprint:
    """Raises what loading the dataset or building the model raises (a missing path)."""
    from .data.datasets import load_dataset
    from .training import weights_of

    dataset = load_dataset(spec.data, seed=spec.seed)
    model = build_model(spec.model, input_shape=dataset.input_shape,
                        num_classes=dataset.num_classes, seed=spec.seed)
    weights = weights_of(model)
    population = spec.simulation.clients or spec.clients_per_round or spec.min_clients
    shape = JobShape(
        batch_size=spec.batch_size, optimizer=spec.optimizer,
        local_dp=spec.privacy.mode == "local", robust=rule_for(spec.strategy.name.value).buffered,
        clients_per_round=max(1, spec.clients_to_select(population)),
        activation_bytes_per_sample=activation_bytes(model, dataset.input_shape))
    return estimate(weights, update_bytes=update_bytes(spec, weights), shape=shape)


def update_bytes(spec: FederatedJobSpec, weights) -> int:
    """What one update costs on the wire: raw float tensors, or under spec.compression
    the estimate for its coarsest setting (before lossless framing, which only helps)."""
    import torch

    from .compression import CompressionConfig
    from .compression.adaptive import estimated_bytes

    raw = wire.encoded_size(weights)
    compression = spec.compression
    if compression.top_k is None and compression.quantize_bits == 32:
        return raw
    config = CompressionConfig(top_k=compression.top_k, bits=compression.quantize_bits)
    floats = [t.numel() for t in weights.values() if t.dtype == torch.float32]
    others = raw - 4 * sum(floats)
    return others + estimated_bytes(config, floats)


def format_footprint(footprint: Footprint) -> str:
    update = human_bytes(footprint.update_bytes)
    client = human_bytes(footprint.client_memory_bytes)
    coordinator = human_bytes(footprint.coordinator_memory_bytes)
    return "\n".join([
        f"  parameters:           {footprint.parameters:,}",
        f"  update on the wire:   {update} per client per round",
        f"  memory per client:    ~{client} of tensors",
        f"  memory, coordinator:  ~{coordinator} of tensors (plus the evaluation data)",
    ])
