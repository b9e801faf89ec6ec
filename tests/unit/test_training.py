"""The local training loop: devices, optimizers, loaders, FedProx, evaluation, weights."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from fedkube.runtime.data import load_dataset
from fedkube.runtime.models import build_model
from fedkube.runtime.spec import DataSpec
from fedkube.runtime.training import (
    DeviceError,
    TrainingDiverged,
    evaluate,
    load_weights,
    make_loader,
    make_optimizer,
    pick_device,
    train_local,
    weights_of,
)
from opacus import PrivacyEngine
from torch import nn

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _toy(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian blobs on 1x2x2 inputs: linearly separable, learnt in a few steps."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, 1, 2, 2)) + (2 * y - 1)[:, None, None, None] * 1.5
    return x.astype(np.float32), y


def _linear(seed: int = 0) -> nn.Module:
    return build_model("mlp", input_shape=(1, 2, 2), num_classes=2, seed=seed)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in a))


# ------------------------------------------------------------------------ devices


def test_pick_device_cpu_and_auto() -> None:
    assert pick_device("cpu") == CPU
    auto = pick_device()
    assert auto == pick_device("auto")
    if not torch.backends.mps.is_available() and not torch.cuda.is_available():
        assert auto == CPU


def test_auto_prefers_mps_then_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device().type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device().type == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_explicit_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match="'cuda' requested but CUDA is not available"):
        pick_device("cuda")


def test_explicit_cuda_index_beyond_the_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="'cuda:3' requested but only 1 CUDA device"):
        pick_device("cuda:3")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_explicit_mps_without_mps_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match="'mps' requested but"):
        pick_device("mps")


@pytest.mark.parametrize("name", ["gpu0", "tpu"])
def test_unknown_devices_are_refused(name: str) -> None:
    with pytest.raises(DeviceError, match=repr(name)):
        pick_device(name)


# --------------------------------------------------------------------- optimizers


def test_sgd_is_plain_and_adam_is_adam() -> None:
    params = list(_linear().parameters())
    sgd = make_optimizer("sgd", params, 0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0
    assert sgd.defaults["lr"] == 0.1
    assert isinstance(make_optimizer("adam", params, 0.01), torch.optim.Adam)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        make_optimizer("rmsprop", params, 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="learning rate must be positive"):
        make_optimizer("sgd", params, 0.0)


# ------------------------------------------------------------------------- loader


def _order(loader: torch.utils.data.DataLoader) -> list[int]:
    return [int(v) for _, yb in loader for v in yb]


def test_loader_batches_cover_every_example_once_in_a_seeded_order() -> None:
    x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    y = np.arange(10)
    loader = make_loader(x, y, batch_size=4, seed=7)
    batches = list(loader)
    assert [len(yb) for _, yb in batches] == [4, 4, 2]
    for xb, yb in batches:
        assert xb.dtype == torch.float32 and yb.dtype == torch.long
        assert torch.equal(xb.flatten().long(), yb)  # pairs stay together
    first = [int(v) for _, yb in batches for v in yb]
    assert sorted(first) == list(range(10)) and first != list(range(10))
    second = _order(loader)
    assert sorted(second) == sorted(first) and second != first  # reshuffled each epoch
    assert _order(make_loader(x, y, batch_size=4, seed=7)) == first
    assert _order(make_loader(x, y, batch_size=4, seed=8)) != first
    assert _order(make_loader(x, y, batch_size=4, seed=7, shuffle=False)) == list(range(10))


def test_loader_copies_its_input_and_accepts_read_only_arrays() -> None:
    x, y = _toy(8)
    x.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it aliases a read-only array
        loader = make_loader(x, y, batch_size=8, seed=0, shuffle=False)
    y[:] = 5
    assert _order(loader) == [0, 1] * 4


def test_loader_refuses_mismatched_or_empty_data() -> None:
    with pytest.raises(ValueError, match="x has 3 examples but y has 2 labels"):
        make_loader(np.zeros((3, 1, 1, 1)), np.zeros(2), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="empty"):
        make_loader(np.zeros((0, 1, 1, 1)), np.zeros(0), batch_size=2, seed=0)


# ----------------------------------------------------------------------- training


def test_train_local_learns_and_counts_steps_and_samples() -> None:
    x, y = _toy(64)
    model = _linear()
    before = evaluate(model, x, y, device=CPU)
    result = train_local(
        model, make_loader(x, y, batch_size=10, seed=0),
        make_optimizer("sgd", model.parameters(), 0.1), epochs=3, device=CPU,
    )
    after = evaluate(model, x, y, device=CPU)
    assert result.steps == 3 * 7 and result.samples == 64
    assert after.loss < before.loss and after.accuracy > 0.95
    assert 0 < result.loss < before.loss and 0.5 < result.accuracy <= 1


def test_train_local_is_deterministic_given_seeds() -> None:
    x, y = _toy(40)

    def run() -> dict[str, torch.Tensor]:
        model = _linear(seed=3)
        train_local(model, make_loader(x, y, batch_size=8, seed=5),
                    make_optimizer("adam", model.parameters(), 0.01), epochs=2, device=CPU)
        return weights_of(model)

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_proximal_term_adds_mu_times_distance_to_the_gradient() -> None:
    # One plain-SGD step must be exactly w - lr * (grad_data(w) + mu * (w - w_global)).
    x, y = _toy(16)
    lr, mu = 0.1, 0.5
    model = _linear(seed=1)
    global_weights = weights_of(_linear(seed=2))
    start = weights_of(model)
    reference = _linear(seed=1)
    nn.functional.cross_entropy(reference(torch.tensor(x)), torch.tensor(y)).backward()
    train_local(
        model, make_loader(x, y, batch_size=16, seed=0),
        make_optimizer("sgd", model.parameters(), lr), epochs=1, device=CPU,
        proximal_mu=mu, global_weights=global_weights,
    )
    after = weights_of(model)
    for name, param in reference.named_parameters():
        expected = start[name] - lr * (param.grad + mu * (start[name] - global_weights[name]))
        assert torch.allclose(after[name], expected, atol=1e-6), name


def test_fedprox_pulls_local_weights_towards_the_global_model() -> None:
    x, y = _toy(64, seed=4)
    global_weights = weights_of(_linear(seed=0))

    def drift(mu: float) -> float:
        model = _linear(seed=0)
        train_local(
            model, make_loader(x, y, batch_size=8, seed=1),
            make_optimizer("sgd", model.parameters(), 0.2), epochs=5, device=CPU,
            proximal_mu=mu, global_weights=global_weights,
        )
        return _distance(weights_of(model), global_weights)

    free, mild, strong = drift(0.0), drift(0.5), drift(4.0)
    assert free > mild > strong > 0


def test_fedprox_needs_global_weights_that_fit() -> None:
    x, y = _toy(8)
    model = _linear()
    loader = make_loader(x, y, batch_size=8, seed=0)
    optimizer = make_optimizer("sgd", model.parameters(), 0.1)
    with pytest.raises(ValueError, match="needs global_weights"):
        train_local(model, loader, optimizer, epochs=1, device=CPU, proximal_mu=0.1)
    partial = dict(list(weights_of(model).items())[1:])
    with pytest.raises(ValueError, match="global_weights lacks parameter '1.weight'"):
        train_local(model, loader, optimizer, epochs=1, device=CPU, proximal_mu=0.1,
                    global_weights=partial)
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        train_local(model, loader, optimizer, epochs=0, device=CPU)


def _private(mu: float, global_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    x, y = _toy(32, seed=6)
    model = _linear(seed=0)
    engine = PrivacyEngine(accountant="rdp")
    private_model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=make_optimizer("sgd", model.parameters(), 0.2),
        data_loader=make_loader(x, y, batch_size=8, seed=0),
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(9),
    )
    loader.generator.manual_seed(3)  # the same Poisson batches for every mu
    result = train_local(private_model, loader, optimizer, epochs=3, device=CPU,
                         proximal_mu=mu, global_weights=global_weights)
    assert result.samples == 32 and result.steps == 3 * 4
    assert engine.accountant.history  # the accountant's step hook still ran
    weights = weights_of(private_model)
    assert set(weights) == set(global_weights)  # Opacus' `_module.` prefix is gone
    return weights


def test_fedprox_survives_opacus_dp_sgd() -> None:
    # DPOptimizer replaces .grad with the clipped, noised per-sample sum; the proximal
    # pull must still act, after privatisation, or FedProx silently turns into FedAvg.
    global_weights = weights_of(_linear(seed=0))
    free = _private(0.0, global_weights)
    pulled = _private(2.0, global_weights)
    assert _distance(pulled, global_weights) < _distance(free, global_weights)


def test_empty_poisson_batches_still_step() -> None:
    x, y = _toy(4)
    model = _linear()
    engine = PrivacyEngine(accountant="rdp")
    private_model, optimizer, loader = engine.make_private(
        module=model, optimizer=make_optimizer("sgd", model.parameters(), 0.1),
        data_loader=make_loader(x, y, batch_size=1, seed=0),
        noise_multiplier=1.0, max_grad_norm=1.0,
    )
    loader.generator.manual_seed(0)
    sizes = [len(yb) for _ in range(5) for _, yb in loader]
    assert 0 in sizes  # the seed draws at least one empty batch
    loader.generator.manual_seed(0)
    result = train_local(private_model, loader, optimizer, epochs=5, device=CPU)
    assert result.steps == 20 and math.isfinite(result.loss)


def test_a_non_finite_loss_raises_instead_of_returning_nan() -> None:
    # One corrupt example is enough to poison the weights; the update must not leave.
    x, y = _toy(16)
    x[5, 0, 1, 1] = np.inf
    model = _linear()
    with pytest.raises(TrainingDiverged, match="not finite in epoch 1"):
        train_local(model, make_loader(x, y, batch_size=8, seed=0),
                    make_optimizer("sgd", model.parameters(), 0.1), epochs=2, device=CPU)


# --------------------------------------------------------------------- evaluation


def test_evaluate_matches_a_direct_computation_and_keeps_the_mode() -> None:
    x, y = _toy(50, seed=2)
    model = _linear(seed=5)
    model.train()
    with torch.no_grad():
        logits = model(torch.tensor(x))
    expected_loss = float(nn.functional.cross_entropy(logits, torch.tensor(y)))
    expected_accuracy = float((logits.argmax(1) == torch.tensor(y)).float().mean())
    for batch_size in (7, 1024):
        result = evaluate(model, x, y, batch_size=batch_size, device=CPU)
        assert result.samples == 50
        assert result.loss == pytest.approx(expected_loss, rel=1e-5)
        assert result.accuracy == pytest.approx(expected_accuracy)
    assert model.training
    model.eval()
    evaluate(model, torch.tensor(x), torch.tensor(y), device=CPU)
    assert not model.training
    with pytest.raises(ValueError, match="no examples"):
        evaluate(model, x[:0], y[:0], device=CPU)


# ------------------------------------------------------------------------ weights


def test_weights_of_returns_detached_cpu_copies() -> None:
    model = _linear()
    weights = weights_of(model)
    assert set(weights) == set(model.state_dict())
    assert all(not w.requires_grad and w.device == CPU for w in weights.values())
    weights["1.weight"].zero_()
    assert model.state_dict()["1.weight"].abs().sum() > 0


def test_load_weights_round_trips_and_leaves_its_input_alone() -> None:
    source, target = _linear(seed=1), _linear(seed=2)
    weights = weights_of(source)
    kept = {k: v.clone() for k, v in weights.items()}
    load_weights(target, weights)
    assert all(torch.equal(target.state_dict()[k], weights[k]) for k in weights)
    x, y = _toy(8)
    train_local(target, make_loader(x, y, batch_size=4, seed=0),
                make_optimizer("sgd", target.parameters(), 0.5), epochs=1, device=CPU)
    assert all(torch.equal(weights[k], kept[k]) for k in weights)


def test_load_weights_names_what_does_not_fit() -> None:
    model = _linear()
    weights = weights_of(model)
    with pytest.raises(ValueError, match="missing 1.bias; unexpected extra"):
        load_weights(model, {**{k: v for k, v in weights.items() if k != "1.bias"},
                             "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"'1.weight' has shape \(3, 4\)"):
        load_weights(model, {**weights, "1.weight": torch.zeros(3, 4)})


# -------------------------------------------------------------------- end to end


def test_centralised_digits_training_reaches_ninety_percent() -> None:
    # The sanity check of the whole local stack (data, zoo model, loader, loop, eval):
    # if this fails, no federated run can succeed either.
    data = load_dataset(DataSpec(dataset="digits"), seed=0)
    model = build_model("cnn8", input_shape=data.input_shape, num_classes=data.num_classes)
    train_local(
        model, make_loader(data.x_train, data.y_train, batch_size=32, seed=0),
        make_optimizer("sgd", model.parameters(), 0.05), epochs=4, device=CPU,
    )
    assert evaluate(model, data.x_test, data.y_test, device=CPU).accuracy > 0.9
