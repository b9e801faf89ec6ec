"""DP-SGD through Opacus on a tiny model: wiring, step accounting, unwrapping, validation."""

from __future__ import annotations

import pytest
import torch
from fedkube.runtime.models import ZOO_NAMES, build_model
from fedkube.runtime.privacy import (
    PrivacyAccountant,
    Step,
    epsilon_for,
    local_steps,
    prepare_model,
    private_training,
    unwrap,
)
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SAMPLES, BATCH = 96, 16


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(SAMPLES, 6, generator=generator)
    labels = torch.randint(0, 3, (SAMPLES,), generator=generator)
    return DataLoader(TensorDataset(features, labels), batch_size=BATCH)


def _train_one_epoch(model, optimizer, loader) -> int:
    steps = 0
    for features, labels in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(features), labels).backward()
        optimizer.step()
        steps += 1
    return steps


@pytest.mark.parametrize(
    ("num_samples", "batch_size", "epochs", "expected"),
    [
        (100, 10, 1, (10, 0.1)),
        (95, 10, 2, (20, 0.1)),
        (100, 30, 3, (12, 0.25)),
        (5, 64, 1, (1, 1.0)),
        (100, 10, 0, (0, 0.1)),
    ],
)
def test_local_steps(num_samples, batch_size, epochs, expected) -> None:
    steps, rate = local_steps(num_samples, batch_size, epochs)
    assert (steps, rate) == (expected[0], pytest.approx(expected[1]))


def test_local_steps_mirror_opacus_poisson_loader_exactly() -> None:
    # 930 / 10 = 93 batches, where Opacus' int(1 / (1 / 93)) runs 92 steps an epoch.
    for num_samples in (96, 930, 1000, 1797):
        dataset = TensorDataset(torch.zeros(num_samples, 1))
        loader = DPDataLoader.from_data_loader(DataLoader(dataset, batch_size=10))
        steps, rate = local_steps(num_samples, 10, 1)
        assert rate == loader.sample_rate
        assert steps == len(loader)


def test_private_training_runs_opacus_and_records_every_step() -> None:
    model = _model()
    original_keys = list(model.state_dict())
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    accountant = PrivacyAccountant("rdp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    private_model, private_optimizer, private_loader = private_training(
        model,
        optimizer,
        _loader(),
        noise_multiplier=1.2,
        max_grad_norm=0.7,
        seed=11,
        accountant=accountant,
    )
    assert isinstance(private_model, GradSampleModule)
    assert isinstance(private_optimizer, DPOptimizer)
    assert isinstance(private_loader, DPDataLoader)
    assert private_optimizer.noise_multiplier == 1.2
    assert private_optimizer.max_grad_norm == 0.7

    taken = _train_one_epoch(private_model, private_optimizer, private_loader)
    planned_steps, sample_rate = local_steps(SAMPLES, BATCH, 1)
    assert taken == planned_steps
    assert accountant.history == (Step(1.2, sample_rate, planned_steps),)
    assert accountant.epsilon(1e-5) == epsilon_for(
        noise_multiplier=1.2, sample_rate=sample_rate, steps=planned_steps, delta=1e-5,
        accountant="rdp",
    )

    plain = unwrap(private_model)
    assert plain is model
    assert list(plain.state_dict()) == original_keys
    assert all(not hasattr(p, "grad_sample") for p in plain.parameters())
    assert any(not torch.equal(before[k], v) for k, v in plain.state_dict().items())
    assert unwrap(plain) is plain


def _trained_weights(seed: int | None, noise: float = 1.0) -> dict[str, torch.Tensor]:
    model = _model()
    private = private_training(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5),
        _loader(),
        noise_multiplier=noise,
        max_grad_norm=1.0,
        seed=seed,
        accountant=PrivacyAccountant("rdp"),
    )
    _train_one_epoch(*private)
    return unwrap(private[0]).state_dict()


def test_a_seed_fixes_sampling_and_noise() -> None:
    first, again, other = _trained_weights(3), _trained_weights(3), _trained_weights(4)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)


def test_accounting_continues_across_rounds_in_one_accountant() -> None:
    accountant = PrivacyAccountant("rdp")
    model = _model()
    for round_seed in (1, 2):
        private = private_training(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            _loader(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            seed=round_seed,
            accountant=accountant,
        )
        _train_one_epoch(*private)
        model = unwrap(private[0])
    steps, rate = local_steps(SAMPLES, BATCH, 1)
    assert accountant.history == (Step(1.0, rate, 2 * steps),)


def test_private_training_rejects_no_noise() -> None:
    model = _model()
    with pytest.raises(ValueError, match="noise_multiplier"):
        private_training(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            _loader(),
            noise_multiplier=0.0,
            max_grad_norm=1.0,
            seed=None,
            accountant=PrivacyAccountant("rdp"),
        )


def test_prepare_model_keeps_valid_models_and_fixes_a_copy_of_others() -> None:
    valid = _model()
    assert prepare_model(valid) is valid

    with_batchnorm = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten())
    fixed = prepare_model(with_batchnorm)
    assert fixed is not with_batchnorm
    assert ModuleValidator.is_valid(fixed)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fixed.modules())
    assert isinstance(with_batchnorm[1], nn.BatchNorm2d)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_models_need_no_fixing(name: str) -> None:
    # The coordinator builds its global model from the zoo without prepare_model; that only
    # matches the clients' weights because fixing is a no-op for every zoo model.
    model = build_model(name, input_shape=(1, 28, 28), num_classes=10)
    assert prepare_model(model) is model
