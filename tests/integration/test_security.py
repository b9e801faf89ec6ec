"""TLS and the join token, over real gRPC: a coordinator given a certificate serves TLS,
and one given a token turns away agents that do not present it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from support import Processes, fedkube_command, free_port, write_job

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("openssl") is None,
                       reason="needs the openssl command to make a test certificate"),
]


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "tls.crt", folder / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key


def test_tls_and_join_token(tmp_path: Path, processes: Processes) -> None:
    cert, key = _self_signed(tmp_path)
    token = tmp_path / "token"
    token.write_text("s3cret-join-token\n")
    job = write_job(tmp_path / "job.yaml", "secure", model="mlp", data={"dataset": "digits"},
                    rounds=1, clientsPerRound=1, minClients=1, roundTimeoutSeconds=30)
    port, output = free_port(), tmp_path / "out"
    coordinator = processes.start("coordinator", fedkube_command(
        "coordinator", "--job", str(job), "--host", "127.0.0.1", "--port", str(port),
        "--output", str(output), "--tls-cert", str(cert), "--tls-key", str(key),
        "--join-token-file", str(token)))
    agent = ["agent", "--coordinator", f"localhost:{port}", "--tls-ca", str(cert),
             "--state-dir", str(tmp_path / "state"), "--give-up-after", "30"]

    intruder = processes.start("intruder", fedkube_command(*agent, "--node-id", "intruder"),
                               FEDKUBE_JOIN_TOKEN="wrong")
    assert intruder.wait(timeout=60) == 2  # refused for good, not retried forever
    assert "UNAUTHENTICATED" in processes.log("intruder")

    member = processes.start("member", fedkube_command(*agent, "--node-id", "member"),
                             FEDKUBE_JOIN_TOKEN="s3cret-join-token")
    assert coordinator.wait(timeout=120) == 0, processes.log("coordinator")[-3000:]
    assert member.wait(timeout=30) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert list(summary["clients"]) == ["member"]
