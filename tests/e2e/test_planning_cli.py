"""`fedkube privacy plan` and `fedkube validate`'s sizes, as a user runs them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support import REPO, child_env, fedkube_command, write_job

pytestmark = pytest.mark.timeout(300)


def _fedkube(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fedkube_command(*args), capture_output=True, text=True, check=False,
                          env=child_env(), timeout=timeout, cwd=REPO)


def test_validate_prints_the_models_size_and_memory() -> None:
    result = _fedkube("validate", str(REPO / "examples" / "digits-fedavg.yaml"), timeout=120)
    assert result.returncode == 0, result.stderr
    for figure in ("parameters:", "update on the wire:", "memory per client:",
                   "memory, coordinator:"):
        assert figure in result.stdout


def test_privacy_plan_prints_the_table_and_draws_it(tmp_path: Path) -> None:
    plot = tmp_path / "plan.png"
    result = _fedkube("privacy", "plan", str(REPO / "examples" / "mnist-dp.yaml"),
                      "--plot", str(plot), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "noise multiplier" in result.stdout and "rounds within target" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_privacy_plan_utility_trial_pairs_accuracy_with_epsilon(tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.yaml", "plan-utility", model="mlp",
                    data={"dataset": "digits"}, rounds=4, clientsPerRound=2, minClients=2,
                    simulation={"clients": 2}, learningRate=0.1,
                    privacy={"mode": "central", "targetEpsilon": 8.0})
    result = _fedkube("privacy", "plan", str(job), "--utility", "--utility-rounds", "1",
                      "--sample", "300", timeout=280)
    assert result.returncode == 0, result.stderr
    rows = result.stdout.split("utility trial")[1].splitlines()[2:]
    assert len(rows) == 3 and all(len(row.split()) == 5 for row in rows), result.stdout


def test_privacy_plan_of_a_job_without_privacy_names_the_field(tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.yaml", "no-dp", model="mlp")
    result = _fedkube("privacy", "plan", str(job), timeout=60)
    assert result.returncode == 2 and "spec.privacy.mode" in result.stderr
