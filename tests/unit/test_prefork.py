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


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's new parent may not reap it at once)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_agents_do_not_outlive_the_fork_server_when_its_caller_goes(tmp_path: Path) -> None:
    # A fork server of its own (not this process's shared one): closing its request pipe
    # is what the kernel does when a `fedkube run` is SIGKILLed.
    from fedkube.runtime.local import agent_args
    from fedkube.runtime.prefork import _Server

    server = _Server()
    log = tmp_path / "agent.log"
    log.touch()
    pid = server.start({"args": agent_args(port=_unused_port(), indexes=[0],
                                           state_dir=tmp_path / "state"),
                        "log": str(log), "env": dict(os.environ), "cwd": os.getcwd()})
    _wait_for(lambda: os.getpgid(pid) == pid, timeout=60,
              what="the agent to lead its own process group")
    assert _running(pid)
    server.close()
    _wait_for(lambda: not _running(pid), timeout=60, what="the orphaned agent to stop")
