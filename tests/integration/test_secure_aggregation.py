"""Secure aggregation over real gRPC: a coordinator process and agent processes on
127.0.0.1, one agent killed (SIGKILL, by its fault drill) just before each phase of the
protocol; the round still releases the sum of the others (or, when the agent dies after
its masked input, its update too) and the job trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import Processes, fedkube_command, free_port, write_job

pytestmark = pytest.mark.timeout(480)

AGENTS = 4


def _run(tmp_path: Path, processes: Processes, *, die_before: str) -> list[dict]:
    job = write_job(tmp_path / "job.yaml", "secagg-kill", model="mlp",
                    data={"dataset": "digits"}, rounds=2, clientsPerRound=AGENTS,
                    minClients=3, localEpochs=1, batchSize=16, learningRate=0.1,
                    simulation={"clients": AGENTS}, roundTimeoutSeconds=120,
                    secureAggregation={"enabled": True, "threshold": 0.6})
    output, port = tmp_path / "out", free_port()
    processes.start("coordinator", fedkube_command(
        "coordinator", "--job", str(job), "--host", "127.0.0.1", "--port", str(port),
        "--output", str(output), "--registration-timeout", "60"))
    for index in range(AGENTS):
        env = {"FEDKUBE_SECAGG_DIE_BEFORE": f"{die_before}:1"} if index == 0 else {}
        processes.start(f"agent-{index}", fedkube_command(
            "agent", "--coordinator", f"127.0.0.1:{port}", "--simulated-index", str(index),
            "--node-id", f"agent-{index}", "--device", "cpu",
            "--state-dir", str(tmp_path / "state"), "--give-up-after", "30"), **env)
    coordinator, victim = processes.children[0], processes.children[1]
    assert coordinator.wait(timeout=420) == 0, processes.log("coordinator")[-4000:]
    assert victim.wait(timeout=10) == -9  # the drill really killed it
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"]["phase"] == "Succeeded", processes.log("coordinator")[-4000:]
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("die_before", [
    "masked",
    pytest.param("advertise", marks=pytest.mark.slow),
    pytest.param("share", marks=pytest.mark.slow),
    pytest.param("unmask", marks=pytest.mark.slow),
])
def test_an_agent_killed_in_each_phase_is_recovered(
        tmp_path: Path, processes: Processes, die_before: str) -> None:
    rounds = _run(tmp_path, processes, die_before=die_before)
    assert [r["round"] for r in rounds] == [1, 2]
    # Killed after its masked input was in, an agent's update is part of the released sum.
    assert rounds[0]["clients_in"] == (AGENTS if die_before == "unmask" else AGENTS - 1)
    assert rounds[1]["clients_in"] == AGENTS - 1
    assert rounds[-1]["accuracy"] > 0.5  # ten classes: chance is 0.1
    log = processes.log("coordinator")
    assert "secure phase unmask closed" in log and "secure aggregation failed" not in log
