"""The local training loop an agent runs each round, and the evaluation the coordinator
runs after each aggregation. Torch only: no files, no network.

Models wrapped by Opacus (``GradSampleModule``) are accepted wherever a model is: weights
are read and written through the wrapped module, so their names match the coordinator's
unwrapped global model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data._utils.collate import default_collate


class DeviceError(RuntimeError):
    """An explicitly requested device that this machine does not have."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: the update must not be sent."""


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What one call of `train_local` did.

    ``loss`` (mean cross-entropy, without the proximal term) and ``accuracy`` are over
    every example seen during training; ``steps`` counts optimizer steps; ``samples`` is
    the size of the local training set, FedAvg's n_k, by which the update is weighted.
    """

    loss: float
    accuracy: float
    steps: int
    samples: int


@dataclass(frozen=True, slots=True)
class EvalResult:
    loss: float
    accuracy: float
    samples: int


def pick_device(preferred: str | None = None) -> torch.device:
    """`preferred` ("cpu", "cuda", "cuda:1", "mps") if this machine has it, else
    DeviceError; with no preference (None or "auto"), the best there is: Apple's MPS,
    then CUDA, then the CPU."""
    if preferred is None or preferred == "auto":
        if torch.backends.mps.is_available():
            return torch.device("mps")
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(preferred)
    except RuntimeError as error:
        raise DeviceError(f"unknown device {preferred!r}: expected cpu, cuda[:N] or mps") from error
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {preferred!r} requested but CUDA is not available here")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {preferred!r} requested but only {count} CUDA device(s)")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            why = "this torch build lacks MPS" if not torch.backends.mps.is_built() else (
                "no Apple-silicon GPU is available")
            raise DeviceError(f"device {preferred!r} requested but {why}")
        return device
    raise DeviceError(f"unsupported device {preferred!r}: expected cpu, cuda[:N] or mps")


def make_optimizer(
    name: Literal["sgd", "adam"], params: Iterable[torch.Tensor], lr: float
) -> torch.optim.Optimizer:
    """A fresh client optimizer for one round.

    ``sgd`` is plain SGD without momentum, as in FedAvg (McMahan et al. 2017) and the
    FedProx analysis (Li et al. 2020): clients build a new optimizer every round, so
    momentum would restart from zero each round anyway and mostly adds client drift.
    ``adam`` is torch's Adam with default betas, its moments likewise reset each round.
    """
    if not lr > 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: expected sgd or adam")


class _TensorPairs(TorchDataset):
    """(x, y) held as two tensors. ``__getitems__`` lets the DataLoader fetch a whole
    batch with one fancy index instead of one Python call and a stack per example;
    ``__getitem__`` stays for samplers that take one index at a time."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        picked = torch.as_tensor(indices, dtype=torch.long)
        return self.x[picked], self.y[picked]


def _collate_batch(batch: object) -> object:
    """Pass a batch fetched by `__getitems__` through; collate anything else as torch
    would. Opacus' DPDataLoader wraps this function and keeps the dataset, so Poisson
    batches (empty ones included) take the fast path too."""
    if isinstance(batch, tuple) and len(batch) == 2 and all(torch.is_tensor(t) for t in batch):
        return batch
    return default_collate(batch)  # type: ignore[arg-type]


def _as_tensor(array: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A copy: the arrays may be the read-only, cached dataset, and the loader must not
    # alias memory its caller can change. Numpy converts first, so a float64 array never
    # becomes a float64 tensor (which MPS cannot hold) on the way to `dtype`.
    if torch.is_tensor(array):
        return array.detach().to("cpu", dtype=dtype, copy=True)
    numpy_dtype = torch.empty((), dtype=dtype).numpy().dtype
    return torch.from_numpy(np.array(array, dtype=numpy_dtype, copy=True))


def make_loader(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
) -> DataLoader:
    """Batches of (x float32, y int64) from memory, shuffled by `seed` each epoch."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)} labels")
    if len(y) == 0:
        raise ValueError("cannot train on an empty dataset")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    dataset = _TensorPairs(_as_tensor(x, torch.float32), _as_tensor(y, torch.long))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=_collate_batch,
    )


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Opacus' GradSampleModule (which keeps it as `_module`)."""
    inner = getattr(model, "_module", None)
    while isinstance(inner, nn.Module):
        model, inner = inner, getattr(inner, "_module", None)
    return model


def _anchors(
    model: nn.Module, global_weights: Mapping[str, torch.Tensor], device: torch.device
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    pairs = []
    for name, param in _unwrap(model).named_parameters():
        if not param.requires_grad:
            continue
        if name not in global_weights:
            raise ValueError(f"global_weights lacks parameter {name!r}")
        anchor = global_weights[name]
        if tuple(anchor.shape) != tuple(param.shape):
            raise ValueError(
                f"global weight {name!r} has shape {tuple(anchor.shape)}, "
                f"the model's has {tuple(param.shape)}"
            )
        pairs.append((param, anchor.detach().to(device=device, dtype=param.dtype)))
    return pairs


@torch.no_grad()
def _add_proximal_gradient(anchors: list[tuple[nn.Parameter, torch.Tensor]], mu: float) -> None:
    # d/dw of mu/2 * ||w - w_global||^2 is mu * (w - w_global).
    for param, anchor in anchors:
        pull = (param - anchor).mul_(mu)
        if param.grad is None:
            param.grad = pull
        else:
            param.grad.add_(pull)


def _step(
    optimizer: torch.optim.Optimizer,
    anchors: list[tuple[nn.Parameter, torch.Tensor]],
    mu: float,
) -> None:
    if not anchors:
        optimizer.step()
        return
    inner = getattr(optimizer, "original_optimizer", None)
    if inner is not None and hasattr(optimizer, "pre_step"):
        # Opacus' DPOptimizer: pre_step clips, noises and sets .grad from per-sample
        # gradients, replacing whatever backward left there. The proximal gradient does
        # not touch the data, so adding it after privatisation costs no privacy.
        if optimizer.pre_step():
            _add_proximal_gradient(anchors, mu)
            inner.step()
        return
    _add_proximal_gradient(anchors, mu)
    optimizer.step()


def train_local(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    device: torch.device,
    proximal_mu: float = 0.0,
    global_weights: Mapping[str, torch.Tensor] | None = None,
    max_steps: int | None = None,
) -> TrainResult:
    """Train `model` in place for `epochs` passes over `loader` with cross-entropy.

    With ``proximal_mu > 0`` each step also descends mu/2 * ||w - w_global||^2, FedProx's
    proximal term (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"),
    which keeps clients with skewed data near the global model. Its gradient is added to
    the (possibly privatised) data gradient rather than to the loss, so it works with
    Opacus' DP-SGD too. Raises TrainingDiverged when the loss becomes NaN or infinite.
    `max_steps` stops after that many optimizer steps (a slow device's smaller share of
    work, localWork: adaptive); None trains the epochs in full.
    """
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must not be negative, got {proximal_mu}")
    if proximal_mu > 0 and global_weights is None:
        raise ValueError("proximal_mu > 0 needs global_weights to pull towards")
    model.to(device)
    model.train()
    anchors = _anchors(model, global_weights, device) if proximal_mu > 0 else []
    # Summed on the device in float32 (MPS has no float64) and read once per epoch, since
    # .item() each step would stall a GPU; epochs add up on the host in double precision.
    loss_total = 0.0
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = steps = 0
    for epoch in range(epochs):
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        for xb, yb in loader:
            if max_steps is not None and steps >= max_steps:
                break
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            logits = model(xb)
            n = len(yb)
            # Poisson sampling (DP-SGD) can draw an empty batch; it still has to step so
            # the noise and the accounting stay as planned.
            loss = F.cross_entropy(logits, yb) if n else logits.sum() * 0.0
            loss.backward()
            _step(optimizer, anchors, proximal_mu)
            steps += 1
            if n:
                loss_sum += loss.detach().float() * n
                correct += (logits.detach().argmax(dim=1) == yb).sum()
                seen += n
        loss_total += loss_sum.item()
        if not math.isfinite(loss_total):
            raise TrainingDiverged(
                f"training loss is not finite in epoch {epoch + 1} after {steps} steps; "
                "lower the learning rate or clip gradients"
            )
    return TrainResult(
        loss=loss_total / seen if seen else 0.0,
        accuracy=correct.item() / seen if seen else 0.0,
        steps=steps,
        samples=len(loader.dataset),  # type: ignore[arg-type]
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 1024,
    device: torch.device,
) -> EvalResult:
    """Mean cross-entropy and accuracy of `model` on (x, y). Leaves the model's
    train/eval mode as it found it."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)} labels")
    if len(y) == 0:
        raise ValueError("nothing to evaluate: no examples")
    was_training = model.training
    model.to(device)
    model.eval()
    # float32 on the device (MPS has no float64); one batch's sum is small enough for it.
    batch_losses = []
    correct = torch.zeros((), dtype=torch.long, device=device)
    try:
        for start in range(0, len(y), batch_size):
            xb = _as_tensor(x[start:start + batch_size], torch.float32).to(device)
            yb = _as_tensor(y[start:start + batch_size], torch.long).to(device)
            logits = model(xb)
            batch_losses.append(F.cross_entropy(logits, yb, reduction="sum").float())
            correct += (logits.argmax(dim=1) == yb).sum()
    finally:
        model.train(was_training)
    # Read once, then added on the host in double precision.
    loss_sum = math.fsum(torch.stack(batch_losses).cpu().tolist())
    return EvalResult(
        loss=loss_sum / len(y), accuracy=correct.item() / len(y), samples=len(y)
    )


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the model's state_dict (parameters and buffers)."""
    return {
        name: value.detach().to("cpu", copy=True)
        for name, value in _unwrap(model).state_dict().items()
    }


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy `weights` into `model` (onto its device); the names and shapes must match
    the model's state_dict exactly. `weights` is left as it is."""
    target = _unwrap(model)
    own = target.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ValueError(
            "weights do not fit the model: "
            + "; ".join(
                part for part in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"unexpected {', '.join(unexpected)}" if unexpected else "",
                ) if part
            )
        )
    for name, value in own.items():
        if tuple(weights[name].shape) != tuple(value.shape):
            raise ValueError(
                f"weight {name!r} has shape {tuple(weights[name].shape)}, "
                f"the model's has {tuple(value.shape)}"
            )
    target.load_state_dict(dict(weights), strict=True)
