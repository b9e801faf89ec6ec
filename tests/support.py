"""Helpers shared by the test suites: real processes of our own CLI, never stand-ins.

Imported as `support` (pytest puts tests/ on sys.path through tests/conftest.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def fedkube_command(*args: str) -> list[str]:
    """The `fedkube` CLI as a child process (-P: the repo's operator/ must not shadow the
    stdlib when the working directory is the repository)."""
    return [sys.executable, "-P", "-m", "fedkube.runtime.cli", *args]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               FEDKUBE_TORCH_THREADS="1")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_job(path: Path, name: str, **spec: object) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
        "metadata": {"name": name}, "spec": spec}))
    return path


class Processes:
    """Starts children with logs in a folder; kills whatever is left at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, command: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                 env=child_env(**env), cwd=self.root)
        child.log_path = self.root / f"{name}.log"  # type: ignore[attr-defined]
        self.children.append(child)
        return child

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
        for child in self.children:
            child.wait(timeout=10)
