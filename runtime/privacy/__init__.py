"""Differential privacy for fedkube: privacy arithmetic (``analysis``), a persistent
cumulative accountant (``accountant``, ``store``), one budget facade (``budget``), DP-SGD on clients through Opacus
(``dpsgd``, local mode) and DP-FedAvg clipping and noise at the coordinator (``central``,
central mode)."""

from .accountant import PrivacyAccountant
from .analysis import (
    MECHANISMS,
    Mechanism,
    Step,
    calibrate_noise,
    central_noise_std,
    central_sample_rate,
    compose_epsilon,
    epsilon_for,
    local_steps,
    rdp_epsilon_floor,
    steps_within_budget,
)
from .budget import Budget, RoundMechanism
from .central import add_gaussian_noise, clip_update, update_norm
from .store import BudgetFileError, BudgetRecord, BudgetStore

__all__ = [
    "MECHANISMS",
    "Budget",
    "BudgetFileError",
    "BudgetRecord",
    "BudgetStore",
    "Mechanism",
    "PrivacyAccountant",
    "RoundMechanism",
    "Step",
    "add_gaussian_noise",
    "calibrate_noise",
    "central_noise_std",
    "central_sample_rate",
    "clip_update",
    "compose_epsilon",
    "epsilon_for",
    "local_steps",
    "prepare_model",
    "private_training",
    "rdp_epsilon_floor",
    "require_dp_compatible",
    "steps_within_budget",
    "unwrap",
    "update_norm",
]

_OPACUS_BACKED = {"prepare_model", "private_training", "require_dp_compatible", "unwrap"}


def __getattr__(name: str) -> object:
    # DP-SGD needs Opacus, whose import costs seconds (and configures logging): only the
    # code that trains privately pays for it.
    if name in _OPACUS_BACKED:
        from . import dpsgd

        return getattr(dpsgd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
