"""Mutual TLS over real gRPC on 127.0.0.1, with certificates minted in the test: a client
certificate's subject CN is the node id it may act as. The matching certificate is
admitted (and a real agent finishes the job with it); a certificate for another id is
refused PERMISSION_DENIED even with that id's session credential in hand; a connection
without a certificate, or with one from another CA, never gets past the handshake."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from certs import Authority, Issued
from fedkube.runtime.agent.client import Agent, AgentConfig
from fedkube.runtime.coordinator.server import TlsFiles
from fedkube.runtime.proto import fedkube_pb2 as pb
from fedkube.runtime.proto import fedkube_pb2_grpc as pb_grpc
from rawclient import RawClient, job, start

pytestmark = pytest.mark.timeout(180)


def _channel(port: int, ca: Path, client: Issued | None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


async def _refusal(call) -> grpc.StatusCode | str:
    try:
        await call
        return "accepted"
    except grpc.aio.AioRpcError as error:
        return error.code()


async def _scenario(folder: Path) -> dict[str, object]:
    ca, rogue = Authority(folder / "ca"), Authority(folder / "rogue", name="rogue-ca")
    server = ca.server()
    edge_a, edge_b, forged = ca.client("edge-a"), ca.client("edge-b"), rogue.client("edge-a")
    coordinator = await start(job("mtls", clientsPerRound=1, simulation={"clients": 1}),
                              registration_timeout=60,
                              tls=TlsFiles(cert=server.cert, key=server.key, client_ca=ca.cert))
    port, seen = coordinator.port, {}
    request = pb.RegisterRequest(node_id="edge-a", facts=pb.DeviceFacts(num_samples=10))
    async with _channel(port, ca.cert, edge_a) as channel:
        member = await RawClient.join(channel, "edge-a")
        seen["admitted"] = member.node_id
        # No id asked for: the certificate names it.
        seen["assigned"] = (await RawClient.join(channel, "", session=member.session)).node_id
    session = (await asyncio.wait_for(_fresh_session(port, ca.cert, edge_a), 30))
    async with _channel(port, ca.cert, edge_b) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        seen["other id"] = await _refusal(stub.Register(request))
        # A stolen session credential is no use without edge-a's certificate.
        seen["stolen session"] = await _refusal(stub.Heartbeat(
            pb.HeartbeatRequest(node_id="edge-a"), metadata=(("fedkube-session", session),)))
        seen["own id"] = (await RawClient.join(channel, "edge-b")).node_id
    for name, client in (("no certificate", None), ("other CA", forged)):
        async with _channel(port, ca.cert, client) as channel:
            seen[name] = await _refusal(pb_grpc.CoordinatorStub(channel).Register(
                request, timeout=20))
    seen["registered"] = sorted(c.node_id for c in coordinator.engine.registry.all())
    # The real agent, given edge-a's files, registers (without the old session: the
    # certificate proves it is edge-a), trains and finishes the job.
    agent = Agent(AgentConfig(coordinator=f"127.0.0.1:{port}", simulated_index=0,
                              state_dir=folder / "state", tls_ca=ca.cert, tls_cert=edge_a.cert,
                              tls_key=edge_a.key, give_up_after=60))
    seen["agent exit"] = await asyncio.wait_for(agent.run(), timeout=120)
    seen["agent id"] = agent.node_id
    status = await asyncio.wait_for(coordinator.finished, timeout=60)
    seen["phase"] = status.phase.value
    seen["refusals"] = {c.node_id: dict(c.rejections) for c in coordinator.engine.registry.all()}
    return seen


async def _fresh_session(port: int, ca: Path, client: Issued) -> str:
    """edge-a's current credential, as an eavesdropper on the node itself might hold it."""
    async with _channel(port, ca, client) as channel:
        return (await RawClient.join(channel, "edge-a")).session


def test_the_client_certificate_is_the_node_id(tmp_path: Path) -> None:
    seen = asyncio.run(_scenario(tmp_path))
    assert seen["admitted"] == seen["assigned"] == "edge-a"
    assert seen["other id"] == grpc.StatusCode.PERMISSION_DENIED
    assert seen["stolen session"] == grpc.StatusCode.PERMISSION_DENIED
    assert seen["own id"] == "edge-b"
    # Refused in the TLS handshake: the call never reaches the servicer.
    assert seen["no certificate"] == grpc.StatusCode.UNAVAILABLE
    assert seen["other CA"] == grpc.StatusCode.UNAVAILABLE
    assert seen["registered"] == ["edge-a", "edge-b"]
    assert (seen["agent exit"], seen["agent id"], seen["phase"]) == (0, "edge-a", "Succeeded")
    assert seen["refusals"]["edge-a"].get("wrong_identity") == 2
