"""`fedkube run` with compressed updates, as a user runs it: real agent processes over
gRPC, top-k + 8-bit + error feedback on top of local DP-SGD; the run leaves the bytes it
saved in summary.json and metrics.jsonl, and each device's residual beside its budget."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support import REPO, child_env, fedkube_command, write_job

pytestmark = pytest.mark.timeout(400)


def _run(job: Path, output: Path) -> dict:
    result = subprocess.run(fedkube_command("run", str(job), "--output", str(output)),
                            capture_output=True, text=True, check=False, env=child_env(),
                            timeout=360, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((output / "summary.json").read_text())


def test_compressed_run_with_local_dp(tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.yaml", "compressed-dp", model="mlp",
                    data={"dataset": "digits"}, rounds=2, simulation={"clients": 2},
                    localEpochs=1, batchSize=32, learningRate=0.1,
                    privacy={"mode": "local", "targetEpsilon": 8.0},
                    compression={"topK": 0.1, "quantizeBits": 8, "errorFeedback": True,
                                 "lossless": "lz4"})
    summary = _run(job, tmp_path / "out")
    assert summary["phase"] == "Succeeded" and summary["rounds"] == 2
    assert 0 < summary["epsilon"] <= 8.0
    # top-10% at 8 bits: 5 bytes an entry sent for every 10 entries of 4 bytes, and less
    # after lz4; the small tensors that do not pay for it go raw.
    assert summary["compressionRatio"] < 0.2
    assert summary["status"]["compressionRatio"] < 0.2
    records = [json.loads(line) for line in
               (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["round_bytes_up"] > 0 and r["round_bytes_down"] > 0 for r in records)
    assert sum(r["round_bytes_up"] for r in records) == summary["bytesUp"]
    for client in summary["clients"].values():
        assert client["status"]["compression"] == "top10%+q8+lz4"
        assert client["status"]["uplinkBytesPerSecond"] > 0
    residuals = list((tmp_path / "out" / "agent-state" / "compression").rglob("*.residual.pt"))
    budgets = list((tmp_path / "out" / "agent-state" / "privacy").rglob("*.json"))
    assert len(residuals) == 2 and len(budgets) == 2
