"""The model zoo: small networks that train fast on a CPU and work with Opacus as built.

Zoo models normalise with GroupNorm or not at all, never with BatchNorm: BatchNorm mixes examples
of a batch, which per-sample gradients (DP-SGD) cannot allow, and its running
statistics would be averaged across clients with different data. Activations are not
in-place, which Opacus' backward hooks need. A model is a function of its name, input
shape, class count and seed, so the coordinator and every agent build the same one.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch
from torch import nn

ZOO_NAMES = ("mlp", "cnn8", "cnn28", "mobilenet-lite", "tanh-cnn")


class ModelError(ValueError):
    """A model name that is not in the zoo or a `module:factory` that cannot be used."""


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 channels a group up to 4 groups (Wu and He 2018 found the
    choice matters little), and always a divisor of `channels`."""
    for groups in (4, 2, 1):
        if channels % groups == 0 and channels // groups >= 4:
            return groups
    return 1


def _conv_block(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.GroupNorm(_groups(c_out), c_out),
        nn.ReLU(),
    )


def mlp(*, input_shape: tuple[int, int, int], num_classes: int, hidden: int = 128) -> nn.Module:
    """Two hidden layers on the flattened image; the baseline of McMahan et al. 2017
    ("2NN") at a width that suits 8x8 and 28x28 digits."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(c * h * w, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def cnn8(*, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Two 3x3 conv blocks and one pooling for tiny images (scikit-learn's 8x8 digits).

    Works for any input of at least 2x2: the pooled map is flattened at its real size.
    """
    c, h, w = input_shape
    return nn.Sequential(
        _conv_block(c, 16),
        _conv_block(16, 32),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (h // 2) * (w // 2), 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def cnn28(*, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The two-conv MNIST network of McMahan et al. 2017 ("CNN"), narrowed (16/32
    channels, 128 hidden) to train in seconds on a CPU; GroupNorm after each conv."""
    c, h, w = input_shape
    return nn.Sequential(
        _conv_block(c, 16, kernel=5),
        nn.MaxPool2d(2),
        _conv_block(16, 32, kernel=5),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (h // 4) * (w // 4), 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


class _SeparableBlock(nn.Module):
    """Depthwise 3x3 then pointwise 1x1, each followed by GroupNorm and ReLU (Howard et
    al. 2017, "MobileNets", Fig. 3 with BatchNorm swapped for GroupNorm)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.depthwise = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
            nn.GroupNorm(_groups(c_in), c_in),
            nn.ReLU(),
        )
        self.pointwise = _conv_block(c_in, c_out, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def mobilenet_lite(*, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A four-block MobileNet (Howard et al. 2017) for small images: a 3x3 stem, then
    depthwise-separable blocks 16→32→64→64→128 that halve the map twice, global
    average pooling and a linear classifier. Any input size of at least 1x1 works."""
    c, _, _ = input_shape
    return nn.Sequential(
        _conv_block(c, 16),
        _SeparableBlock(16, 32, stride=1),
        _SeparableBlock(32, 64, stride=2),
        _SeparableBlock(64, 64, stride=1),
        _SeparableBlock(64, 128, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def tanh_cnn(*, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The MNIST network of Papernot et al. 2021, "Tempered Sigmoid Activations for Deep
    Learning with Differential Privacy", Table 1: conv 16x8x8 stride 2, max-pool 2 stride
    1, conv 32x4x4 stride 2, max-pool 2 stride 1, linear 32, linear classes, all with tanh
    (26k parameters on 28x28). The zoo's choice for DP-SGD: bounded activations keep
    per-sample gradient norms small and steady, so clipping discards less than with ReLU,
    and with few parameters the isotropic DP noise drowns less of the signal. No
    normalisation layer: Opacus needs none.

    Exactly the paper's layers on 28x28; on smaller inputs (at least 4x4) the second conv
    is padded just enough for its pooling to have a 2x2 map.
    """
    channels, height, width = input_shape
    if min(height, width) < 4:
        raise ModelError(f"model 'tanh-cnn': input must be at least 4x4, got {height}x{width}")

    def after_first(size: int) -> int:  # conv 8 stride 2 padding 3, then pool 2 stride 1
        return (size + 6 - 8) // 2 + 1 - 1

    def padding(size: int) -> int:  # (size + 2p - 4) // 2 + 1 >= 2
        return max(0, -(-(6 - size) // 2))

    pad = (padding(after_first(height)), padding(after_first(width)))
    features = nn.Sequential(
        nn.Conv2d(channels, 16, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2, padding=pad), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Flatten())
    with torch.no_grad():  # the flattened size (4x4x32 for 28x28)
        flat = features(torch.zeros(1, channels, height, width)).shape[1]
    return nn.Sequential(features, nn.Linear(flat, 32), nn.Tanh(), nn.Linear(32, num_classes))


_ZOO: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn8": cnn8,
    "cnn28": cnn28,
    "mobilenet-lite": mobilenet_lite,
    "tanh-cnn": tanh_cnn,
}


def _import_factory(name: str) -> Callable[..., nn.Module]:
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise ModelError(f"model {name!r}: expected `package.module:factory`")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # an import can fail any way the user's code does
        raise ModelError(
            f"model {name!r}: cannot import module {module_name!r}: "
            f"{type(error).__name__}: {error}"
        ) from error
    factory = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelError(f"model {name!r}: module {module_name!r} has no {attribute!r}")
    if not callable(factory):
        raise ModelError(f"model {name!r}: {attribute!r} is not callable")
    return factory  # type: ignore[return-value]


def build_model(
    name: str, *, input_shape: tuple[int, int, int], num_classes: int, seed: int = 0
) -> nn.Module:
    """Build model `name` for inputs of shape (C, H, W) and `num_classes` outputs.

    `name` is a zoo name (see ZOO_NAMES) or `package.module:factory`, which is imported
    and called as ``factory(input_shape=..., num_classes=...)`` and must return an
    ``nn.Module``. Weights are initialised from `seed` alone, without touching the
    global torch random state, so equal arguments give equal weights everywhere.
    """
    input_shape = tuple(int(d) for d in input_shape)  # type: ignore[assignment]
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ModelError(f"model {name!r}: input_shape must be (C, H, W), got {input_shape}")
    if num_classes < 1:
        raise ModelError(f"model {name!r}: num_classes must be at least 1, got {num_classes}")
    if ":" in name:
        factory = _import_factory(name)
    elif name in _ZOO:
        factory = _ZOO[name]
    else:
        raise ModelError(
            f"unknown model {name!r}: expected one of {', '.join(ZOO_NAMES)} "
            "or `package.module:factory`"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = factory(input_shape=input_shape, num_classes=num_classes)
        except TypeError as error:
            if ":" in name and not _accepts_keywords(factory):
                raise ModelError(
                    f"model {name!r}: the factory must accept keyword arguments "
                    f"input_shape and num_classes ({error})"
                ) from error
            raise
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model {name!r}: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _accepts_keywords(factory: Callable[..., object]) -> bool:
    try:
        inspect.signature(factory).bind(input_shape=(1, 1, 1), num_classes=1)
    except (TypeError, ValueError):
        return False
    return True
