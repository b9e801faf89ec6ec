"""`fedkube run` with compression.downlink delta, as a user runs it: the same job sends
fewer bytes down than with the whole model each round (metrics.jsonl and summary.json
say so), and delta downloads work in async (FedBuff) mode and under secure aggregation
with distributed DP."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support import REPO, child_env, fedkube_command, write_job

pytestmark = pytest.mark.timeout(400)

JOB = {"model": "mlp", "data": {"dataset": "digits"}, "rounds": 4, "clientsPerRound": 3,
       "minClients": 2, "simulation": {"clients": 3}, "localEpochs": 1, "batchSize": 32,
       "learningRate": 0.05}


def _run(tmp_path: Path, name: str, **spec: object) -> tuple[dict, list[dict]]:
    job = write_job(tmp_path / f"{name}.yaml", name, **{**JOB, **spec})
    output = tmp_path / name
    result = subprocess.run(fedkube_command("run", str(job), "--output", str(output)),
                            capture_output=True, text=True, check=False, env=child_env(),
                            timeout=360, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert summary["phase"] == "Succeeded", summary
    return summary, records


def test_delta_downloads_send_fewer_bytes_than_the_whole_model(tmp_path: Path) -> None:
    summary, records = _run(tmp_path, "delta", compression={"downlink": "delta"})
    # Round 1 sends the whole model to each client, as every round of an fp32 run does
    # (the slow test below runs both); every later round sends deltas.
    whole_round = records[0]["round_bytes_down"]
    assert whole_round % records[0]["clients_selected"] == 0
    for later in records[1:]:
        assert 0 < later["round_bytes_down"] < 0.9 * whole_round
    assert summary["bytesDown"] < 0.95 * len(records) * whole_round
    assert sum(r["round_bytes_down"] for r in records) == summary["bytesDown"]


@pytest.mark.slow
def test_the_same_job_with_and_without_deltas(tmp_path: Path) -> None:
    whole, whole_records = _run(tmp_path, "whole")
    delta, delta_records = _run(tmp_path, "delta", compression={"downlink": "delta"})
    assert delta_records[0]["round_bytes_down"] == whole_records[0]["round_bytes_down"]
    for later, full in zip(delta_records[1:], whole_records[1:], strict=True):
        assert 0 < later["round_bytes_down"] < 0.9 * full["round_bytes_down"]
    assert delta["bytesDown"] < whole["bytesDown"]
    # The models trained on are bit-identical; only the order updates fold in may differ.
    assert abs(delta["finalAccuracy"] - whole["finalAccuracy"]) <= 0.02


@pytest.mark.slow
@pytest.mark.parametrize("name, spec", [
    ("async", {"strategy": {"name": "fedavg", "mode": "async", "bufferSize": 2},
               "rounds": 6}),
    ("secagg-dp", {"secureAggregation": {"enabled": True},
                   "privacy": {"mode": "central", "targetEpsilon": 50.0, "maxGradNorm": 1.0},
                   "compression": {"quantizeBits": 8, "downlink": "delta"}}),
])
def test_delta_downloads_in_async_mode_and_secure_rounds(tmp_path: Path, name: str,
                                                          spec: dict) -> None:
    compression = spec.pop("compression", {"downlink": "delta"})
    summary, records = _run(tmp_path, name, compression=compression, **spec)
    model_bytes = records[0]["round_bytes_down"] / max(1, records[0]["clients_selected"])
    assert summary["bytesDown"] > 0
    # Clients that held the previous version took a delta, not the whole model.
    assert min(r["round_bytes_down"] / max(1, r["clients_in"]) for r in records[1:]) \
        < 0.9 * model_bytes
