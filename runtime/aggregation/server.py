"""Server optimizers: how the coordinator applies a round's mean delta to the global model.

Reddi et al., 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2: the mean
client delta is treated as a pseudo-gradient. With Delta_t the mean delta:

    fedavg:  x_{t+1} = x_t + eta * Delta_t                 (eta = 1 is plain FedAvg)
    fedavgm: m_t = beta * m_{t-1} + Delta_t,  x_{t+1} = x_t + eta * m_t
    m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t
    fedadam: v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2
    fedyogi: v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)
    x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

FedAvgM is Hsu et al., 2019, "Measuring the Effects of Non-Identical Data Distribution
for Federated Visual Classification", section 3 (server momentum beta, m_0 = Delta_0).
As in the paper, m starts at 0 and v at tau^2, with no bias correction. Moments are kept
in at least float32 whatever the model's dtype, so float16 models do not lose them to
underflow. Non-floating tensors (counters such as BatchNorm's num_batches_tracked) are not
optimised: they take the mean delta as it is, rounded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from ._tensors import Layout, Weights, cast_back, check_matches, layout_of

ServerOptimizerName = Literal["fedavg", "fedavgm", "fedadam", "fedyogi"]

_STATE_KEYS = frozenset({"name", "steps", "first_moment", "second_moment"})


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """The server optimizer and its hyper-parameters (Reddi et al. 2021's eta, beta1,
    beta2, tau; the betas and tau only matter to fedadam and fedyogi; momentum is
    FedAvgM's beta, in (0, 1) for fedavgm and unused otherwise)."""

    name: ServerOptimizerName
    learning_rate: float
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in get_args(ServerOptimizerName):
            raise ValueError(
                f"unknown server optimizer {self.name!r}; "
                f"expected one of {', '.join(get_args(ServerOptimizerName))}"
            )
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        for field in ("beta1", "beta2"):
            value = getattr(self, field)
            if not 0 <= value < 1:
                raise ValueError(f"{field} must be in [0, 1), got {value!r}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau must be > 0, got {self.tau!r}")
        if self.name == "fedavgm" and not 0 < self.momentum < 1:
            raise ValueError(f"fedavgm needs momentum in (0, 1), got {self.momentum!r}")


class ServerOptimizer:
    """Applies mean deltas to the global model; owns the adaptive moments between rounds.

    `step` returns new weights and never modifies its arguments. The state is replaced
    only after a step has fully succeeded, so a rejected step leaves it untouched.
    """

    def __init__(self, config: ServerOptimizerConfig) -> None:
        self._config = config
        self._steps = 0
        self._first: Weights = {}
        self._second: Weights = {}

    @property
    def config(self) -> ServerOptimizerConfig:
        return self._config

    @property
    def steps(self) -> int:
        """How many steps were taken (across checkpoints)."""
        return self._steps

    def step(self, weights: Mapping[str, Tensor], mean_delta: Mapping[str, Tensor]) -> Weights:
        """The next global model from the current one and the round's mean delta.

        Raises ValueError naming the tensor when `mean_delta` does not match `weights`
        or the stored moments do not match the model.
        """
        layout = layout_of(weights)
        check_matches(layout, weights, what="weights")
        check_matches(layout, mean_delta, what="mean delta")
        name = self._config.name
        stateful = name != "fedavg"
        if stateful and (self._steps > 0 or self._first):
            self._check_moments(layout)
        new_weights: Weights = {}
        first: Weights = {}
        second: Weights = {}
        for meta in layout:
            weight = weights[meta.name].detach()
            delta = mean_delta[meta.name].detach().to(weight.device)
            if not meta.dtype.is_floating_point:
                new_weights[meta.name] = weight + cast_back(delta.to(torch.float64), meta.dtype)
                continue
            compute = torch.promote_types(meta.dtype, torch.float32)
            pseudo_gradient = delta.to(compute)
            if name == "fedavg":
                updated = weight.to(compute) + self._config.learning_rate * pseudo_gradient
            elif name == "fedavgm":
                m, _ = self._moments_for(meta.name, weight, compute)
                m = self._config.momentum * m + pseudo_gradient
                first[meta.name] = m
                updated = weight.to(compute) + self._config.learning_rate * m
            else:
                m, v = self._moments_for(meta.name, weight, compute)
                m, v = self._adaptive_moments(m, v, pseudo_gradient)
                first[meta.name], second[meta.name] = m, v
                direction = m / (torch.sqrt(v) + self._config.tau)
                updated = weight.to(compute) + self._config.learning_rate * direction
            new_weights[meta.name] = updated.to(meta.dtype)
        if stateful:
            self._first, self._second = first, second
        self._steps += 1
        return new_weights

    def state_dict(self) -> dict[str, Any]:
        """A copy of the optimizer state for a checkpoint."""
        return {
            "name": self._config.name,
            "steps": self._steps,
            "first_moment": {name: t.clone() for name, t in self._first.items()},
            "second_moment": {name: t.clone() for name, t in self._second.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict` (copied in); ValueError says precisely what is wrong."""
        keys = set(state)
        if keys != _STATE_KEYS:
            missing = sorted(_STATE_KEYS - keys)
            extra = sorted(keys - _STATE_KEYS)
            raise ValueError(
                f"server optimizer state: missing keys {missing}, unexpected keys {extra}"
            )
        if state["name"] != self._config.name:
            raise ValueError(
                f"server optimizer state is for {state['name']!r}, "
                f"but this optimizer is {self._config.name!r}"
            )
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"server optimizer state: steps must be an integer >= 0, got {steps!r}")
        first = _tensor_dict(state["first_moment"], "first_moment")
        second = _tensor_dict(state["second_moment"], "second_moment")
        if self._config.name == "fedavgm" and second:
            raise ValueError("server optimizer state: fedavgm keeps no second moment, but one was given")
        if self._config.name != "fedavgm" and list(first) != list(second):
            raise ValueError(
                "server optimizer state: first_moment and second_moment name different tensors"
            )
        for name, tensor in first.items():
            if name not in second:
                continue
            if tensor.shape != second[name].shape:
                raise ValueError(
                    f"server optimizer state: tensor {name!r} has first moment shape "
                    f"{tuple(tensor.shape)} but second moment shape {tuple(second[name].shape)}"
                )
        if self._config.name == "fedavg" and first:
            raise ValueError("server optimizer state: fedavg keeps no moments, but some were given")
        self._steps = steps
        self._first = {name: t.detach().clone() for name, t in first.items()}
        self._second = {name: t.detach().clone() for name, t in second.items()}

    def _check_moments(self, layout: Layout) -> None:
        floating = {meta.name: meta for meta in layout if meta.dtype.is_floating_point}
        for name in self._first:
            if name not in floating:
                raise ValueError(f"optimizer state has tensor {name!r}, which the model lacks")
        for name, meta in floating.items():
            if name not in self._first:
                raise ValueError(f"model tensor {name!r} has no optimizer state")
            if self._first[name].shape != meta.shape:
                raise ValueError(
                    f"model tensor {name!r} has shape {tuple(meta.shape)}, "
                    f"but its optimizer state has shape {tuple(self._first[name].shape)}"
                )

    def _moments_for(self, name: str, weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if name in self._first:
            first = self._first[name].to(device=weight.device, dtype=dtype)
            # fedavgm keeps a first moment only.
            second = self._second.get(name)
            return first, first if second is None else second.to(device=weight.device, dtype=dtype)
        # Reddi et al. initialise v_{-1} >= tau^2; exactly tau^2 keeps the first step's
        # denominator at the scale tau was chosen for.
        zeros = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        return zeros, torch.full_like(zeros, self._config.tau**2)

    def _adaptive_moments(self, m: Tensor, v: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        beta1, beta2 = self._config.beta1, self._config.beta2
        squared = g * g
        m = beta1 * m + (1 - beta1) * g
        if self._config.name == "fedadam":
            v = beta2 * v + (1 - beta2) * squared
        else:
            # Yogi (Zaheer et al., 2018) moves v additively towards g^2, so a burst of
            # large deltas cannot shrink the effective step size as fast as Adam's does.
            v = v - (1 - beta2) * squared * torch.sign(v - squared)
        return m, v


def _tensor_dict(value: Any, key: str) -> dict[str, Tensor]:
    if not isinstance(value, Mapping):
        raise TypeError(f"server optimizer state: {key} must be a mapping of tensors")
    for name, tensor in value.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f"server optimizer state: {key}[{name!r}] is {type(tensor).__name__}, not a tensor"
            )
    return dict(value)
