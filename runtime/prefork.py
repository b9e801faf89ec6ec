"""Simulated agent processes forked from a server that has imported torch once.

Each agent interpreter of `fedkube run` used to import torch, grpc and pydantic itself
(2-4 CPU seconds each, most of the run's start-up on a laptop's cores). Here one fork
server (`python -m fedkube.runtime.prefork`) imports them (`AGENT_PRELOAD`) and every
agent process is a fork of it: a clean single-threaded process that never ran gRPC or an
event loop, so forking it is safe where forking the coordinator (threads, a gRPC server)
would not be. It is started on first use and serves this process until it exits (it
leaves at once when its request pipe closes), so a second run in the same interpreter
(tests, benchmarks) forks at once.

A forked agent gets what a spawned one got: its own session (so a signal to its process
group reaches all it started), the caller's environment and working directory as they
are now (not as they were when the server started), stdout and stderr in its log file.

Protocol, one JSON object a line: requests {"args", "log", "env", "cwd"} on the server's
stdin; replies {"started": pid} in request order, and {"exited": pid, "code": n} (minus
the signal number when a signal ended it, as subprocess does) whenever a child ends.
When stdin closes, the server sends SIGTERM to every agent still running, so none
outlives a `fedkube run` that was killed outright.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

AGENT_PRELOAD = (
    "torch",
    # The first optimizer of a process imports torch._dynamo: seconds, paid once here.
    "torch._dynamo",
    "grpc",
    "fedkube.runtime.cli",
    "fedkube.runtime.agent.client",
)


class ForkServerError(RuntimeError):
    """The fork server is gone or could not start an agent."""


class _Server:
    """This process's handle on the fork server: requests out, replies read by a thread."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-P", "-m", "fedkube.runtime.prefork"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env={**os.environ, "PYTHONSAFEPATH": "1"},
            # A Ctrl-C in the terminal is for `fedkube run`, which stops its agents itself.
            start_new_session=True)
        self._requests: IO[bytes] = self._process.stdin  # type: ignore[assignment]
        self._changed = threading.Condition()
        self._started: list[int] = []
        self._exit_codes: dict[int, int] = {}
        self._gone = False
        self._send = threading.Lock()
        threading.Thread(target=self._read, name="fork-server-replies", daemon=True).start()

    def _read(self) -> None:
        for line in self._process.stdout:  # type: ignore[union-attr]
            reply = json.loads(line)
            with self._changed:
                if "started" in reply:
                    self._started.append(reply["started"])
                else:
                    self._exit_codes[reply["exited"]] = reply["code"]
                self._changed.notify_all()
        with self._changed:
            self._gone = True
            self._changed.notify_all()

    def start(self, request: Mapping[str, Any]) -> int:
        with self._send:
            with self._changed:
                if self._gone:
                    raise ForkServerError("the agents' fork server has exited")
                before = len(self._started)
            try:
                self._requests.write(json.dumps(request).encode() + b"\n")
                self._requests.flush()
            except BrokenPipeError:
                raise ForkServerError("the agents' fork server has exited") from None
            with self._changed:
                self._changed.wait_for(lambda: len(self._started) > before or self._gone)
                if len(self._started) <= before:
                    raise ForkServerError("the agents' fork server exited before forking")
                return self._started[before]

    def close(self) -> None:
        """Close the request pipe and wait for the server to leave (it does at once)."""
        with self._send, contextlib.suppress(BrokenPipeError):
            self._requests.close()
        self._process.wait()

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exit_codes or self._gone, timeout)
            return self._exit_codes.get(pid)


_server: _Server | None = None
_server_lock = threading.Lock()


def start_server() -> None:
    """Start the fork server now, so that its imports overlap with the caller's own
    (`fedkube run` calls this before it imports the coordinator)."""
    _current_server()


def stop_server() -> None:
    """Stop the fork server, if one runs (`fedkube run` does before it exits, so that
    nothing it started outlives it)."""
    global _server
    with _server_lock:
        server, _server = _server, None
    if server is not None:
        server.close()


def _current_server() -> _Server:
    global _server
    with _server_lock:
        if _server is None or _server._gone:
            _server = _Server()
        return _server


class ForkedAgent:
    """One agent process, with the parts of `subprocess.Popen` that AgentProcesses uses."""

    def __init__(self, args: Sequence[str], *, log_path: Path, env: Mapping[str, str]) -> None:
        log_path.touch()  # there from the start, as a log file opened for Popen would be
        self._server = _current_server()
        self.pid = self._server.start({"args": list(args), "log": str(log_path),
                                       "env": dict(env), "cwd": os.getcwd()})
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.wait(timeout=0)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the exit; None (no exception) when `timeout` passed first."""
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid, timeout)
        return self.returncode


def _become_agent(request: Mapping[str, Any]) -> NoReturn:
    """In the forked child: `fedkube ARGS` as its own process, never returning."""
    code = 1
    try:
        # The server's pipes are its own: stdin from /dev/null, stdout and stderr logged.
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.setsid()
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        from . import cli

        code = cli.main(list(request["args"]))
    except SystemExit as leaving:  # argparse's errors, for one
        code = leaving.code if isinstance(leaving.code, int) else 1
    except Exception:  # noqa: BLE001 - a child must never return into the server loop
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _status_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def serve() -> NoReturn:
    """The fork server's loop: fork an agent per request line, report exits, and leave
    as soon as stdin closes (whoever started it is gone or done)."""
    for name in AGENT_PRELOAD:
        importlib.import_module(name)
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    reply_lock = threading.Lock()
    running = threading.Semaphore(0)

    def reply(message: Mapping[str, int]) -> None:
        with reply_lock, contextlib.suppress(BrokenPipeError):
            replies.write(json.dumps(message).encode() + b"\n")
            replies.flush()

    live: set[int] = set()
    live_lock = threading.Lock()

    def reap() -> None:
        while True:
            running.acquire()
            pid, status = os.waitpid(-1, 0)
            with live_lock:
                live.discard(pid)
            reply({"exited": pid, "code": _status_code(status)})

    threading.Thread(target=reap, name="reaper", daemon=True).start()
    for line in requests:
        request = json.loads(line)
        with reply_lock:  # so the child never inherits the lock held mid-write
            pid = os.fork()
        if pid == 0:
            _become_agent(request)
        with live_lock:
            live.add(pid)
        running.release()
        reply({"started": pid})
    # Whoever started us is done or dead (SIGKILLed, say): agents still running would be
    # left retrying a coordinator that is gone, so each one's session is told to stop.
    with live_lock:
        for pid in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)  # the agent and whatever it started
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)  # one forked so lately it has no session yet
    os._exit(0)


if __name__ == "__main__":
    serve()
