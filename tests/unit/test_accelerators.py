"""What an accelerator needs from the training path, proven on the CPU: no float64 tensor
anywhere in local training, DP-SGD and evaluation (MPS has none), DP-incompatible models
refused before training, and an agent that gives up a failing accelerator for the CPU.
Tests marked `gpu` train on the real device where one is present."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from fedkube.runtime.agent.device import TrainingDevice
from fedkube.runtime.agent.trainer import LocalTrainer
from fedkube.runtime.messages import JobIdentity
from fedkube.runtime.models import ZOO_NAMES, build_model
from fedkube.runtime.plan import TrainPlan, plan_for
from fedkube.runtime.privacy import PrivacyAccountant, private_training, require_dp_compatible
from fedkube.runtime.privacy.dpsgd import unwrap
from fedkube.runtime.spec import FederatedJobSpec
from fedkube.runtime.training import (
    TrainingDiverged,
    evaluate,
    make_loader,
    make_optimizer,
    pick_device,
    train_local,
    weights_of,
)
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class Float64Forbidden(TorchDispatchMode):
    """Fails any tensor op that takes, makes or is asked to make a float64 tensor, as the
    MPS backend would. Counts the ops it saw, so a test can tell it was really active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        self._check(func, (args, kwargs), "an argument")
        result = func(*args, **kwargs)
        self._check(func, result, "its result")
        self.ops += 1
        return result

    @staticmethod
    def _check(func: object, values: object, where: str) -> None:
        for leaf in pytree.tree_leaves(values):
            if (isinstance(leaf, torch.Tensor) and leaf.dtype == torch.float64) or (
                    leaf is torch.float64):
                raise AssertionError(f"{func} has a float64 tensor in {where}")


def _digits_like(n: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Float64 numpy inputs, as a user's .npz often holds: the path must convert them."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    x = rng.normal(size=(n, 1, 8, 8)) + y[:, None, None, None]
    return x, y


def test_the_guard_fails_a_float64_op() -> None:
    with pytest.raises(AssertionError, match="float64"), Float64Forbidden():
        torch.zeros(3).double()


@pytest.mark.parametrize("proximal_mu", [0.0, 0.1])
def test_local_training_and_evaluation_use_no_float64(proximal_mu: float) -> None:
    x, y = _digits_like()
    model = build_model("cnn8", input_shape=(1, 8, 8), num_classes=4, seed=0)
    global_weights = weights_of(model)
    guard = Float64Forbidden()
    with guard:
        loader = make_loader(x, y, batch_size=16, seed=0)
        optimizer = make_optimizer("adam", model.parameters(), 0.01)
        trained = train_local(model, loader, optimizer, epochs=2, device=CPU,
                              proximal_mu=proximal_mu, global_weights=global_weights)
        evaluated = evaluate(model, x, y, batch_size=40, device=CPU)
    assert guard.ops > 100
    assert trained.steps == 12 and trained.samples == 96
    assert 0 < trained.loss and 0 <= trained.accuracy <= 1
    assert 0 < evaluated.loss and evaluated.samples == 96


def test_dp_sgd_uses_no_float64() -> None:
    x, y = _digits_like()
    model = build_model("cnn8", input_shape=(1, 8, 8), num_classes=4, seed=0)
    accountant = PrivacyAccountant(mechanism="rdp")
    guard = Float64Forbidden()
    with guard:
        loader = make_loader(x, y, batch_size=16, seed=0)
        optimizer = make_optimizer("sgd", model.parameters(), 0.1)
        dp_model, dp_optimizer, dp_loader = private_training(
            model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0, seed=3,
            accountant=accountant, device=CPU)
        trained = train_local(dp_model, dp_loader, dp_optimizer, epochs=1, device=CPU)
        evaluated = evaluate(unwrap(dp_model), x, y, device=CPU)
    assert guard.ops > 100
    assert trained.steps == 6 and accountant.history
    assert evaluated.samples == 96


def test_evaluation_sums_batches_precisely() -> None:
    # Per-batch float32 sums added on the host: the mean matches one big float64 sum.
    x, y = _digits_like(n=1000)
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=4, seed=0)
    small = evaluate(model, x, y, batch_size=7, device=CPU)
    whole = evaluate(model, x, y, batch_size=1000, device=CPU)
    assert small.loss == pytest.approx(whole.loss, rel=1e-5)
    assert small.accuracy == whole.accuracy


# ----------------------------------------------------------------- DP compatibility


def batchnorm_model(*, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A user's model factory (`module:factory`) whose model DP-SGD cannot train."""
    channels, height, width = input_shape
    return nn.Sequential(nn.Conv2d(channels, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * (height - 2) * (width - 2), num_classes))


def test_batchnorm_models_are_refused_for_dp_with_what_to_do() -> None:
    model = batchnorm_model(input_shape=(1, 8, 8), num_classes=4)
    with pytest.raises(ValueError, match=r"model 'mine:net' cannot be trained with "
                       r"privacy.mode 'local'.*BatchNorm.*GroupNorm.*prepare_model"):
        require_dp_compatible(model, name="mine:net")


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_models_are_dp_compatible(name: str) -> None:
    require_dp_compatible(build_model(name, input_shape=(1, 28, 28), num_classes=10),
                          name=name)


def _spec(model: str, privacy: dict[str, object] | None = None) -> FederatedJobSpec:
    return FederatedJobSpec.model_validate({
        "model": model, "data": {"dataset": "digits"}, "rounds": 2, "clientsPerRound": 1,
        "batchSize": 16, "simulation": {"clients": 2},
        **({"privacy": privacy} if privacy else {}),
    })


def _trainer(spec: FederatedJobSpec, device: torch.device, state_dir: Path) -> LocalTrainer:
    identity = JobIdentity(job_name="j", model=spec.model, data=spec.data, seed=spec.seed,
                           num_simulated_clients=2, input_shape=(1, 8, 8), num_classes=10)
    return LocalTrainer.create(job=identity, node_id="n0", device=device, simulated_index=0,
                               data_path=None, state_dir=state_dir)


def _plan(spec: FederatedJobSpec) -> TrainPlan:
    return plan_for(spec.model_copy(update={"learning_rate": 0.1}), round=1, model_version=0,
                    now=0.0, client_parameters={})


def test_an_agent_refuses_a_batchnorm_model_under_local_dp_before_training(
        tmp_path: Path) -> None:
    spec = _spec(f"{__name__}:batchnorm_model",
                 {"mode": "local", "targetEpsilon": 5.0, "delta": 1e-5})
    trainer = _trainer(spec, CPU, tmp_path)
    with pytest.raises(ValueError, match="cannot be trained with privacy.mode 'local'"):
        trainer.refusal(_plan(spec))  # the first plan under local DP, before any step
    # Without DP the same model is fine.
    plain = _spec(f"{__name__}:batchnorm_model")
    _trainer(plain, CPU, tmp_path).train(_plan(plain), weights_of(trainer.model))


# ------------------------------------------------------------------ CPU fallback


def _train_fresh(device: torch.device) -> float:
    """One round's work as the agent does it: from the same inputs on whichever device."""
    x, y = _digits_like(n=32)
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=4, seed=0)
    optimizer = make_optimizer("sgd", model.parameters(), 0.1)
    return train_local(model, make_loader(x, y, batch_size=8, seed=0), optimizer,
                       epochs=1, device=device).loss


def test_an_accelerator_failing_at_first_use_falls_back_to_cpu_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    # The meta device accepts the model and the data but cannot hand back a number: a
    # real failure at first use, as an op MPS lacks would be.
    device = TrainingDevice(torch.device("meta"))
    with caplog.at_level(logging.WARNING, logger="fedkube.agent"):
        first = device.run(_train_fresh)
        second = device.run(_train_fresh)
    assert device.device == CPU
    assert first == second == _train_fresh(CPU)
    warnings = [r.getMessage() for r in caplog.records if r.name == "fedkube.agent"]
    assert len(warnings) == 1
    assert warnings[0].startswith("device meta failed at first use (RuntimeError: ")
    assert warnings[0].endswith("training on the CPU from now on")


def test_an_accelerator_that_worked_once_is_not_given_up() -> None:
    device = TrainingDevice(torch.device("meta"))
    device.run(lambda d: torch.ones(2, device=d).sum())
    with pytest.raises(RuntimeError, match="meta"):
        device.run(_train_fresh)
    assert device.device.type == "meta"


def test_an_agent_under_dp_falls_back_and_still_accounts(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    spec = _spec("mlp", {"mode": "local", "targetEpsilon": 50.0, "delta": 1e-5})
    trainer = _trainer(spec, torch.device("meta"), tmp_path)
    global_weights = weights_of(trainer.model)
    with caplog.at_level(logging.WARNING, logger="fedkube.agent"):
        outcome = trainer.train(_plan(spec), global_weights)
    assert trainer.device.device == CPU
    assert outcome.num_samples == trainer.num_samples and outcome.epsilon > 0
    assert sum("failed at first use" in r.getMessage() for r in caplog.records) == 1


# ------------------------------------------------------------- on a real accelerator


@pytest.mark.gpu
def test_training_dp_and_evaluation_on_the_accelerator() -> None:
    device = pick_device()
    x, y = _digits_like()
    model = build_model("cnn8", input_shape=(1, 8, 8), num_classes=4, seed=0)
    before = evaluate(model, x, y, device=device)
    trained = train_local(model, make_loader(x, y, batch_size=16, seed=0),
                          make_optimizer("adam", model.parameters(), 0.01), epochs=5,
                          device=device)
    after = evaluate(model, x, y, device=device)
    assert next(model.parameters()).device.type == device.type
    assert trained.steps == 30 and after.accuracy > before.accuracy

    dp_model = build_model("cnn8", input_shape=(1, 8, 8), num_classes=4, seed=0)
    accountant = PrivacyAccountant(mechanism="rdp")
    private, optimizer, loader = private_training(
        dp_model, make_optimizer("sgd", dp_model.parameters(), 0.1),
        make_loader(x, y, batch_size=16, seed=0), noise_multiplier=1.0, max_grad_norm=1.0,
        seed=1, accountant=accountant, device=device)
    dp_trained = train_local(private, loader, optimizer, epochs=1, device=device)
    assert dp_trained.steps == 6 and len(accountant.history) == 1
    assert all(t.device.type == "cpu" for t in weights_of(unwrap(private)).values())


@pytest.mark.gpu
def test_an_agent_trains_on_the_accelerator_without_falling_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    device = pick_device()
    for privacy in (None, {"mode": "local", "targetEpsilon": 50.0, "delta": 1e-5}):
        spec = _spec("cnn8", privacy)
        trainer = _trainer(spec, device, tmp_path / str(bool(privacy)))
        with caplog.at_level(logging.WARNING, logger="fedkube.agent"):
            outcome = trainer.train(_plan(spec), weights_of(trainer.model))
        assert trainer.device.device.type == device.type
        assert not [r for r in caplog.records if "failed at first use" in r.getMessage()]
        assert outcome.metrics["steps"] > 0


@pytest.mark.gpu
def test_divergence_on_the_accelerator_is_raised_not_blamed_on_the_device() -> None:
    device = TrainingDevice(pick_device())
    x, y = _digits_like(n=32)
    x[0, 0, 0, 0] = np.inf

    def diverge(on: torch.device) -> object:
        model = build_model("mlp", input_shape=(1, 8, 8), num_classes=4, seed=0)
        return train_local(model, make_loader(x, y, batch_size=8, seed=0),
                           make_optimizer("sgd", model.parameters(), 0.1), epochs=1, device=on)

    with pytest.raises(TrainingDiverged):
        device.run(diverge)
    assert device.device.type != "cpu"
