"""The device an agent trains on, and the one fallback it allows: an accelerator that
fails the first time it is used (an op MPS lacks, a CUDA driver that cannot start) is
given up for the CPU with one warning, instead of the agent dying on its first task."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from ..training import TrainingDiverged

log = logging.getLogger("fedkube.agent")

T = TypeVar("T")

CPU = torch.device("cpu")

# What a device that cannot run an op raises: torch's RuntimeError (and its
# NotImplementedError for ops a backend lacks), TypeError for dtypes it cannot hold.
DEVICE_FAILURES = (RuntimeError, NotImplementedError, TypeError)


class TrainingDevice:
    """Where training runs: the chosen device until its first use fails, then the CPU.

    Only the first use can fall back: once the accelerator has run a task, a later
    failure is a real error and is raised. Diverged training is the model's fault, not
    the device's, and is always raised.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._proven = device.type == "cpu"

    def run(self, work: Callable[[torch.device], T]) -> T:
        """``work(device)``; if that is the accelerator's first use and it fails,
        ``work(cpu)`` after one warning line. ``work`` must start from its inputs each
        time (load the global weights, build its optimizer), as an agent's round does."""
        if self._proven:
            return work(self.device)
        try:
            result = work(self.device)
        except TrainingDiverged:
            raise
        except DEVICE_FAILURES as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            log.warning("device %s failed at first use (%s: %s); training on the CPU "
                        "from now on", self.device, type(error).__name__, first_line)
            self.device = CPU
            self._proven = True
            return work(CPU)
        self._proven = True
        return result
