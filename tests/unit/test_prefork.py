"""Agent processes forked from the fork server: real processes, really signalled."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from fedkube.runtime.local import AgentProcesses
from fedkube.runtime.prefork import ForkedAgent


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(condition, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_forked_agent_reports_its_exit_code_and_writes_its_log(tmp_path: Path,
                                                                  monkeypatch) -> None:
    # A manifest named relative to the caller's working directory as it is now: the
    # child runs there, not where the fork server was started.
    (tmp_path / "bad.yaml").write_text("spec: [not, a, job]\n")
    monkeypatch.chdir(tmp_path)
    agent = ForkedAgent(["validate", "bad.yaml"], log_path=tmp_path / "validate.log",
                        env=dict(os.environ))
    assert agent.wait(timeout=120) == 2
    assert agent.returncode == 2 and agent.poll() == 2
    log = (tmp_path / "validate.log").read_text()
    assert "bad.yaml" in log and "no such file" not in log


def test_stopping_agents_signals_each_in_its_own_session(tmp_path: Path) -> None:
    # Nothing listens on the port: the agent keeps retrying until it is stopped.
    agents = AgentProcesses(1, port=_unused_port(), output=tmp_path, threads=1, processes=1,
                            extra_args=())
    (agent,) = agents.processes
    _wait_for(lambda: os.getpgid(agent.pid) == agent.pid, timeout=60,
              what="the agent to lead its own process group")
    assert agent.poll() is None
    codes = agents.stop(grace=0.0)
    assert codes == [agent.returncode] and codes[0] in (-signal.SIGTERM, -signal.SIGKILL, 0)
    assert (tmp_path / "agents" / "agents-00.log").exists()
