"""A real coordinator process and real agent processes over gRPC on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from support import Processes, fedkube_command, free_port, write_job

pytestmark = pytest.mark.timeout(240)


def _read_metrics(output: Path) -> list[dict]:
    path = output / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait(predicate, *, timeout: float, what: str, processes: Processes, interval=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}\n--- coordinator log ---\n"
                         f"{processes.log('coordinator')[-4000:]}")


def _start(processes: Processes, job: Path, output: Path, port: int, agents: int,
           **agent_env: str) -> None:
    processes.start("coordinator", fedkube_command(
        "coordinator", "--job", str(job), "--host", "127.0.0.1", "--port", str(port),
        "--output", str(output), "--registration-timeout", "60"))
    for index in range(agents):
        processes.start(f"agent-{index}", fedkube_command(
            "agent", "--coordinator", f"127.0.0.1:{port}", "--simulated-index", str(index),
            "--node-id", f"agent-{index}", "--device", "cpu",
            "--state-dir", str(output.parent / "state"), "--give-up-after", "30"),
            **agent_env)


def test_three_agents_train_better_than_chance(tmp_path: Path, processes: Processes) -> None:
    job = write_job(tmp_path / "job.yaml", "grpc-train", model="mlp",
                    data={"dataset": "digits"}, rounds=3, clientsPerRound=3, minClients=3,
                    localEpochs=1, batchSize=16, learningRate=0.1,
                    simulation={"clients": 3}, roundTimeoutSeconds=60)
    output = tmp_path / "out"
    _start(processes, job, output, free_port(), agents=3)
    coordinator = processes.children[0]
    assert coordinator.wait(timeout=180) == 0, processes.log("coordinator")[-4000:]

    rounds = _read_metrics(output)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["clients_in"] == 3 for r in rounds)
    assert rounds[-1]["accuracy"] > 0.5  # ten classes: chance is 0.1
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"]["phase"] == "Succeeded"
    assert set(summary["clients"]) == {"agent-0", "agent-1", "agent-2"}
    # Agents leave when the coordinator says STOP.
    for agent in processes.children[1:]:
        assert agent.wait(timeout=30) == 0


def test_agent_killed_mid_round_round_closes_with_the_others(
        tmp_path: Path, processes: Processes) -> None:
    job = write_job(tmp_path / "job.yaml", "grpc-kill", model="mlp",
                    data={"dataset": "digits"}, rounds=4, clientsPerRound=3, minClients=2,
                    localEpochs=3, batchSize=8, learningRate=0.05,
                    simulation={"clients": 3}, roundTimeoutSeconds=8)
    output = tmp_path / "out"
    _start(processes, job, output, free_port(), agents=3)
    coordinator, victim = processes.children[0], processes.children[1]

    _wait(lambda: len(_read_metrics(output)) >= 1, timeout=120, what="round 1",
          processes=processes)
    victim.send_signal(signal.SIGKILL)
    assert coordinator.wait(timeout=120) == 0, processes.log("coordinator")[-4000:]

    rounds = _read_metrics(output)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    after_kill = rounds[2:]  # round 2 may have been in flight when the agent died
    assert all(r["clients_in"] == 2 for r in after_kill)
    # Once the coordinator saw the agent go, no round waited for it: rounds after the
    # kill ask only the two that are left (the deadline is the bound for the round in
    # flight; its duration is not asserted, a busy machine may take longer).
    assert all(r["clients_selected"] == 2 and r["clients_dropped"] == 0 for r in rounds[3:])
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"]["phase"] == "Succeeded"


def test_coordinator_restart_resumes_from_checkpoint(
        tmp_path: Path, processes: Processes) -> None:
    job = write_job(tmp_path / "job.yaml", "grpc-restart", model="mlp",
                    data={"dataset": "digits"}, rounds=5, clientsPerRound=2, minClients=2,
                    localEpochs=2, batchSize=8, learningRate=0.05,
                    simulation={"clients": 2}, roundTimeoutSeconds=30)
    output = tmp_path / "out"
    port = free_port()
    _start(processes, job, output, port, agents=2)
    first, agents = processes.children[0], processes.children[1:3]
    _wait(lambda: len(_read_metrics(output)) >= 2, timeout=120, what="two rounds",
          processes=processes)
    # Freeze the agents so no further round can close, whatever the machine's speed, then
    # kill the coordinator mid-job; the agents carry on against its successor.
    for agent in agents:
        agent.send_signal(signal.SIGSTOP)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    done_before = len(_read_metrics(output))
    for agent in agents:
        agent.send_signal(signal.SIGCONT)

    restarted = processes.start("coordinator-restarted", fedkube_command(
        "coordinator", "--job", str(job), "--host", "127.0.0.1", "--port", str(port),
        "--output", str(output), "--registration-timeout", "60"))
    assert restarted.wait(timeout=150) == 0, processes.log("coordinator-restarted")[-4000:]

    rounds = [r["round"] for r in _read_metrics(output)]
    # Every round exactly once: the restarted coordinator continued, it did not start over.
    assert rounds == list(range(1, 6)), rounds
    assert 2 <= done_before < 5
    assert "resumed from checkpoint" in processes.log("coordinator-restarted")
    for agent in processes.children[1:3]:
        assert agent.wait(timeout=30) == 0


def _scrape(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_endpoint_counters_move_during_a_run(tmp_path: Path,
                                                     processes: Processes) -> None:
    job = write_job(tmp_path / "job.yaml", "grpc-metrics", model="mlp",
                    data={"dataset": "digits"}, rounds=4, clientsPerRound=2, minClients=2,
                    localEpochs=4, batchSize=8, learningRate=0.05,
                    simulation={"clients": 2}, roundTimeoutSeconds=30)
    output, port, metrics_port = tmp_path / "out", free_port(), free_port()
    processes.start("coordinator", fedkube_command(
        "coordinator", "--job", str(job), "--host", "127.0.0.1", "--port", str(port),
        "--output", str(output), "--metrics-port", str(metrics_port)))
    for index in range(2):
        processes.start(f"agent-{index}", fedkube_command(
            "agent", "--coordinator", f"127.0.0.1:{port}", "--simulated-index", str(index),
            "--state-dir", str(tmp_path / "state"), "--give-up-after", "30"))
    _wait(lambda: len(_read_metrics(output)) >= 1, timeout=120, what="round 1",
          processes=processes)
    first = _scrape(metrics_port)
    _wait(lambda: len(_read_metrics(output)) >= 3, timeout=120, what="round 3",
          processes=processes)
    later = _scrape(metrics_port)
    assert processes.children[0].wait(timeout=120) == 0

    assert first["fedkube_rounds_total"] >= 1
    assert later["fedkube_rounds_total"] > first["fedkube_rounds_total"]
    assert later["fedkube_updates_accepted_total"] > first["fedkube_updates_accepted_total"]
    assert later["fedkube_bytes_received_total"] > first["fedkube_bytes_received_total"]
    assert later["fedkube_bytes_sent_total"] > first["fedkube_bytes_sent_total"]
    assert later["fedkube_clients_registered"] == 2
    assert 0 < later["fedkube_model_accuracy"] <= 1
