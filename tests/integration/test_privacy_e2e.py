"""Differential privacy end to end: real coordinators and agents over gRPC on 127.0.0.1.

What is checked is what a user is promised (issue 4): no client and no job spends more
than targetEpsilon; a device's spent budget survives an agent restart; an update that
claims more than the target is refused with PERMISSION_DENIED and never folded; a job
whose budget runs out ends Succeeded with BudgetExhausted=True instead of failing.

Jobs are tiny (digits, mlp, a few rounds) so the module stays well under two minutes on
two busy cores; the numbers of rounds that fit a budget are derived from the same
privacy maths the agents and the coordinator use, not hard-coded.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from fedkube.runtime import wire
from fedkube.runtime.agent.trainer import LocalTrainer
from fedkube.runtime.coordinator.engine import RoundEngine
from fedkube.runtime.coordinator.server import serve
from fedkube.runtime.local import RunOptions, run_job
from fedkube.runtime.messages import JobIdentity
from fedkube.runtime.models import build_model
from fedkube.runtime.plan import plan_for
from fedkube.runtime.privacy import BudgetStore, epsilon_for, local_steps, steps_within_budget
from fedkube.runtime.proto import fedkube_pb2 as pb
from fedkube.runtime.proto import fedkube_pb2_grpc as pb_grpc
from fedkube.runtime.spec import (
    FederatedJobSpec,
    FederatedJobStatus,
    load_job,
    parse_job,
)
from fedkube.runtime.training import weights_of
from support import REPO, Processes, RecordingSink, child_env, fedkube_command, free_port, write_job

pytestmark = pytest.mark.timeout(240)

DELTA = 1e-5
# scikit-learn's digits: 1,797 images, 20% held out for the coordinator's evaluation.
DIGITS_TRAIN = 1437


def _small_job(**overrides: Any) -> dict[str, Any]:
    return {"model": "mlp", "data": {"dataset": "digits", "partition": "iid"},
            "localEpochs": 1, "batchSize": 32, "learningRate": 0.1,
            "roundTimeoutSeconds": 60, **overrides}


def _fedkube_run(job: Path, output: Path, *, timeout: float = 180
                 ) -> subprocess.CompletedProcess[str]:
    # One agent process hosts every simulated client: on two busy cores a second
    # interpreter (torch, Opacus) costs more start-up than these tiny jobs train.
    return subprocess.run(fedkube_command("run", str(job), "-o", str(output), "--quiet",
                                          "--agent-processes", "1"),
                          capture_output=True, text=True, env=child_env(), cwd=REPO,
                          timeout=timeout, check=False)


def _run_in_process(job: Path, output: Path) -> dict[str, Any]:
    """What `fedkube run` does, minus its argument parsing and a second interpreter's
    start-up: the coordinator in this process, the agents as real child processes."""
    options = RunOptions(output=output, quiet=True, agent_processes=1)
    return asyncio.run(run_job(load_job(job), options))


def _metrics(output: Path) -> list[dict[str, Any]]:
    path = output / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _condition(summary: dict[str, Any], type_: str) -> dict[str, Any] | None:
    conditions = summary["status"].get("conditions", [])
    return next((c for c in conditions if c["type"] == type_), None)


def _client_epsilons(summary: dict[str, Any], job: str) -> dict[str, float]:
    return {node: client["status"]["privacy"][job]["epsilon"]
            for node, client in summary["clients"].items()}


def _run_log(output: Path) -> str:
    logs = sorted((output / "agents").glob("*.log"))
    return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}" for p in logs)


# --------------------------------------------------------------------------- local DP


def test_local_dp_job_spends_its_budget_over_the_whole_job_and_never_more(
        tmp_path: Path) -> None:
    """`fedkube run` with DP-SGD on every client: the noise is calibrated once for all
    planned rounds, so every round runs, epsilon grows round by round and ends close to
    (never above) the target, on the job and on every ClientNode."""
    target, rounds, clients = 3.0, 3, 3
    job = write_job(tmp_path / "job.yaml", "dp-local", **_small_job(
        rounds=rounds, clientsPerRound=clients, minClients=clients,
        privacy={"mode": "local", "targetEpsilon": target, "delta": DELTA,
                 "maxGradNorm": 1.0},
        simulation={"clients": clients}))
    output = tmp_path / "out"
    result = _fedkube_run(job, output)
    assert result.returncode == 0, result.stderr[-3000:] + _run_log(output)

    summary = json.loads((output / "summary.json").read_text())
    assert summary["phase"] == "Succeeded"
    assert summary["rounds"] == rounds  # calibrated per round, the budget would end at 1
    assert summary["epsilon"] <= target
    assert summary["status"]["epsilon"] <= target
    assert summary["status"]["targetEpsilon"] == target

    per_client = _client_epsilons(summary, "dp-local")
    assert len(per_client) == clients
    for node, epsilon in per_client.items():
        assert 0.0 < epsilon <= target, (node, epsilon)
        # Calibrated for exactly the rounds each client joined: almost all of it is spent.
        assert epsilon >= 0.9 * target, (node, epsilon)
        assert summary["clients"][node]["status"]["privacy"]["dp-local"]["delta"] == DELTA

    epsilons = [r["epsilon"] for r in _metrics(output)]
    assert len(epsilons) == rounds
    assert all(e is not None and 0.0 < e <= target for e in epsilons), epsilons
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1], epsilons
    assert summary["finalAccuracy"] > 0.3, summary["finalAccuracy"]  # ten classes
    assert "ε" in result.stdout and f"target {target}" in result.stdout


def test_local_budget_exhaustion_ends_the_job_cleanly(tmp_path: Path) -> None:
    """A fixed noise multiplier that affords fewer rounds than planned: agents decline
    the task that would go past the target, and the job ends Succeeded with
    BudgetExhausted=True after the last round that fitted."""
    target, noise, clients = 2.1, 1.5, 3
    job = write_job(tmp_path / "job.yaml", "dp-exhaust", **_small_job(
        rounds=12, clientsPerRound=clients, minClients=2,
        privacy={"mode": "local", "targetEpsilon": target, "noiseMultiplier": noise,
                 "delta": DELTA},
        simulation={"clients": clients}))
    steps_per_round, rate = local_steps(DIGITS_TRAIN // clients, 32, 1)
    fitting = steps_within_budget(noise_multiplier=noise, sample_rate=rate,
                                  target_epsilon=target, delta=DELTA, accountant="rdp",
                                  max_steps=12 * steps_per_round) // steps_per_round
    assert 1 <= fitting < 12  # the scenario needs a budget that runs out mid-job

    output = tmp_path / "out"
    summary = _run_in_process(job, output)
    assert summary["phase"] == "Succeeded", summary["message"] + _run_log(output)
    assert summary["rounds"] == fitting
    exhausted = _condition(summary, "BudgetExhausted")
    assert exhausted is not None and exhausted["status"] == "True", summary["status"]
    assert "budget" in summary["message"]

    assert summary["epsilon"] <= target
    for node, epsilon in _client_epsilons(summary, "dp-exhaust").items():
        assert epsilon <= target, (node, epsilon)
        expected = epsilon_for(noise_multiplier=noise, sample_rate=rate, delta=DELTA,
                               steps=fitting * steps_per_round, accountant="rdp")
        assert epsilon == pytest.approx(expected, rel=1e-6), node
    assert "would exceed targetEpsilon" in _run_log(output)


def _read_budget(state_dir: Path, node: str, job: str) -> tuple[int, float, int]:
    """(steps recorded, epsilon at DELTA, steps per round) from the agent's own file."""
    record = BudgetStore(state_dir / "privacy" / node).read(job)
    assert record is not None, f"no budget file for {node}"
    return (record.accountant.total_steps, record.accountant.epsilon(DELTA),
            int(record.extra["steps_per_round"]))


def test_restarted_agent_continues_from_its_persisted_budget(
        tmp_path: Path, processes: Processes) -> None:
    """Kill the agent after round 1 and start it again with the same node id and state
    folder: it loads what it had spent and adds to it, so over the job it has recorded
    at least the steps of every update the coordinator accepted from it."""
    rounds = 4
    # The coordinator waits (a round retry) for its one client to come back. The kill may
    # land after a round's steps were saved but before the update left, which counts
    # against the budget; the fixed noise leaves room for 7 rounds, so all 4 still run.
    job = write_job(tmp_path / "job.yaml", "dp-restart", **_small_job(
        rounds=rounds, clientsPerRound=1, minClients=1,
        privacy={"mode": "local", "targetEpsilon": 3.0, "noiseMultiplier": 1.0,
                 "delta": DELTA},
        simulation={"clients": 1}))
    output, state = tmp_path / "out", tmp_path / "state"
    port = free_port()

    def agent(index: int, name: str) -> subprocess.Popen[bytes]:
        return processes.start(name, fedkube_command(
            "agent", "--coordinator", f"127.0.0.1:{port}", "--simulated-index", str(index),
            "--node-id", f"agent-{index}", "--device", "cpu", "--state-dir", str(state),
            "--give-up-after", "60"))

    coordinator = processes.start("coordinator", fedkube_command(
        "coordinator", "--job", str(job), "--host", "127.0.0.1", "--port", str(port),
        "--output", str(output), "--registration-timeout", "60"))
    victim = agent(0, "agent-0")

    deadline = time.monotonic() + 120
    while not _metrics(output):
        assert time.monotonic() < deadline, processes.log("coordinator")[-3000:]
        assert coordinator.poll() is None, processes.log("coordinator")[-3000:]
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    steps_before, epsilon_before, steps_per_round = _read_budget(state, "agent-0", "dp-restart")
    assert steps_before >= steps_per_round and epsilon_before > 0.0

    agent(0, "agent-0-restarted")
    assert coordinator.wait(timeout=180) == 0, processes.log("coordinator")[-3000:]

    resumed = re.search(r"resuming privacy budget for dp-restart: epsilon ([0-9.]+) spent",
                        processes.log("agent-0-restarted"))
    assert resumed, processes.log("agent-0-restarted")[-3000:]
    assert float(resumed.group(1)) == pytest.approx(epsilon_before, abs=1e-4)

    steps_after, epsilon_after, _ = _read_budget(state, "agent-0", "dp-restart")
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"]["phase"] == "Succeeded"
    assert [r["round"] for r in _metrics(output)] == list(range(1, rounds + 1))
    participated = summary["clients"]["agent-0"]["status"]["roundsParticipated"]
    assert participated == rounds  # the only client: every round is one of its updates
    # Starting over from zero would have recorded only the rounds after the restart.
    assert steps_after >= participated * steps_per_round
    assert steps_after > steps_before and epsilon_after > epsilon_before
    assert epsilon_after <= 3.0
    reported = summary["clients"]["agent-0"]["status"]["privacy"]["dp-restart"]["epsilon"]
    assert reported == pytest.approx(epsilon_after, rel=1e-6)


def _train_once(spec: FederatedJobSpec, state_dir: Path) -> dict[str, torch.Tensor]:
    identity = JobIdentity(job_name="dp-secret", model=spec.model, data=spec.data,
                           seed=spec.seed, num_simulated_clients=2, input_shape=(1, 8, 8),
                           num_classes=10)
    trainer = LocalTrainer.create(
        job=identity, node_id="sim-000", device=torch.device("cpu"), simulated_index=0,
        data_path=None, state_dir=state_dir)
    plan = plan_for(spec.model_copy(update={"batch_size": 32, "learning_rate": 0.1}),
                    round=1, model_version=0, now=0.0, client_parameters={})
    # The job's initial model, built afresh: the trainer's models come from a pool shared
    # by the process, so one it lends may hold an earlier task's weights.
    initial = weights_of(build_model(spec.model, input_shape=(1, 8, 8), num_classes=10,
                                     seed=spec.seed))
    return trainer.train(plan, initial).delta_weights


def test_coordinator_cannot_replay_a_clients_dp_noise(tmp_path: Path) -> None:
    """Everything the coordinator knows (job seed, client index, round, global model) is
    the same for two trainings, yet their DP-SGD updates differ: the noise and the Poisson
    sample come from a seed that never leaves the device, so the coordinator cannot
    regenerate the noise and subtract it. Without DP the same inputs give the same update,
    so the difference is the noise and nothing else."""
    private = _small_job(rounds=2, privacy={"mode": "local", "targetEpsilon": 5.0,
                                            "delta": DELTA}, simulation={"clients": 2})
    spec = FederatedJobSpec.model_validate(private)
    first, second = (_train_once(spec, tmp_path / name) for name in ("a", "b"))
    assert any(not torch.equal(first[k], second[k]) for k in first)

    plain = FederatedJobSpec.model_validate({**private, "privacy": {"mode": "none"}})
    first, second = (_train_once(plain, tmp_path / name) for name in ("c", "d"))
    assert all(torch.equal(first[k], second[k]) for k in first)


# ------------------------------------------------------- the coordinator's budget check


async def _chunks(header: pb.UpdateHeader, tensors: dict[str, torch.Tensor]
                  ) -> AsyncIterator[pb.UpdateChunk]:
    yield pb.UpdateChunk(header=header)
    for chunk in wire.to_chunks(tensors, model_version=header.model_version):
        yield pb.UpdateChunk(tensor=chunk)


async def _over_budget_scenario() -> dict[str, Any]:
    job = parse_job({
        "apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
        "metadata": {"name": "dp-reject"},
        "spec": _small_job(rounds=1, clientsPerRound=1, minClients=1,
                           privacy={"mode": "local", "targetEpsilon": 1.0, "delta": DELTA})})
    engine = RoundEngine(job, sink=RecordingSink(), registration_timeout=30)
    initial = {k: v.clone() for k, v in engine.weights.items()}
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve(engine, host="127.0.0.1", port=0, on_bound=bound))
    port = await bound
    seen: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        reply = await stub.Register(pb.RegisterRequest(
            node_id="greedy", facts=pb.DeviceFacts(num_samples=10)))
        session = (("fedkube-session", reply.session),)
        tasks = stub.StreamTasks(pb.StreamTasksRequest(node_id="greedy"), metadata=session)
        task = await anext(aiter(tasks))
        assert task.kind == pb.Task.TRAIN and task.plan.privacy.mode == "local"
        seen["task_target"] = task.plan.privacy.target_epsilon

        def header(epsilon: float, **changes: Any) -> pb.UpdateHeader:
            fields: dict[str, Any] = {
                "node_id": "greedy", "round": task.plan.round,
                "model_version": task.plan.model_version,
                "num_samples": 10, "payload": "delta", "epsilon_spent": epsilon,
                "delta": DELTA, **changes}
            return pb.UpdateHeader(**fields)

        step = {k: torch.full_like(v, 0.25) if v.is_floating_point() else torch.zeros_like(v)
                for k, v in initial.items()}
        for name, head in (("update", header(1.5)),
                           ("refusal", header(1.2, payload="refusal", refusal_reason="x"))):
            try:
                await stub.SubmitUpdate(_chunks(head, step if name == "update" else {}), metadata=session)
                seen[name] = "accepted"
            except grpc.aio.AioRpcError as error:
                seen[name] = (error.code(), error.details())
            seen[f"{name}:untouched"] = all(
                torch.equal(engine.weights[k], initial[k]) for k in initial)
            seen[f"{name}:client_epsilon"] = engine.registry.get("greedy").epsilon
        # The same client, honest this time, is still heard in the same round.
        reply = await stub.SubmitUpdate(_chunks(header(0.4), step), metadata=session)
        seen["honest"] = reply.accepted
        tasks.cancel()
    status = await server
    seen["status"] = status
    seen["moved"] = {k: engine.weights[k] - initial[k] for k in initial}
    return seen


def test_coordinator_refuses_an_update_that_claims_more_than_the_target() -> None:
    seen = asyncio.run(_over_budget_scenario())
    assert seen["task_target"] == 1.0
    for name in ("update", "refusal"):
        assert seen[name] != "accepted", name
        code, details = seen[name]
        assert code == grpc.StatusCode.PERMISSION_DENIED, (name, code)
        assert "exceeds targetEpsilon 1.0" in details, details
        assert seen[f"{name}:untouched"], f"the over-budget {name} changed the model"
        # A refused claim is not taken as the device's spent budget either.
        assert seen[f"{name}:client_epsilon"] == 0.0
    assert seen["honest"] is True
    status: FederatedJobStatus = seen["status"]
    assert status.phase.value == "Succeeded"
    assert status.epsilon == pytest.approx(0.4)
    for name, moved in seen["moved"].items():
        if moved.is_floating_point():
            assert torch.allclose(moved, torch.full_like(moved, 0.25)), name


# ------------------------------------------------------------------------- central DP


def test_central_dp_calibrated_for_the_planned_rounds(tmp_path: Path) -> None:
    """DP-FedAvg with the noise calibrated from targetEpsilon: every planned round runs
    and the job's epsilon lands just under the target."""
    target, rounds, clients = 4.0, 3, 3
    job = write_job(tmp_path / "job.yaml", "dp-central", **_small_job(
        rounds=rounds, clientsPerRound=clients, minClients=clients,
        privacy={"mode": "central", "targetEpsilon": target, "delta": DELTA,
                 "maxGradNorm": 1.0},
        simulation={"clients": clients}))
    output = tmp_path / "out"
    summary = _run_in_process(job, output)
    assert summary["phase"] == "Succeeded", summary["message"] + _run_log(output)
    assert summary["rounds"] == rounds
    epsilons = [r["epsilon"] for r in _metrics(output)]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0.0, epsilons
    assert 0.9 * target <= summary["status"]["epsilon"] <= target
    exhausted = _condition(summary, "BudgetExhausted")
    assert exhausted is None or exhausted["status"] != "True"


def test_central_dp_stops_before_the_round_that_would_exceed(tmp_path: Path) -> None:
    """A fixed noise multiplier affording fewer rounds than planned: the coordinator
    stops before the round that would pass the target, Succeeded, BudgetExhausted=True."""
    target, noise, clients = 3.0, 3.0, 3
    job = write_job(tmp_path / "job.yaml", "dp-central-out", **_small_job(
        rounds=10, clientsPerRound=clients, minClients=clients,
        privacy={"mode": "central", "targetEpsilon": target, "noiseMultiplier": noise,
                 "delta": DELTA},
        # Noise of std 1 per weight on 3 clients would wreck the model (and a diverged
        # client skips its round); a small server step keeps it trainable: this test is
        # about the books.
        strategy={"serverLearningRate": 0.01},
        simulation={"clients": clients}))
    fitting = steps_within_budget(noise_multiplier=noise, sample_rate=1.0,
                                  target_epsilon=target, delta=DELTA, accountant="rdp",
                                  max_steps=10)
    assert 1 <= fitting < 10
    output = tmp_path / "out"
    summary = _run_in_process(job, output)
    assert summary["phase"] == "Succeeded", summary["message"] + _run_log(output)
    assert summary["rounds"] == fitting
    exhausted = _condition(summary, "BudgetExhausted")
    assert exhausted is not None and exhausted["status"] == "True", summary["status"]
    spent = epsilon_for(noise_multiplier=noise, sample_rate=1.0, steps=fitting,
                        delta=DELTA, accountant="rdp")
    assert summary["status"]["epsilon"] == pytest.approx(spent, abs=1e-4)
    assert summary["status"]["epsilon"] <= target
    assert [r["epsilon"] for r in _metrics(output)][-1] <= target


def test_central_noise_cannot_be_replayed_from_the_job_spec() -> None:
    """Every client receives the job's spec, seed included, and downloads every model.
    Two coordinators of the very same job must still draw different DP-FedAvg noise, or
    a client could regenerate the noise and subtract it from the model it downloads."""
    job = parse_job({
        "apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
        "metadata": {"name": "dp-central-noise"},
        "spec": _small_job(rounds=2, clientsPerRound=2, minClients=2,
                           privacy={"mode": "central", "targetEpsilon": 2.0, "delta": DELTA},
                           simulation={"clients": 2})})
    noises = []
    for _ in range(2):
        engine = RoundEngine(job, sink=RecordingSink())
        assert engine.central is not None
        zeros = {k: torch.zeros_like(v) for k, v in engine.weights.items()}
        noises.append(engine.central.noised(zeros, averaged=2,
                                            generator=engine.noise_generator))
    floating = [k for k, v in noises[0].items() if v.is_floating_point()]
    assert floating and all(noises[0][k].abs().sum() > 0 for k in floating)
    assert all(not torch.equal(noises[0][k], noises[1][k]) for k in floating)
