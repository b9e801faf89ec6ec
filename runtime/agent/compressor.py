"""The agent's side of compression: encode each round's update as the plan says and keep
the error-feedback residual per job on the device, beside the privacy budget, so an agent
restarted mid-job carries on with what it had not yet sent.

The update is compressed after local DP-SGD (it is the model minus the global model the
round started from, already privatized): compression is post-processing and keeps the
guarantee, and the residual is a function of privatized updates only.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..compression import CompressedUpdate, CompressionConfig, compress_update
from ..compression.adaptive import choose
from ..files import replace_atomically
from ..plan import CompressionPlan

log = logging.getLogger("fedkube.agent")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def config_of(plan: CompressionPlan) -> CompressionConfig:
    return CompressionConfig(top_k=plan.top_k, bits=plan.quantize_bits,
                             error_feedback=plan.error_feedback,
                             lossless=plan.lossless)  # type: ignore[arg-type]


class ResidualStore:
    """One residual file per job under `root` (torch.save of a dict of tensors), written
    atomically; a file that cannot be read is set aside with a warning (a lost residual
    costs accuracy, never privacy or correctness)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, job: str) -> Path:
        readable = _UNSAFE.sub("_", job).lstrip(".")[:80] or "job"
        digest = hashlib.sha256(job.encode("utf-8")).hexdigest()[:16]
        return self.root / f"{readable}-{digest}.residual.pt"

    def load(self, job: str) -> dict[str, torch.Tensor] | None:
        path = self.path_for(job)
        if not path.exists():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(saved, dict) or saved.get("job") != job:
                raise ValueError("not this job's residual")
            residual = saved["residual"]
            if not all(isinstance(t, torch.Tensor) for t in residual.values()):
                raise ValueError("not a dict of tensors")
            return dict(residual)
        except Exception as error:  # noqa: BLE001 - any unreadable file is set aside
            log.warning("error-feedback residual %s unreadable (%s); starting from zero",
                        path, error)
            return None

    def save(self, job: str, residual: Mapping[str, torch.Tensor]) -> None:
        path = self.path_for(job)
        replace_atomically(path, lambda handle: torch.save(
            {"job": job, "residual": dict(residual)}, handle))


class UpdateCompressor:
    """Compresses one job's updates on one device; the residual lives in memory between
    rounds and on disk across restarts."""

    def __init__(self, store: ResidualStore, job: str) -> None:
        self.store = store
        self.job = job
        self._residual: dict[str, torch.Tensor] | None = None
        self._loaded = False
        # Fresh OS entropy: nobody who knows the job's seed can regenerate the rounding.
        self._rng = np.random.default_rng()

    def residual(self) -> dict[str, torch.Tensor] | None:
        if not self._loaded:
            self._residual, self._loaded = self.store.load(self.job), True
        return self._residual

    def setting(self, update: Mapping[str, torch.Tensor], plan: CompressionPlan, *,
                bytes_per_second: float) -> CompressionConfig:
        """The plan's setting, or under adaptive compression the one for this link."""
        config = config_of(plan)
        if plan.target_upload_seconds is None:
            return config
        sizes = [t.numel() for t in update.values() if t.dtype == torch.float32]
        return choose(config, sizes=sizes, bytes_per_second=bytes_per_second,
                      target_seconds=plan.target_upload_seconds)

    def compress(self, update: Mapping[str, torch.Tensor], config: CompressionConfig
                 ) -> CompressedUpdate:
        residual = self.residual() if config.error_feedback else None
        if residual is not None and any(
                name in update and residual[name].shape != update[name].shape
                for name in residual):
            log.warning("error-feedback residual does not fit the model; starting from zero")
            residual = None
        out = compress_update(update, config, residual=residual, generator=self._rng)
        if out.residual is not None:
            self._residual = out.residual
            self.store.save(self.job, out.residual)  # before the update leaves the device
        return out
