"""DP-FedAvg at the coordinator: clipping bounds every update, noise has the calibrated std."""

from __future__ import annotations

import math

import pytest
import torch
from fedkube.runtime.privacy import (
    add_gaussian_noise,
    central_noise_std,
    clip_update,
    update_norm,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def _update(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": scale * torch.randn(4, 1, 3, 3, generator=generator),
        "conv.bias": scale * torch.randn(4, generator=generator),
        "fc.weight": scale * torch.randn(10, 16, generator=generator),
        "steps": torch.tensor(7),
    }


def _copies(update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in update.items()}


def test_update_norm_is_the_l2_norm_of_all_float_entries() -> None:
    update = _update(0)
    flat = torch.cat([t.flatten() for name, t in update.items() if name != "steps"])
    assert update_norm(update) == pytest.approx(float(flat.norm()), rel=1e-6)
    assert update_norm({}) == 0.0
    assert math.isnan(update_norm({"w": torch.tensor([1.0, float("nan")])}))


def test_a_large_update_is_scaled_to_the_bound_in_a_new_dict() -> None:
    update = _update(1, scale=10.0)
    original = _copies(update)
    clipped = clip_update(update, max_norm=1.5)
    assert update_norm(clipped) == pytest.approx(1.5, rel=1e-5)
    factor = 1.5 / update_norm(update)
    for name in ("conv.weight", "conv.bias", "fc.weight"):
        torch.testing.assert_close(clipped[name], original[name] * factor)
        assert clipped[name].data_ptr() != update[name].data_ptr()
        torch.testing.assert_close(update[name], original[name], rtol=0, atol=0)
    assert clipped["steps"].item() == 7


def test_a_small_update_is_left_unchanged() -> None:
    update = _update(2, scale=0.01)
    clipped = clip_update(update, max_norm=5.0)
    for name, tensor in update.items():
        torch.testing.assert_close(clipped[name], tensor, rtol=0, atol=0)
        assert clipped[name] is not tensor


def test_clip_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        clip_update({"w": torch.tensor([1.0, float("inf")])}, max_norm=1.0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_update(_update(3), max_norm=0.0)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-4, 1e3),
    max_norm=st.floats(1e-3, 10.0),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
)
def test_clipped_norm_never_exceeds_the_bound(seed, scale, max_norm, dtype) -> None:
    update = {name: t.to(dtype) for name, t in _update(seed, scale).items() if name != "steps"}
    clipped = clip_update(update, max_norm=max_norm)
    # float16 rounding of the scaled entries may land a hair above the bound.
    slack = 1e-3 if dtype == torch.float16 else 1e-6
    assert update_norm(clipped) <= max_norm * (1 + slack)
    if update_norm(update) <= max_norm:
        for name, tensor in update.items():
            assert torch.equal(clipped[name], tensor)


def test_noise_has_the_calibrated_standard_deviation() -> None:
    noise_multiplier, clip_norm, clients = 1.1, 0.8, 16
    std = central_noise_std(
        noise_multiplier=noise_multiplier, clip_norm=clip_norm, clients_per_round=clients
    )
    mean_delta = {"w": torch.full((400, 500), 0.25), "b": torch.zeros(1000), "n": torch.tensor(3)}
    original = _copies(mean_delta)
    noisy = add_gaussian_noise(mean_delta, std=std, generator=torch.Generator().manual_seed(0))
    residual = torch.cat([(noisy["w"] - 0.25).flatten(), noisy["b"]]).double()
    # 201,000 draws: the sample std is within 0.5% of the true one with overwhelming odds.
    assert float(residual.std()) == pytest.approx(std, rel=5e-3)
    assert abs(float(residual.mean())) < 5 * std / math.sqrt(residual.numel())
    assert noisy["n"].item() == 3
    for name, tensor in mean_delta.items():
        assert torch.equal(tensor, original[name])


def test_noise_follows_the_generator() -> None:
    delta = _update(4)
    first = add_gaussian_noise(delta, std=0.1, generator=torch.Generator().manual_seed(7))
    again = add_gaussian_noise(delta, std=0.1, generator=torch.Generator().manual_seed(7))
    other = add_gaussian_noise(delta, std=0.1, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(first[name], again[name]) for name in delta)
    assert not torch.equal(first["fc.weight"], other["fc.weight"])
    half = add_gaussian_noise(
        {"w": torch.zeros(50_000, dtype=torch.float16)},
        std=0.05,
        generator=torch.Generator().manual_seed(1),
    )["w"]
    assert half.dtype == torch.float16
    assert float(half.float().std()) == pytest.approx(0.05, rel=0.02)
    with pytest.raises(ValueError, match="std"):
        add_gaussian_noise(delta, std=-1.0, generator=torch.Generator())
