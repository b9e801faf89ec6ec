"""strategy.mode async (FedBuff) over real gRPC: a real coordinator process and real
agent processes, one of them slow (the speed drill), one killed mid-job, and the
coordinator itself killed and restarted from its checkpoint."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from support import Processes, fedkube_command, free_port, write_job

pytestmark = pytest.mark.timeout(600)


def _steps(output: Path) -> list[dict]:
    path = output / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait(predicate, *, what: str, processes: Processes, name: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{processes.log(name)[-4000:]}")
        time.sleep(0.2)  # polling interval, not a wait for anything to happen


def _coordinator(processes: Processes, name: str, job: Path, output: Path, port: int, *,
                 registration_timeout: int):
    return processes.start(name, fedkube_command(
        "coordinator", "--job", str(job), "--host", "127.0.0.1", "--port", str(port),
        "--output", str(output), "--registration-timeout", str(registration_timeout)))


def test_async_job_with_slow_and_dying_agents_survives_a_coordinator_restart(
        tmp_path: Path, processes: Processes) -> None:
    job = write_job(tmp_path / "job.yaml", "grpc-async", model="mlp",
                    data={"dataset": "digits"}, rounds=8, clientsPerRound=3, minClients=1,
                    localEpochs=1, batchSize=16, learningRate=0.1, roundTimeoutSeconds=60,
                    strategy={"name": "fedavg", "mode": "async", "bufferSize": 2,
                              "maxStaleness": 6},
                    simulation={"clients": 4, "speed": {"slowFraction": 0.25, "slowdown": 4}})
    output, port = tmp_path / "out", free_port()
    # Agent processes take minutes to start on a loaded machine: wait for all four.
    first = _coordinator(processes, "coordinator", job, output, port, registration_timeout=300)
    # Two agent processes (this machine is shared): three agents in one, among them the
    # slow one (index 0 under this seed), and one alone, to be killed.
    agents = [processes.start(f"agents-{n}", fedkube_command(
        "agent", "--coordinator", f"127.0.0.1:{port}", *indexes, "--device", "cpu",
        "--state-dir", str(tmp_path / "state"), "--give-up-after", "300"))
        for n, indexes in enumerate([("--simulated-index", "0", "--simulated-index", "2",
                                      "--simulated-index", "3"), ("--simulated-index", "1")])]

    _wait(lambda: len(_steps(output)) >= 2, what="two server steps", processes=processes,
          name="coordinator")
    agents[1].send_signal(signal.SIGKILL)  # a device dies mid-job
    _wait(lambda: len(_steps(output)) >= 4, what="four server steps", processes=processes,
          name="coordinator")
    survivors = agents[:1]
    for agent in survivors:  # no step can close while the coordinator is replaced
        agent.send_signal(signal.SIGSTOP)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    done_before = len(_steps(output))
    for agent in survivors:
        agent.send_signal(signal.SIGCONT)
    # The dead agent never comes back: the successor starts with whoever is there (an
    # asynchronous job takes up clients as they come).
    restarted = _coordinator(processes, "coordinator-restarted", job, output, port,
                             registration_timeout=5)
    assert restarted.wait(timeout=400) == 0, processes.log("coordinator-restarted")[-4000:]

    steps = _steps(output)
    # Every server step exactly once: the restarted coordinator continued from its checkpoint.
    assert [s["round"] for s in steps] == list(range(1, 9))
    assert 4 <= done_before < 8
    assert "resumed from checkpoint" in processes.log("coordinator-restarted")
    # Each step applied one full buffer, and some updates were built on an older model
    # (three clients train at once, the buffer takes two; the slow one is always late).
    assert all(s["clients_in"] == 2 and s["mean_staleness"] is not None for s in steps)
    assert any(s["mean_staleness"] > 0 for s in steps)
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"]["phase"] == "Succeeded"
    assert summary["status"]["serverSteps"] == 8
    assert "completed 8 server steps" in summary["status"]["message"]
    assert summary["finalAccuracy"] > 0.3  # ten classes: chance is 0.1
