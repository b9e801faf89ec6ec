"""Server optimizers (Reddi et al., 2021) against the paper's update rules written out by
hand in plain Python floats."""

from __future__ import annotations

import math

import pytest
import torch
from fedkube.runtime.aggregation import ServerOptimizer, ServerOptimizerConfig

LR, BETA1, BETA2, TAU = 0.1, 0.9, 0.99, 1e-3
MOMENTUM = 0.7


def _adaptive_by_hand(
    name: str, weights: list[float], deltas: list[list[float]]
) -> list[list[float]]:
    """The model after each step, coordinate by coordinate, from the paper's formulas."""
    m = [0.0] * len(weights)
    v = [TAU**2] * len(weights)
    x = list(weights)
    trajectory = []
    for delta in deltas:
        for i, d in enumerate(delta):
            m[i] = BETA1 * m[i] + (1 - BETA1) * d
            if name == "fedadam":
                v[i] = BETA2 * v[i] + (1 - BETA2) * d * d
            else:
                v[i] = v[i] - (1 - BETA2) * d * d * math.copysign(1.0, v[i] - d * d) * (
                    v[i] != d * d
                )
            x[i] = x[i] + LR * m[i] / (math.sqrt(v[i]) + TAU)
        trajectory.append(list(x))
    return trajectory


def _optimizer(name: str) -> ServerOptimizer:
    return ServerOptimizer(ServerOptimizerConfig(name, LR, BETA1, BETA2, TAU, momentum=MOMENTUM))


def test_fedavg_step_is_w_plus_lr_delta() -> None:
    optimizer = ServerOptimizer(ServerOptimizerConfig("fedavg", learning_rate=0.5))
    weights = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(10)}
    delta = {"w": torch.tensor([0.4, -2.0]), "steps": torch.tensor(3)}
    new = optimizer.step(weights, delta)
    torch.testing.assert_close(new["w"], torch.tensor([1.2, 1.0]))
    assert new["steps"].item() == 13  # counters take the delta as is
    assert optimizer.steps == 1
    assert optimizer.state_dict()["first_moment"] == {}


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_one_and_two_steps_match_the_formulas(name: str) -> None:
    start = [1.0, -2.0, 0.0]
    # In the second step g^2 < v_{t-1} in the first coordinate (Yogi's v shrinks) and
    # g^2 > v_{t-1} in the others (v grows): both signs are exercised.
    deltas = [[0.5, -0.1, 0.0], [0.01, 0.02, -0.3]]
    optimizer = _optimizer(name)
    weights = {"w": torch.tensor(start, dtype=torch.float64)}
    expected = _adaptive_by_hand(name, start, deltas)
    for delta, after in zip(deltas, expected, strict=True):
        weights = optimizer.step(weights, {"w": torch.tensor(delta, dtype=torch.float64)})
        torch.testing.assert_close(weights["w"], torch.tensor(after, dtype=torch.float64))
    assert optimizer.steps == 2


def test_step_does_not_touch_its_inputs_and_returns_new_tensors() -> None:
    optimizer = _optimizer("fedadam")
    weights = {"w": torch.tensor([1.0, 2.0])}
    delta = {"w": torch.tensor([0.1, 0.2])}
    before_w, before_d = weights["w"].clone(), delta["w"].clone()
    new = optimizer.step(weights, delta)
    assert torch.equal(weights["w"], before_w)
    assert torch.equal(delta["w"], before_d)
    assert new["w"].data_ptr() != weights["w"].data_ptr()


def test_half_precision_model_keeps_float32_moments() -> None:
    optimizer = _optimizer("fedadam")
    new = optimizer.step({"w": torch.zeros(2, dtype=torch.float16)},
                         {"w": torch.tensor([1e-4, -1e-4], dtype=torch.float16)})
    assert new["w"].dtype == torch.float16
    state = optimizer.state_dict()
    assert state["second_moment"]["w"].dtype == torch.float32
    # (1 - beta2) * g^2 = 1e-10 underflows in float16 but not in float32.
    assert float(state["second_moment"]["w"][0]) > TAU**2 * BETA2


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedyogi"])
def test_state_dict_round_trip_continues_identically(name: str) -> None:
    generator = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(3, 2, generator=generator), "n": torch.tensor(4)}
    deltas = [{"a": 0.1 * torch.randn(3, 2, generator=generator), "n": torch.tensor(1)}
              for _ in range(3)]
    original = _optimizer(name)
    after_one = original.step(weights, deltas[0])
    saved = original.state_dict()
    restored = _optimizer(name)
    restored.load_state_dict(saved)
    assert restored.steps == 1
    # The checkpoint is a copy: scribbling on it changes neither optimizer.
    for moments in (saved["first_moment"], saved["second_moment"]):
        for tensor in moments.values():
            tensor.fill_(123.0)
    left, right = after_one, after_one
    for delta in deltas[1:]:
        left = original.step(left, delta)
        right = restored.step(right, delta)
        for key in left:
            assert torch.equal(left[key], right[key]), key


def test_fedavgm_matches_hsu_et_al_formula() -> None:
    """Hsu et al. 2019: m_t = beta * m_{t-1} + Delta_t, x_{t+1} = x_t + eta * m_t."""
    weights = [0.5, -1.0, 2.0]
    deltas = [[0.1, -0.2, 0.0], [0.3, 0.1, -0.5], [-0.2, 0.0, 0.4], [0.05, 0.05, 0.05]]
    m, x = [0.0] * 3, list(weights)
    optimizer = _optimizer("fedavgm")
    current = {"w": torch.tensor(weights, dtype=torch.float64)}
    for delta in deltas:
        m = [MOMENTUM * mi + di for mi, di in zip(m, delta, strict=True)]
        x = [xi + LR * mi for xi, mi in zip(x, m, strict=True)]
        current = optimizer.step(current, {"w": torch.tensor(delta, dtype=torch.float64)})
        torch.testing.assert_close(current["w"], torch.tensor(x, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert optimizer.steps == len(deltas)
    assert optimizer.state_dict()["second_moment"] == {}


def test_fedavgm_needs_a_momentum_and_keeps_no_second_moment() -> None:
    with pytest.raises(ValueError, match=r"fedavgm needs momentum in \(0, 1\)"):
        ServerOptimizerConfig("fedavgm", learning_rate=1.0)
    optimizer = _optimizer("fedavgm")
    optimizer.step({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    state = optimizer.state_dict()
    with pytest.raises(ValueError, match="fedavgm keeps no second moment"):
        _optimizer("fedavgm").load_state_dict(state | {"second_moment": {"w": torch.ones(2)}})


def test_load_state_dict_validates_precisely() -> None:
    adam = _optimizer("fedadam")
    adam.step({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    state = adam.state_dict()
    with pytest.raises(ValueError, match="state is for 'fedadam', but this optimizer is 'fedyogi'"):
        _optimizer("fedyogi").load_state_dict(state)
    with pytest.raises(ValueError, match=r"missing keys \['steps'\], unexpected keys \['t'\]"):
        _optimizer("fedadam").load_state_dict(
            {k: v for k, v in state.items() if k != "steps"} | {"t": 1}
        )
    with pytest.raises(ValueError, match="name different tensors"):
        _optimizer("fedadam").load_state_dict(state | {"second_moment": {}})
    with pytest.raises(ValueError, match="tensor 'w' has first moment shape"):
        _optimizer("fedadam").load_state_dict(state | {"second_moment": {"w": torch.ones(3)}})
    with pytest.raises(ValueError, match="steps must be"):
        _optimizer("fedadam").load_state_dict(state | {"steps": -1})
    with pytest.raises(ValueError, match="fedavg keeps no moments"):
        _optimizer("fedavg").load_state_dict(state | {"name": "fedavg"})
    with pytest.raises(TypeError, match=r"first_moment\['w'\] is list"):
        _optimizer("fedadam").load_state_dict(state | {"first_moment": {"w": [0.0, 0.0]}})


def test_mismatched_model_refused_and_state_kept() -> None:
    optimizer = _optimizer("fedyogi")
    weights = {"w": torch.zeros(2), "b": torch.zeros(1)}
    weights = optimizer.step(weights, {"w": torch.ones(2), "b": torch.ones(1)})
    before = optimizer.state_dict()
    with pytest.raises(ValueError, match=r"mean delta tensor 'b' has shape \(2,\)"):
        optimizer.step(weights, {"w": torch.ones(2), "b": torch.ones(2)})
    with pytest.raises(ValueError, match="model tensor 'c' has no optimizer state"):
        optimizer.step(weights | {"c": torch.zeros(1)}, {"w": torch.ones(2), "b": torch.ones(1),
                                                         "c": torch.ones(1)})
    with pytest.raises(ValueError, match="optimizer state has tensor 'b', which the model lacks"):
        optimizer.step({"w": weights["w"]}, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="mean delta tensor 'w' contains NaN"):
        optimizer.step(weights, {"w": torch.tensor([0.0, float("nan")]), "b": torch.ones(1)})
    after = optimizer.state_dict()
    assert after["steps"] == before["steps"] == 1
    for key in ("first_moment", "second_moment"):
        for name, tensor in before[key].items():
            assert torch.equal(after[key][name], tensor)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "fedadagrad", "learning_rate": 1.0}, "unknown server optimizer 'fedadagrad'"),
        ({"name": "fedavg", "learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"name": "fedadam", "learning_rate": 1.0, "beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
        ({"name": "fedadam", "learning_rate": 1.0, "beta2": -0.1}, r"beta2 must be in \[0, 1\)"),
        ({"name": "fedyogi", "learning_rate": 1.0, "tau": 0.0}, "tau must be > 0"),
    ],
)
def test_config_validated(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerOptimizerConfig(**kwargs)  # type: ignore[arg-type]
