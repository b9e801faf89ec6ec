"""Attack drills for simulated clients (spec.simulation.attackers): what a Byzantine
client sends instead of its honest update. Pure functions on tensors; the trainer picks
one by the round's AttackPlan. A drill, for measuring a job's defences: never active
unless the manifest asks for it, and only in simulated clients.

- signflip: -strength x the honest update (a reversed gradient, scaled).
- scaling: strength x the honest update (a boosted update, as in model replacement).
- noise: Gaussian noise of std `strength` per coordinate instead of the update.
- labelflip: data poisoning; the client trains honestly on labels c -> C - 1 - c.
- lie: "A Little Is Enough" (Baruch et al., 2019): mean - z x std, coordinate-wise, of
  the colluders' honest updates; z small enough to sit inside the honest spread.
- ipm: inner-product manipulation (Xie et al., 2020, "Fall of Empires"): -epsilon x the
  mean of the colluders' honest updates, so the aggregate's inner product with the true
  gradient turns negative.

The colluding kinds (lie, ipm) need the honest updates of every attacker: simulated
attackers recompute them (each knows the others' partitions and seeds), so all send the
same vector, as colluders would.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

Weights = dict[str, Tensor]

KINDS = ("signflip", "scaling", "noise", "labelflip", "lie", "ipm")
COLLUDING = frozenset({"lie", "ipm"})

DEFAULT_STRENGTH: Mapping[str, float] = {
    "signflip": 5.0, "scaling": 50.0, "noise": 1.0, "labelflip": 1.0, "ipm": 0.5,
}
"""Each kind's strength when the manifest sets none (lie's comes from `lie_z`)."""


def lie_z(clients: int, attackers: int) -> float:
    """Baruch et al.'s z_max for n clients of which f attack: s = floor(n/2 + 1) - f
    honest clients must be won over, z = Phi^-1((n - s) / n). Small (0.3-1) for the
    populations of interest; at least 0.1 so the attack does something."""
    if clients < 1 or not 0 < attackers < clients:
        raise ValueError(f"lie needs 0 < attackers < clients, got {attackers} of {clients}")
    supporters = math.floor(clients / 2 + 1) - attackers
    share = (clients - supporters) / clients
    if share <= 0.5:
        return 0.1
    return max(0.1, statistics.NormalDist().inv_cdf(min(share, 1 - 1e-6)))


def strength_of(kind: str, strength: float | None, *, clients: int, attackers: int) -> float:
    """The strength an attack of `kind` uses: the plan's, or the kind's default."""
    if kind not in KINDS:
        raise ValueError(f"unknown attack kind {kind!r}; expected one of {', '.join(KINDS)}")
    if strength is not None:
        if not (math.isfinite(strength) and strength > 0):
            raise ValueError(f"attack strength must be a finite number > 0, got {strength!r}")
        return float(strength)
    if kind == "lie":
        return lie_z(clients, attackers)
    return DEFAULT_STRENGTH[kind]


def sign_flip(update: Mapping[str, Tensor], strength: float) -> Weights:
    """-strength x update."""
    return {name: tensor * -strength for name, tensor in update.items()}


def scaled(update: Mapping[str, Tensor], strength: float) -> Weights:
    """strength x update."""
    return {name: tensor * strength for name, tensor in update.items()}


def gaussian_noise(update: Mapping[str, Tensor], strength: float,
                   generator: torch.Generator) -> Weights:
    """N(0, strength^2) per coordinate, shaped like `update` (whose values are dropped)."""
    return {name: torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            .to(tensor.dtype) * strength for name, tensor in update.items()}


def flip_labels(labels: np.ndarray, num_classes: int, share: float,
                rng: np.random.Generator) -> np.ndarray:
    """A copy of `labels` with a `share` of them (all at 1.0) mapped c -> C - 1 - c."""
    if not 0 < share <= 1:
        raise ValueError(f"labelflip strength is the share of labels flipped, in (0, 1], "
                         f"got {share!r}")
    flipped = np.array(labels, copy=True)
    count = round(share * len(flipped))
    chosen = rng.choice(len(flipped), size=count, replace=False) if count < len(flipped) \
        else np.arange(len(flipped))
    flipped[chosen] = num_classes - 1 - flipped[chosen]
    return flipped


def _stacked(honest: Sequence[Mapping[str, Tensor]], name: str) -> Tensor:
    return torch.stack([update[name].to(torch.float64) for update in honest])


def little_is_enough(honest: Sequence[Mapping[str, Tensor]], z: float) -> Weights:
    """mean - z x std (population std), coordinate-wise over the colluders' honest
    updates (Baruch et al., 2019). One update alone: its mean, std 0."""
    if not honest:
        raise ValueError("lie needs at least one honest update to shape its own")
    out: Weights = {}
    for name, first in honest[0].items():
        stack = _stacked(honest, name)
        std = stack.std(dim=0, unbiased=False)
        out[name] = (stack.mean(dim=0) - z * std).to(first.dtype)
    return out


def inner_product_manipulation(honest: Sequence[Mapping[str, Tensor]],
                               epsilon: float) -> Weights:
    """-epsilon x the mean of the colluders' honest updates (Xie et al., 2020)."""
    if not honest:
        raise ValueError("ipm needs at least one honest update to shape its own")
    return {name: (_stacked(honest, name).mean(dim=0) * -epsilon).to(first.dtype)
            for name, first in honest[0].items()}


def poisoned(kind: str, strength: float, *, own: Mapping[str, Tensor],
             colluders: Sequence[Mapping[str, Tensor]], generator: torch.Generator) -> Weights:
    """What an attacker of `kind` sends, from its own honest update (`own`, trained on
    flipped labels for labelflip) and, for the colluding kinds, every attacker's."""
    if kind == "signflip":
        return sign_flip(own, strength)
    if kind == "scaling":
        return scaled(own, strength)
    if kind == "noise":
        return gaussian_noise(own, strength, generator)
    if kind == "labelflip":
        return dict(own)
    if kind == "lie":
        return little_is_enough(colluders, strength)
    if kind == "ipm":
        return inner_product_manipulation(colluders, strength)
    raise ValueError(f"unknown attack kind {kind!r}; expected one of {', '.join(KINDS)}")
