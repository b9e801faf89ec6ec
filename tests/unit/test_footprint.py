"""The model size and memory estimator behind `fedkube validate`."""

from __future__ import annotations

import pytest
import torch
from fedkube.runtime.models.footprint import (
    FLOAT_BYTES,
    JobShape,
    activation_bytes,
    estimate,
    human_bytes,
)
from fedkube.runtime.sizing import job_footprint
from fedkube.runtime.spec import parse_job_spec
from torch import nn

SHAPE = JobShape(batch_size=8, optimizer="sgd", local_dp=False, robust=False,
                 clients_per_round=5, activation_bytes_per_sample=100)


def _weights() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(10, 4), "b": torch.zeros(10)}  # 50 parameters, 200 bytes


def test_counts_parameters_and_client_tensors() -> None:
    footprint = estimate(_weights(), update_bytes=260, shape=SHAPE)
    assert footprint.parameters == 50 and footprint.model_bytes == 200
    assert footprint.update_bytes == 260
    # weights + gradients + received global model + one batch of activations
    assert footprint.client_memory_bytes == 3 * 200 + 8 * 100
    assert footprint.coordinator_memory_bytes == 4 * 200


def test_adam_dp_sgd_and_robust_rules_cost_what_they_hold() -> None:
    base = estimate(_weights(), update_bytes=0, shape=SHAPE)
    adam = estimate(_weights(), update_bytes=0, shape=JobShape(**{**SHAPE.__dict__,
                                                                   "optimizer": "adam"}))
    assert adam.client_memory_bytes - base.client_memory_bytes == 2 * 50 * FLOAT_BYTES
    dp = estimate(_weights(), update_bytes=0, shape=JobShape(**{**SHAPE.__dict__,
                                                                 "local_dp": True}))
    assert dp.client_memory_bytes - base.client_memory_bytes == 8 * 50 * FLOAT_BYTES
    robust = estimate(_weights(), update_bytes=0, shape=JobShape(**{**SHAPE.__dict__,
                                                                     "robust": True}))
    assert robust.coordinator_memory_bytes - base.coordinator_memory_bytes == 5 * 200


def test_unknown_optimizer_is_named() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        estimate(_weights(), update_bytes=0,
                 shape=JobShape(**{**SHAPE.__dict__, "optimizer": "lion"}))


def test_activations_are_every_module_output_of_one_example() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU())
    assert activation_bytes(model, (1, 2, 2)) == (4 + 3 + 3) * FLOAT_BYTES


def test_a_zoo_job_is_sized_from_its_model() -> None:
    footprint = job_footprint(parse_job_spec({"model": "mlp", "clientsPerRound": 2}))
    assert footprint.parameters > 1000
    assert footprint.update_bytes >= footprint.model_bytes  # framing on top of the floats
    assert footprint.client_memory_bytes > footprint.model_bytes


def test_human_bytes() -> None:
    assert human_bytes(512) == "512 B" and human_bytes(2048) == "2.0 KiB"
    assert human_bytes(3 * 1024**3) == "3.0 GiB"
