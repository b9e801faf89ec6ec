"""Each process's torch thread count: a share of the cores that leaves room for the rest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fedkube.runtime.threads import ThreadsError, choose_torch_threads, cpu_quota, usable_cpus


@pytest.mark.parametrize(("role", "cpus", "expected"), [
    ("coordinator", 1, 1), ("coordinator", 2, 1), ("coordinator", 16, 15),
    ("local", 1, 1), ("local", 16, 1),
    ("agent", 1, 1), ("agent", 8, 8),
])
def test_each_role_leaves_the_cores_others_need(role, cpus, expected) -> None:
    assert choose_torch_threads(role, cpus=cpus, env={}) == expected


def test_torchs_own_default_stays_the_ceiling() -> None:
    # 16 logical CPUs but 8 physical cores: no role starts more threads than torch would.
    assert choose_torch_threads("agent", cpus=16, env={}, ceiling=8) == 8
    assert choose_torch_threads("coordinator", cpus=16, env={}, ceiling=8) == 8
    assert choose_torch_threads("coordinator", cpus=4, env={}, ceiling=8) == 3
    assert choose_torch_threads("agent", cpus=2, env={"FEDKUBE_TORCH_THREADS": "12"},
                                ceiling=8) == 12


def test_the_environment_overrides_every_role() -> None:
    for role in ("coordinator", "local", "agent"):
        assert choose_torch_threads(role, cpus=2, env={"FEDKUBE_TORCH_THREADS": "6"}) == 6


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_override_is_refused_by_name(value: str) -> None:
    with pytest.raises(ThreadsError, match="FEDKUBE_TORCH_THREADS.*positive integer"):
        choose_torch_threads("agent", cpus=2, env={"FEDKUBE_TORCH_THREADS": value})


def test_the_container_quota_caps_the_cores(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # cgroup v2: 1.5 CPUs
    assert cpu_quota(tmp_path) == 1.5
    assert usable_cpus(tmp_path) <= 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(v1) is None


def test_the_agent_command_refuses_a_bad_override_with_a_clear_error() -> None:
    result = subprocess.run(
        [sys.executable, "-P", "-m", "fedkube.runtime.cli", "agent",
         "--coordinator", "127.0.0.1:1"],
        env={"PATH": "", "FEDKUBE_TORCH_THREADS": "lots"}, check=False, capture_output=True,
        text=True, timeout=120)
    assert result.returncode == 2
    assert "FEDKUBE_TORCH_THREADS='lots'" in result.stderr
