"""The coordinator's checkpoint: everything a restarted coordinator needs to continue
the same job from the last completed round — model, round, server optimizer, RNGs,
accountant, history — written atomically after each round."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import wire
from ..spec import FederatedJobStatus

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"


@dataclass
class State:
    weights: dict[str, torch.Tensor]
    round: int
    version: int
    history: list[dict[str, Any]]
    best_accuracy: float | None
    rounds_without_improvement: int
    bytes_up: int
    bytes_down: int
    rng_state: Any
    noise_state: torch.Tensor
    server_optimizer: dict[str, Any]
    accountant: dict[str, Any] | None


def _atomic_save(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save(output_dir: Path, state: State) -> None:
    _atomic_save(asdict(state), output_dir / CHECKPOINT)


def load(output_dir: Path, *, schema: wire.Schema) -> State | None:
    """The saved state, or None when there is none. A checkpoint of another model
    (different tensors) is an error, not something to silently train over."""
    path = output_dir / CHECKPOINT
    if not path.exists():
        return None
    raw = torch.load(path, map_location="cpu", weights_only=False)
    found = wire.schema_of(raw["weights"])
    if found != schema:
        raise ValueError(f"{path} holds a different model than the job describes; "
                         "move it away to start the job afresh")
    raw["rng_state"] = _as_tuple(raw["rng_state"])
    return State(**raw)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def save_model(output_dir: Path, weights: dict[str, torch.Tensor]) -> Path:
    path = output_dir / MODEL
    _atomic_save(weights, path)
    return path


FINAL_STATUS = "final-status.json"


def save_final(output_dir: Path, status: FederatedJobStatus) -> None:
    """The job's terminal status, so that a coordinator restarted after the end (in a
    cluster, when a last status write timed out) reports it instead of running again."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / (FINAL_STATUS + ".tmp")
    tmp.write_text(status.model_dump_json(by_alias=True, exclude_none=True))
    os.replace(tmp, output_dir / FINAL_STATUS)


def load_final(output_dir: Path) -> FederatedJobStatus | None:
    path = output_dir / FINAL_STATUS
    if not path.exists():
        return None
    return FederatedJobStatus.model_validate_json(path.read_text())
