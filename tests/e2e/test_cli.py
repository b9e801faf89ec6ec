"""The `fedkube` command as a user runs it: real subprocesses, real agents, real files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support import REPO, alive, child_env, descendants, fedkube_command, wait_until, write_job

pytestmark = pytest.mark.timeout(600)

CAMEL_CASE = re.compile(r"^[a-z]+([A-Z][a-z]*)*$")


def _fedkube(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fedkube_command(*args), capture_output=True, text=True, check=False,
                          env=child_env(), timeout=timeout, cwd=REPO)


def _assert_user_error(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Exit 2, exactly one `error:` line (holding each of `expected`), no traceback."""
    assert result.returncode == 2, result
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def _quick_job(path: Path, name: str = "quick", **spec: object) -> Path:
    """Two clients on digits with the small MLP: seconds per round even on a busy machine."""
    return write_job(path, name, **{"model": "mlp", "data": {"dataset": "digits"},
                                    "rounds": 2, "simulation": {"clients": 2}, **spec})


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def _rounds_logged(folder: Path) -> list[int]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["round"] for line in path.read_text().splitlines() if line.strip()]


def test_demo_job_reaches_target_accuracy(tmp_path: Path) -> None:
    """README's first command: the digits demo, 10 clients, >= 0.93 test accuracy."""
    result = _fedkube("run", "examples/digits-fedavg.yaml", "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _summary(tmp_path)
    assert summary["phase"] == "Succeeded"
    assert summary["finalAccuracy"] >= 0.93
    assert summary["bestAccuracy"] >= summary["finalAccuracy"]
    assert list(summary["clients"]) == sorted(summary["clients"]) and len(summary["clients"]) == 10
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == summary["rounds"] >= 1
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "round   1  accuracy" in result.stderr
    assert "starting 10 agents" in result.stderr and "registered 10/10 clients" in result.stderr
    assert "Succeeded" in result.stdout and "best accuracy" in result.stdout
    assert re.search(r"start-up \d+\.\ds, shut-down \d+\.\ds", result.stdout), result.stdout
    assert all(code == 0 for code in summary["agentExitCodes"])
    # One naming style, as in the status; the parts of the wall time are all there.
    assert all(CAMEL_CASE.match(key) for key in summary), list(summary)
    assert 0 < summary["startupSeconds"] < summary["wallSeconds"]
    assert 0 < summary["shutdownSeconds"] < summary["wallSeconds"]

    # The same command again must not silently continue a finished job.
    again = _fedkube("run", "examples/digits-fedavg.yaml", "--output", str(tmp_path))
    _assert_user_error(again, "finished run", "--fresh")
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines


@pytest.mark.parametrize(("spec", "field", "reason"), [
    ({"model": "mlp", "rounds": 0}, "spec.rounds", "greater than or equal to 1"),
    ({"model": "mlp", "privacy": {"mode": "local"}}, "spec.privacy",
     "targetEpsilon (or noiseMultiplier) is required"),
    ({"model": "mlp", "privacy": {"mode": "central", "targetEpsilon": -1}},
     "spec.privacy.targetEpsilon", "greater than 0"),
    ({"model": "mlp", "strategy": {"name": "avg"}}, "spec.strategy.name", "fedavg"),
    ({"model": "mlp", "clientsPerRound": 3, "minClients": 5}, "spec",
     "minClients (5) exceeds clientsPerRound (3)"),
    ({"model": "mlp", "learningRat": 0.1}, "spec.learningRat", "Extra inputs are not permitted"),
])
def test_bad_manifest_names_field_and_reason(tmp_path: Path, spec, field, reason) -> None:
    job = write_job(tmp_path / "bad.yaml", "bad", **spec)
    for command in (("validate", str(job)), ("run", str(job), "-o", str(tmp_path / "o"))):
        _assert_user_error(_fedkube(*command, timeout=60), field, reason)
    assert not (tmp_path / "o").exists()


def test_user_errors_are_one_line_each(tmp_path: Path) -> None:
    """Ordinary mistakes: one `error:` line naming the flag or field and the reason."""
    job = _quick_job(tmp_path / "job.yaml", clientsPerRound=2, minClients=2)
    out = str(tmp_path / "out")
    _assert_user_error(_fedkube("run", str(job), "--clients", "0", "-o", out, timeout=60),
                       "--clients", "at least 1")
    # Fewer clients than clientsPerRound: the reason, not the whole spec.
    line = _assert_user_error(_fedkube("run", str(job), "--clients", "1", "-o", out,
                                       timeout=60),
                              "--clients 1", "clientsPerRound (2) exceeds simulation.clients (1)")
    assert "learningRate" not in line
    _assert_user_error(_fedkube("run", str(job), "--resume", "--fresh", timeout=60), "--fresh",
                       "--resume")
    _assert_user_error(_fedkube("run", str(job), "--resume", "-o", out, timeout=60),
                       "--resume", "no checkpoint")
    _assert_user_error(_fedkube("validate", str(tmp_path / "nope.yaml"), timeout=60),
                       "nope.yaml", "no such file")
    _assert_user_error(_fedkube("validate", str(tmp_path), timeout=60), "is a directory")
    listed = tmp_path / "list.yaml"
    listed.write_text("- kind: FederatedJob\n- spec: {}\n")
    for command in ("validate", "run"):
        _assert_user_error(_fedkube(command, str(listed), timeout=60), "list", "not a mapping")
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: FederatedJob\nspec: [unclosed\n")
    _assert_user_error(_fedkube("validate", str(broken), timeout=60), "not valid YAML")
    assert not (tmp_path / "out").exists()


def test_validate_checks_data_and_model(tmp_path: Path) -> None:
    """What a run would load first is checked before it: the data file and its arrays,
    the model name. A run of the same manifest fails the same way and leaves no folder."""
    missing = write_job(tmp_path / "missing.yaml", "missing", model="mlp", data={
        "dataset": "npz", "path": str(tmp_path / "absent.npz")}, simulation={"clients": 2})
    for command in (("validate", str(missing)), ("run", str(missing), "-o", str(tmp_path / "o"))):
        _assert_user_error(_fedkube(*command, timeout=60), "spec.data", "absent.npz",
                           "no such file")
    assert not (tmp_path / "o").exists()
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((4, 8, 8), dtype=np.float32))
    wrong_job = write_job(tmp_path / "wrong.yaml", "wrong", model="mlp",
                          data={"dataset": "npz", "path": str(wrong)})
    _assert_user_error(_fedkube("validate", str(wrong_job), timeout=60), "spec.data",
                       "x_train, y_train")
    unknown = write_job(tmp_path / "unknown.yaml", "unknown", model="resnet9000")
    _assert_user_error(_fedkube("validate", str(unknown), timeout=60), "spec.model",
                       "resnet9000")

    # The README's .npz format, validated and described.
    rng = np.random.default_rng(0)
    good = tmp_path / "good.npz"
    np.savez(good, x_train=rng.random((40, 1, 8, 8), dtype=np.float32),
             y_train=rng.integers(0, 3, 40), x_test=rng.random((10, 1, 8, 8), dtype=np.float32),
             y_test=rng.integers(0, 3, 10))
    good_job = write_job(tmp_path / "good.yaml", "good", model="mlp",
                         data={"dataset": "npz", "path": str(good)}, simulation={"clients": 2})
    result = _fedkube("validate", str(good_job), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout and "40 training, 10 test" in result.stdout, result.stdout


def test_missing_manifest_and_not_yaml(tmp_path: Path) -> None:
    missing = _fedkube("validate", str(tmp_path / "nope.yaml"), timeout=60)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: FederatedJob\nspec: [unclosed\n")
    result = _fedkube("validate", str(broken), timeout=60)
    assert result.returncode == 2 and "not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_examples_are_valid() -> None:
    examples = sorted(str(path) for path in (REPO / "examples").glob("*.yaml"))
    result = _fedkube("validate", *examples, timeout=240)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(" is valid: ") == len(examples), result.stdout


def test_validate_several_reports_each_bad_manifest(tmp_path: Path) -> None:
    """`fedkube validate a.yaml b.yaml c.yaml`: every manifest is checked, each bad one
    gets its own `error:` line naming its file, and the good ones still print."""
    good = _quick_job(tmp_path / "good.yaml")
    bad_rounds = write_job(tmp_path / "rounds.yaml", "bad", model="mlp", rounds=0)
    missing = tmp_path / "missing.yaml"
    result = _fedkube("validate", str(bad_rounds), str(good), str(missing), timeout=60)
    assert result.returncode == 2, result
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, result.stderr
    assert str(bad_rounds) in errors[0] and "rounds" in errors[0], errors
    assert str(missing) in errors[1] and "no such file" in errors[1], errors
    assert f"{good}: FederatedJob quick is valid" in result.stdout, result.stdout
    assert "Traceback" not in result.stderr


class _Run:
    """`fedkube run` started in the background, as a user would from a shell."""

    def __init__(self, job: Path, output: Path, *args: str) -> None:
        self.output = output
        self.stderr_path = output.parent / f"{output.name}.stderr"
        self.stdout_path = output.parent / f"{output.name}.stdout"
        with self.stderr_path.open("w") as err, self.stdout_path.open("w") as out:
            self.process = subprocess.Popen(
                fedkube_command("run", str(job), "--output", str(output), *args),
                stdout=out, stderr=err, env=child_env(), cwd=REPO)

    def log(self) -> str:
        return (f"--- stdout\n{self.stdout_path.read_text()}\n--- stderr\n"
                f"{self.stderr_path.read_text()[-3000:]}")

    def agents_after_round_one(self) -> set[int]:
        # Start-up takes long on a loaded machine (agents import torch): a generous limit.
        wait_until(lambda: _rounds_logged(self.output) or self.process.poll() is not None,
                   what="round 1", diagnose=self.log, timeout=300)
        assert self.process.poll() is None, self.log()
        return wait_until(lambda: descendants(self.process.pid), what="agent processes",
                          diagnose=self.log)

    def interrupt(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=120)

    def kill(self) -> None:
        """After a failed test: nothing of this run may keep running."""
        for pid in descendants(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def background_runs() -> Iterator[list[_Run]]:
    runs: list[_Run] = []
    yield runs
    for run in runs:
        run.kill()


# SIGTERM takes the same path as SIGINT (one handler); it runs with the slow tests.
@pytest.mark.parametrize("signum", [
    pytest.param(signal.SIGINT, id="SIGINT"),
    pytest.param(signal.SIGTERM, id="SIGTERM", marks=pytest.mark.slow),
])
def test_interrupt_stops_every_agent_and_writes_the_summary(
        tmp_path: Path, signum: int, background_runs: list[_Run]) -> None:
    """Ctrl-C (SIGINT) or SIGTERM mid-run: the job ends Stopped, no agent process
    outlives `fedkube run`, summary.json and the plot cover the rounds done, and the
    message says how to resume; the folder is then refused unless --resume or --fresh."""
    job = _quick_job(tmp_path / "job.yaml", rounds=100)
    output = tmp_path / "run"
    run = _Run(job, output)
    background_runs.append(run)
    agents = run.agents_after_round_one()
    code = run.interrupt(signum)
    assert code == 128 + signum, run.log()
    assert not [pid for pid in agents if alive(pid)], run.log()
    summary = _summary(output)
    assert summary["phase"] == "Stopped" and summary["stoppedBy"] == signal.Signals(signum).name
    assert summary["rounds"] == len(_rounds_logged(output)) >= 1
    assert (output / "metrics.png").exists()
    stdout = run.stdout_path.read_text()
    assert f"fedkube run {job} --output {output} --resume" in stdout, stdout
    _assert_user_error(_fedkube("run", str(job), "--output", str(output), timeout=60),
                       "unfinished run", "--resume", "--fresh")


def test_resume_continues_and_fresh_starts_over(tmp_path: Path,
                                                background_runs: list[_Run]) -> None:
    """An interrupted run: a manifest whose model no longer matches is refused, --resume
    continues from the checkpoint to the end, the finished folder is then refused, and
    --fresh trains from round 1 again."""
    job = _quick_job(tmp_path / "job.yaml", rounds=100)
    output = tmp_path / "run"
    run = _Run(job, output)
    background_runs.append(run)
    run.agents_after_round_one()
    assert run.interrupt(signal.SIGINT) == 130, run.log()
    done = _summary(output)["rounds"]

    other_model = _quick_job(tmp_path / "other.yaml", model="cnn8", rounds=done + 1)
    _assert_user_error(_fedkube("run", str(other_model), "-o", str(output), "--resume"),
                       "checkpoint", "different model", "--fresh")

    shorter = _quick_job(tmp_path / "short.yaml", rounds=done + 1)
    resumed = _fedkube("run", str(shorter), "-o", str(output), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at round {done + 1}" in resumed.stderr
    assert _rounds_logged(output) == list(range(1, done + 2))
    assert _summary(output)["phase"] == "Succeeded"

    _assert_user_error(_fedkube("run", str(shorter), "-o", str(output), "--resume"),
                       "finished run", "--fresh")
    fresh = _fedkube("run", str(_quick_job(tmp_path / "two.yaml")), "-o", str(output), "--fresh")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "resuming" not in fresh.stderr
    assert _rounds_logged(output) == [1, 2]

    # A coordinator restarted on a finished job (a pod restarted after the end) reports
    # the outcome and stays finished: no agent needed, nothing trained, nothing rewritten.
    restarted = _fedkube("coordinator", "--job", str(tmp_path / "two.yaml"), "--output",
                         str(output), "--port", "0", "--host", "127.0.0.1")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    reported = json.loads(restarted.stdout.strip().splitlines()[-1])
    assert (reported["phase"], reported["round"]) == ("Succeeded", 2)
    assert _rounds_logged(output) == [1, 2]
