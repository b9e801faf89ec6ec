"""The model zoo: shapes, Opacus compatibility, determinism, and module:factory loading."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from fedkube.runtime.models import ZOO_NAMES, ModelError, build_model
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 16, 12)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_forward_gives_one_logit_per_class(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, input_shape=shape, num_classes=7)
    logits = model(torch.randn(5, *shape))
    assert logits.shape == (5, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_models_pass_opacus_validation_as_built(name: str) -> None:
    model = build_model(name, input_shape=(1, 8, 8), num_classes=10)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_per_sample_gradients_add_up_to_the_batch_gradient(name: str) -> None:
    # The real test of DP-SGD readiness: Opacus must produce a per-example gradient for
    # every parameter (depthwise convs and GroupNorm included), and they must be right.
    torch.manual_seed(0)
    model = GradSampleModule(
        build_model(name, input_shape=(1, 8, 8), num_classes=4), loss_reduction="sum"
    )
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,))
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    for param_name, param in model.named_parameters():
        assert param.grad_sample is not None, param_name
        assert param.grad_sample.shape == (6, *param.shape), param_name
        assert torch.allclose(param.grad_sample.sum(dim=0), param.grad, atol=1e-5), param_name


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_weights_are_a_function_of_the_seed_alone(name: str) -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        return build_model(name, input_shape=(1, 8, 8), num_classes=10, seed=seed).state_dict()

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = weights(3), weights(3), weights(4)
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG left alone
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].dim() > 1)


def test_zoo_models_are_small() -> None:
    # Edge devices download the model every round; keep the zoo in the tens of thousands
    # of parameters on digits, and under half a million on MNIST.
    for name in ZOO_NAMES:
        digits = build_model(name, input_shape=(1, 8, 8), num_classes=10)
        mnist = build_model(name, input_shape=(1, 28, 28), num_classes=10)
        assert sum(p.numel() for p in digits.parameters()) < 50_000, name
        assert sum(p.numel() for p in mnist.parameters()) < 500_000, name


@pytest.fixture
def user_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user's module of model factories, importable as `user_models_<n>`."""
    module = f"user_models_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny(*, input_shape, num_classes):
            c, h, w = input_shape
            return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))

        class Net(nn.Module):
            def __init__(self, *, input_shape, num_classes):
                super().__init__()
                self.head = nn.Linear(input_shape[0], num_classes)

            def forward(self, x):
                return self.head(x.mean(dim=(2, 3)))

        class Holder:
            @staticmethod
            def build(*, input_shape, num_classes):
                return tiny(input_shape=input_shape, num_classes=num_classes)

        def positional(shape, classes):
            return tiny(input_shape=shape, num_classes=classes)

        def not_a_module(*, input_shape, num_classes):
            return "a string"

        def broken(*, input_shape, num_classes):
            raise TypeError("bug inside the factory")

        NOT_CALLABLE = 5
    """))
    (tmp_path / f"{module}_broken.py").write_text("import does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return module


@pytest.mark.parametrize("factory", ["tiny", "Net", "Holder.build"])
def test_module_factory_is_imported_and_seeded(user_models: str, factory: str) -> None:
    name = f"{user_models}:{factory}"
    model = build_model(name, input_shape=(3, 4, 4), num_classes=5, seed=1)
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 5)
    again = build_model(name, input_shape=(3, 4, 4), num_classes=5, seed=1)
    assert all(torch.equal(a, b) for a, b in
               zip(model.state_dict().values(), again.state_dict().values(), strict=True))


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (":missing", "has no 'missing'"),
        (":NOT_CALLABLE", "'NOT_CALLABLE' is not callable"),
        (":not_a_module", "returned str, not a torch.nn.Module"),
        (":positional", "must accept keyword arguments input_shape and num_classes"),
        ("_broken:anything", "cannot import module .*ModuleNotFoundError.*does_not_exist"),
        (":", "expected `package.module:factory`"),
    ],
)
def test_module_factory_errors_name_the_model(
    user_models: str, factory: str, message: str
) -> None:
    name = f"{user_models}{factory}"
    with pytest.raises(ModelError, match=message) as caught:
        build_model(name, input_shape=(1, 8, 8), num_classes=10)
    assert repr(name) in str(caught.value)


def test_a_type_error_inside_a_working_factory_is_not_disguised(user_models: str) -> None:
    with pytest.raises(TypeError, match="bug inside the factory"):
        build_model(f"{user_models}:broken", input_shape=(1, 8, 8), num_classes=10)


def test_unimportable_module_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="cannot import module 'no_such_package.models'"):
        build_model("no_such_package.models:net", input_shape=(1, 8, 8), num_classes=10)


def test_unknown_zoo_name_lists_the_zoo() -> None:
    with pytest.raises(ModelError, match="unknown model 'resnet1000'.*mlp, cnn8, cnn28"):
        build_model("resnet1000", input_shape=(1, 8, 8), num_classes=10)


@pytest.mark.parametrize(
    ("shape", "classes", "message"),
    [((8, 8), 10, "input_shape must be"), ((1, 0, 8), 10, "input_shape must be"),
     ((1, 8, 8), 0, "num_classes must be")],
)
def test_bad_shapes_are_refused(shape: tuple, classes: int, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_model("mlp", input_shape=shape, num_classes=classes)


def test_tanh_cnn_is_papernots_network_on_mnist() -> None:
    # Papernot et al. 2021, Table 1: conv 16x8x8/2, pool, conv 32x4x4/2, pool, fc 32, fc 10.
    model = build_model("tanh-cnn", input_shape=(1, 28, 28), num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 26_010
    assert [type(m).__name__ for m in model.modules() if not list(m.children())] == [
        "Conv2d", "Tanh", "MaxPool2d", "Conv2d", "Tanh", "MaxPool2d", "Flatten",
        "Linear", "Tanh", "Linear"]
    assert model[1].in_features == 4 * 4 * 32


def test_tanh_cnn_names_the_smallest_input_it_takes() -> None:
    assert build_model("tanh-cnn", input_shape=(1, 4, 4), num_classes=3)(
        torch.randn(2, 1, 4, 4)).shape == (2, 3)
    with pytest.raises(ModelError, match="'tanh-cnn': input must be at least 4x4, got 3x8"):
        build_model("tanh-cnn", input_shape=(1, 3, 8), num_classes=10)
