"""`examples/digits-secagg-8bit.yaml` as a user runs it: secure aggregation with 8-bit
quantization as its fixed-point step trains digits, and each masked input travels in 2
bytes per coordinate (an 11-bit ring for 8 clients' codes), half the float32 model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support import REPO, child_env, fedkube_command

pytestmark = pytest.mark.timeout(600)


def test_the_8bit_secure_aggregation_example_trains_and_halves_the_upload(tmp_path: Path) -> None:
    result = subprocess.run(
        fedkube_command("run", "examples/digits-secagg-8bit.yaml", "--output", str(tmp_path)),
        capture_output=True, text=True, check=False, env=child_env(), timeout=540, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["phase"] == "Succeeded"
    assert summary["finalAccuracy"] >= 0.85  # ten classes: chance is 0.1
    # Every client downloads the float32 model and uploads its masked 2-byte codes each
    # round: the upload is half the download (plus headers), where plain secure
    # aggregation (4 bytes per coordinate) would equal it.
    assert 0.45 * summary["bytesDown"] <= summary["bytesUp"] <= 0.55 * summary["bytesDown"]
