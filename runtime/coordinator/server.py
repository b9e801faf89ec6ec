"""The gRPC servicer: it only translates. Each request becomes a call on the RoundEngine;
every refusal becomes a gRPC status with a message, never a crash."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from .. import wire
from ..proto import fedkube_pb2 as pb
from ..proto import fedkube_pb2_grpc as pb_grpc
from ..spec import FederatedJobStatus
from .engine import RoundEngine, UpdateRejected

log = logging.getLogger("fedkube.coordinator")

# Updates larger than a chunk are streamed; this only bounds a single message.
MAX_MESSAGE_BYTES = wire.MAX_MESSAGE_BYTES
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

_REJECTION_CODES = {
    "unknown_node": grpc.StatusCode.NOT_FOUND,
    "wrong_round": grpc.StatusCode.FAILED_PRECONDITION,
    "wrong_version": grpc.StatusCode.FAILED_PRECONDITION,
    "not_selected": grpc.StatusCode.FAILED_PRECONDITION,
    "duplicate": grpc.StatusCode.ALREADY_EXISTS,
    "budget": grpc.StatusCode.PERMISSION_DENIED,
}


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, engine: RoundEngine) -> None:
        self.engine = engine

    async def Register(self, request: pb.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> pb.RegisterReply:
        try:
            client = self.engine.register(request)
        except PermissionError as error:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        log.info("registered %s (%s, %d samples)", client.node_id, client.spec.device.value,
                 client.spec.data_size)
        return pb.RegisterReply(
            node_id=client.node_id,
            job_name=self.engine.name,
            job_spec_json=self.engine.spec.model_dump_json(by_alias=True, exclude_none=True),
            heartbeat_interval_seconds=self.engine.HEARTBEAT_SECONDS,
            num_simulated_clients=self.engine.spec.simulation.clients,
            input_shape=list(self.engine.dataset.input_shape),
            num_classes=self.engine.dataset.num_classes,
        )

    async def Heartbeat(self, request: pb.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> pb.HeartbeatReply:
        try:
            self.engine.heartbeat(request.node_id, request.state, request.epsilon_spent)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown node {request.node_id!r}: register first")
        return pb.HeartbeatReply(job_running=self.engine.job_running(),
                                 round=self.engine.round)

    async def StreamTasks(self, request: pb.StreamTasksRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Task]:
        client = self.engine.registry.get(request.node_id)
        if client is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown node {request.node_id!r}: register first")
        # A fresh queue per stream: tasks queued for a dead stream must not leak here.
        client.tasks = asyncio.Queue()
        self.engine.stream_opened(client)
        queue = client.tasks
        try:
            while True:
                task = await queue.get()
                yield task
                if task.kind == pb.Task.STOP:
                    return
        finally:
            if client.tasks is queue:
                self.engine.stream_closed(client)

    async def GetModel(self, request: pb.GetModelRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TensorChunk]:
        try:
            chunks = self.engine.model_chunks(request.node_id, request.model_version)
        except UpdateRejected as rejection:
            await context.abort(_REJECTION_CODES.get(rejection.reason,
                                                     grpc.StatusCode.INVALID_ARGUMENT),
                                str(rejection))
        for chunk in chunks:
            yield chunk

    async def SubmitUpdate(self, request_iterator: AsyncIterator[pb.UpdateChunk],
                           context: grpc.aio.ServicerContext) -> pb.SubmitReply:
        try:
            return await self._submit(request_iterator)
        except UpdateRejected as rejection:
            if self.engine.metrics is not None:
                self.engine.metrics.update_rejected(rejection.reason)
            log.warning("rejected update: %s", rejection)
            await context.abort(_REJECTION_CODES.get(rejection.reason,
                                                     grpc.StatusCode.INVALID_ARGUMENT),
                                str(rejection))

    async def _submit(self, chunks: AsyncIterator[pb.UpdateChunk]) -> pb.SubmitReply:
        iterator = aiter(chunks)
        first = await anext(iterator, None)
        if first is None or not first.HasField("header"):
            raise UpdateRejected("malformed", "an update must start with an UpdateHeader")
        header = first.header
        self.engine.check_header(header)
        if header.payload == "refusal":
            self.engine.record_refusal(header)
            return pb.SubmitReply(accepted=True, message="refusal recorded")
        async with self.engine.upload_slots:
            assembler = self.engine.assembler()
            try:
                async for part in iterator:
                    if not part.HasField("tensor"):
                        raise UpdateRejected("malformed", "a second UpdateHeader in one update")
                    assembler.add(part.tensor)
                delta = assembler.finish()
            except wire.WireError as error:
                reason = "non_finite" if "NaN" in str(error) else (
                    "oversize" if "exceeds" in str(error) else "malformed")
                raise UpdateRejected(reason, str(error)) from None
            await self.engine.accept_update(header, delta, assembler.bytes_received)
        return pb.SubmitReply(accepted=True, message=f"round {header.round} update accepted")


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path


async def serve(
    engine: RoundEngine,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: TlsFiles | None = None,
    on_bound: asyncio.Future[int] | None = None,
    grace: float = 1.0,
) -> FederatedJobStatus:
    """Owns the server's life: build, bind, start, run the job, stop in `finally`."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(engine), server)
    address = f"{host}:{port}"
    if tls is not None:
        credentials = grpc.ssl_server_credentials(
            [(tls.key.read_bytes(), tls.cert.read_bytes())])
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    await server.start()
    log.info("coordinator for %s listening on %s:%d", engine.name, host, bound)
    if on_bound is not None:
        on_bound.set_result(bound)
    try:
        status = await engine.run()
        # Let agents read their STOP task before the server goes away.
        await asyncio.sleep(0.2)
        return status
    finally:
        await server.stop(grace)
