"""The `fedkube` command as a user runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support import REPO, child_env, fedkube_command, write_job

pytestmark = pytest.mark.timeout(300)


def _fedkube(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fedkube_command(*args), capture_output=True, text=True, check=False,
                          env=child_env(), timeout=timeout, cwd=REPO)


def test_demo_job_reaches_target_accuracy(tmp_path: Path) -> None:
    """README's first command: the digits demo, 10 clients, >= 0.93 test accuracy."""
    result = _fedkube("run", "examples/digits-fedavg.yaml", "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["phase"] == "Succeeded"
    assert summary["final_accuracy"] >= 0.93
    assert len(summary["clients"]) == 10
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == summary["rounds"] >= 1
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "round   1  accuracy" in result.stderr
    assert "Succeeded" in result.stdout
    assert all(code == 0 for code in summary["agent_exit_codes"])


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
        result = _fedkube(*command, timeout=60)
        assert result.returncode == 2, result
        assert f"{field}" in result.stderr and reason in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_missing_manifest_and_not_yaml(tmp_path: Path) -> None:
    missing = _fedkube("validate", str(tmp_path / "nope.yaml"), timeout=60)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: FederatedJob\nspec: [unclosed\n")
    result = _fedkube("validate", str(broken), timeout=60)
    assert result.returncode == 2 and "not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_examples_are_valid() -> None:
    for example in sorted((REPO / "examples").glob("*.yaml")):
        result = _fedkube("validate", str(example), timeout=60)
        assert result.returncode == 0, (example.name, result.stderr)
