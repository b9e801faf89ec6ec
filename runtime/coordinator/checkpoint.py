"""The coordinator's checkpoint: everything a restarted coordinator needs to continue
the same job from the last completed round — model, round, server optimizer, RNGs,
accountant, history — written atomically after each round. A job that ended (Succeeded
or Failed) also records its final status, so a coordinator restarted afterwards reports
that outcome instead of training on.

`inspect` tells `fedkube run` what a folder holds before it builds anything, and `clear`
removes a previous run's files for `--fresh`."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import wire

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
# strategy.mode async: the partly filled FedBuff buffer, beside the checkpoint.
BUFFER = "fedbuff-buffer.pt"
# A run's files and folders in its output folder (report.py and local.py name the rest).
RUN_FILES = (CHECKPOINT, MODEL, BUFFER, "metrics.jsonl", "summary.json", "metrics.png")
RUN_FOLDERS = ("agents", "agent-state")
FINISHED_PHASES = ("Succeeded", "Failed")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this job; the message says why and what to do."""


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
    # The status (wire form) of a job that ended; None while it can still go on.
    final_status: dict[str, Any] | None = None
    # Per client (node id): suspicion and quarantine (coordinator/quarantine.py
    # `robustness_state`), so a restart neither forgets an attacker nor frees it early.
    # Checkpoints written before it lack the key: they load with no client state.
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.final_status is not None


@dataclass(frozen=True)
class FolderState:
    """What an output folder holds: nothing, an unfinished run or a finished one."""

    rounds_done: int | None  # None: no checkpoint
    final_phase: str | None = None
    final_message: str | None = None

    @property
    def empty(self) -> bool:
        return self.rounds_done is None

    @property
    def finished(self) -> bool:
        return self.final_phase is not None


def _atomic_save(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save(output_dir: Path, state: State) -> None:
    _atomic_save(asdict(state), output_dir / CHECKPOINT)


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 -- torch raises many kinds for a bad file
        raise CheckpointError(f"{path}: not a readable checkpoint ({error}); move it away "
                              "to start the job afresh") from None
    if not isinstance(raw, dict) or "weights" not in raw:
        raise CheckpointError(f"{path}: not a fedkube checkpoint; move it away to start the "
                              "job afresh")
    return raw


def load(output_dir: Path, *, schema: wire.Schema) -> State | None:
    """The saved state, or None when there is none. A checkpoint of another model
    (different tensors) is an error, not something to silently train over."""
    path = output_dir / CHECKPOINT
    if not path.exists():
        return None
    raw = _read(path)
    found = wire.schema_of(raw["weights"])
    if found != schema:
        raise CheckpointError(f"{path}: {_schema_difference(found, schema)}: the checkpoint "
                              "holds a different model than spec.model builds; start afresh "
                              "(fedkube run --fresh) or use another output folder")
    raw["rng_state"] = _as_tuple(raw["rng_state"])
    known = State.__dataclass_fields__
    return State(**{k: v for k, v in raw.items() if k in known})


def _schema_difference(found: wire.Schema, expected: wire.Schema) -> str:
    """The first difference, named: what a user needs to recognise the other model."""
    for name in sorted(set(found) | set(expected)):
        if name not in found:
            return f"tensor {name!r} is missing"
        if name not in expected:
            return f"tensor {name!r} is not in the job's model"
        if found[name] != expected[name]:
            return (f"tensor {name!r} is {list(found[name].shape)} {found[name].dtype}, the "
                    f"job's model has {list(expected[name].shape)} {expected[name].dtype}")
    return "the tensors differ"


def inspect(output_dir: Path) -> FolderState:
    """What `output_dir` holds, read from its checkpoint alone."""
    path = output_dir / CHECKPOINT
    if not path.exists():
        return FolderState(rounds_done=None)
    raw = _read(path)
    final = raw.get("final_status")
    if final is not None:
        return FolderState(rounds_done=int(raw["round"]), final_phase=final.get("phase"),
                           final_message=final.get("message"))
    return FolderState(rounds_done=int(raw["round"]))


def clear(output_dir: Path) -> None:
    """Remove a previous run's files (and only those) so the folder starts over."""
    for name in RUN_FILES:
        (output_dir / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(output_dir / name, ignore_errors=True)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def save_buffer(output_dir: Path, *, version: int, buffer: dict[str, Any]) -> None:
    """The FedBuff buffer being filled on model `version` (its running sum, O(model)),
    written atomically after each update folded into it: a restarted coordinator keeps
    the updates of a server step not yet taken instead of asking for them again."""
    _atomic_save({"version": version, "buffer": buffer}, output_dir / BUFFER)


def load_buffer(output_dir: Path, *, version: int) -> dict[str, Any] | None:
    """The saved buffer if it was being filled on model `version` (the checkpoint's);
    None when there is none or it belongs to an earlier step (already taken)."""
    path = output_dir / BUFFER
    if not path.exists():
        return None
    raw = _read_plain(path)
    if raw.get("version") != version:
        return None
    buffer = raw.get("buffer")
    if not isinstance(buffer, dict):
        raise CheckpointError(f"{path}: not a fedkube FedBuff buffer; move it away to drop "
                              "the partly filled buffer")
    return buffer


def _read_plain(path: Path) -> dict[str, Any]:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- torch raises many kinds for a bad file
        raise CheckpointError(f"{path}: not readable ({error}); move it away to drop the "
                              "partly filled buffer") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a fedkube FedBuff buffer; move it away")
    return raw


def save_model(output_dir: Path, weights: dict[str, torch.Tensor]) -> Path:
    path = output_dir / MODEL
    _atomic_save(weights, path)
    return path
