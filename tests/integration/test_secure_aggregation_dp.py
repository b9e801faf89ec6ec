"""Secure aggregation composed with differential privacy, as `fedkube run` runs it: the
coordinator in this process, the agents as real child processes over gRPC.

- central DP under secure aggregation is distributed noise: each client clips and adds its
  share before masking, and the coordinator accounts only for the noise that the
  guaranteed minimum of survivors (minClients) contributes;
- local DP-SGD composes as it is: each agent spends its own budget, the coordinator sees
  only masked inputs.
In both, the job ends Succeeded and the epsilon it reports never exceeds the target."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from fedkube.runtime.local import RunOptions, run_job
from fedkube.runtime.spec import load_job
from support import write_job

pytestmark = pytest.mark.timeout(420)

TARGET_EPSILON = 8.0


def _secure_job(path: Path, name: str, privacy: dict[str, Any]) -> Path:
    return write_job(path, name, model="mlp", data={"dataset": "digits", "partition": "iid"},
                     rounds=2, clientsPerRound=4, minClients=3, localEpochs=1, batchSize=32,
                     learningRate=0.1, roundTimeoutSeconds=90, simulation={"clients": 4},
                     secureAggregation={"enabled": True, "threshold": 0.6},
                     privacy={"targetEpsilon": TARGET_EPSILON, "delta": 1e-5,
                              "maxGradNorm": 1.0, **privacy})


def _run(job: Path, output: Path) -> dict[str, Any]:
    asyncio.run(run_job(load_job(job), RunOptions(output=output, quiet=True,
                                                  agent_processes=1)))
    return json.loads((output / "summary.json").read_text())


def _rounds(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["central", pytest.param("local", marks=pytest.mark.slow)])
def test_secure_aggregation_with_dp_reports_epsilon_within_target(tmp_path: Path,
                                                                   mode: str) -> None:
    output = tmp_path / "out"
    summary = _run(_secure_job(tmp_path / "job.yaml", f"secagg-{mode}-dp", {"mode": mode}),
                   output)
    assert summary["phase"] == "Succeeded", summary
    rounds = _rounds(output)
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["clients_in"] >= 3 for r in rounds)
    epsilon = summary["status"]["epsilon"]
    assert 0 < epsilon <= TARGET_EPSILON, summary["status"]
