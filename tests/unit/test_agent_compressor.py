"""The agent's compressor: the error-feedback residual is kept per job on the device and
picked up again by a restarted agent; a foreign or corrupt file is set aside."""

from __future__ import annotations

from pathlib import Path

import torch
from fedkube.runtime.agent.compressor import ResidualStore, UpdateCompressor
from fedkube.runtime.compression import CompressionConfig, decode_update
from fedkube.runtime.plan import CompressionPlan

PLAN = CompressionPlan(top_k=0.1, quantize_bits=8, error_feedback=True)


def _update(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {"w": torch.randn(30, 20), "b": torch.randn(20)}


def test_residual_survives_a_restart_and_is_per_job(tmp_path: Path) -> None:
    store = ResidualStore(tmp_path / "compression" / "node-1")
    first = UpdateCompressor(store, "team/job-a")
    config = first.setting(_update(0), PLAN, bytes_per_second=0.0)
    assert config == CompressionConfig(top_k=0.1, bits=8, error_feedback=True)
    out = first.compress(_update(0), config)
    assert out.residual is not None and float(out.residual["w"].abs().sum()) > 0
    # A new agent process: the same residual comes back from disk and is added.
    again = UpdateCompressor(ResidualStore(store.root), "team/job-a")
    torch.testing.assert_close(again.residual()["w"], out.residual["w"])
    second = again.compress(_update(1), config)
    sent = decode_update(second.parts)
    torch.testing.assert_close(sent["w"] + second.residual["w"],
                               _update(1)["w"] + out.residual["w"])
    # Another job on the same device starts from nothing.
    assert UpdateCompressor(store, "team/job-b").residual() is None


def test_an_unreadable_residual_is_set_aside(tmp_path: Path) -> None:
    store = ResidualStore(tmp_path)
    store.path_for("job").parent.mkdir(parents=True, exist_ok=True)
    store.path_for("job").write_bytes(b"not a torch file")
    assert UpdateCompressor(store, "job").residual() is None
    store.save("other", {"w": torch.ones(2)})
    store.path_for("other").replace(store.path_for("job"))  # another job's file
    assert store.load("job") is None


def test_adaptive_setting_follows_the_measured_link(tmp_path: Path) -> None:
    plan = CompressionPlan(top_k=0.01, quantize_bits=8, error_feedback=True,
                           target_upload_seconds=1.0)
    compressor = UpdateCompressor(ResidualStore(tmp_path), "job")
    update = {"w": torch.randn(100_000)}
    assert compressor.setting(update, plan, bytes_per_second=0).describe() == "top1%+q8"
    assert compressor.setting(update, plan, bytes_per_second=1e9).describe() == "fp32"
    assert compressor.setting(update, plan, bytes_per_second=150_000).describe() == "q8"
