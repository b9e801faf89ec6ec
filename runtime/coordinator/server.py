"""The gRPC servicer: it only translates. Each request becomes a call on the RoundEngine;
every refusal becomes a gRPC status with a message, never a crash."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .. import logs, wire
from ..messages import SESSION_METADATA, Payload, Rejected, RejectReason, TaskKind, UpdateHeader
from ..proto import fedkube_pb2 as pb
from ..proto import fedkube_pb2_grpc as pb_grpc
from ..spec import FederatedJobStatus
from ..wire import convert
from . import identity
from .downlink import ModelDownlink
from .engine import RoundEngine

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

# The overall server ("") and the coordinator service by its full name.
HEALTH_SERVICES = ("", "fedkube.v1.Coordinator")


#: Methods whose responses may be pre-serialised bytes (`wire.serialized_chunks`).
PRESERIALISED = ("GetModel",)
#: Methods whose requests are parsed without copying tensor payloads.
ZERO_COPY = {"SubmitUpdate": wire.parse_update_chunk}


class _Handlers:
    """Collects what the generated `add_CoordinatorServicer_to_server` registers, so
    `add_servicer` can change a method's serializer before the real server sees it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def add_generic_rpc_handlers(self, handlers: tuple) -> None:
        self.calls.append(("add_generic_rpc_handlers", (handlers,)))

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.calls.append(("add_registered_method_handlers", (service, handlers)))


def add_servicer(servicer: pb_grpc.CoordinatorServicer, server: grpc.aio.Server) -> None:
    """`add_CoordinatorServicer_to_server`, with the methods in PRESERIALISED taking
    `wire.serialize` as their response serializer (bytes pass as they are) and those in
    ZERO_COPY their request deserializer (SubmitUpdate's chunks: `wire.ReceivedChunk`)."""
    handlers = _Handlers()
    pb_grpc.add_CoordinatorServicer_to_server(servicer, handlers)
    by_method = next(args[1] for name, args in handlers.calls
                     if name == "add_registered_method_handlers")
    for method in PRESERIALISED:
        by_method[method] = by_method[method]._replace(response_serializer=wire.serialize)
    for method, parse in ZERO_COPY.items():
        by_method[method] = by_method[method]._replace(request_deserializer=parse)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "fedkube.v1.Coordinator", by_method),))
    server.add_registered_method_handlers("fedkube.v1.Coordinator", by_method)


async def _abort(context: grpc.aio.ServicerContext, rejection: Rejected) -> NoReturn:
    await context.abort(grpc.StatusCode[rejection.reason.code], str(rejection))
    raise AssertionError("context.abort returns by raising")


def _session(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_METADATA:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """Each RPC: protobuf in, `wire.convert` to domain, one call on the engine, domain back
    to protobuf; a `Rejected` becomes the gRPC status its reason names."""

    def __init__(self, engine: RoundEngine, *, client_certificates: bool = False) -> None:
        self.engine = engine
        compression = engine.spec.compression
        self.model = ModelDownlink(deltas=compression.downlink == "delta",
                                   lossless=compression.downlink_lossless)
        # mTLS: the client certificate's CN is the node id (see identity.py).
        self.client_certificates = client_certificates

    def _authenticate(self, node_id: str, context: grpc.aio.ServicerContext) -> None:
        # Each RPC runs in a task of its own: its log lines name the job and the node.
        logs.bind(job=self.engine.name, node=node_id or None)
        if self.client_certificates:
            identity.bind(node_id, identity.certified_id(context.auth_context()))
        self.engine.authenticate(node_id, _session(context))

    async def Register(self, request: pb.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> pb.RegisterReply:
        try:
            registration = convert.registration_from_pb(request)
            logs.bind(job=self.engine.name, node=registration.node_id or None)
            if self.client_certificates:
                registration = dataclasses.replace(registration, node_id=identity.bind(
                    registration.node_id, identity.certified_id(context.auth_context())))
            admission = self.engine.register(registration, certified=self.client_certificates)
        except Rejected as rejection:
            self.engine.refused(request.node_id, rejection)
            await _abort(context, rejection)
        return convert.admission_to_pb(admission)

    async def Heartbeat(self, request: pb.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> pb.HeartbeatReply:
        try:
            self._authenticate(request.node_id, context)
            ack = self.engine.heartbeat(convert.heartbeat_from_pb(request))
        except Rejected as rejection:
            self.engine.refused(request.node_id, rejection)
            await _abort(context, rejection)
        return convert.ack_to_pb(ack)

    async def StreamTasks(self, request: pb.StreamTasksRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Task]:
        try:
            self._authenticate(request.node_id, context)
            queue = self.engine.open_stream(request.node_id)
        except Rejected as rejection:
            self.engine.refused(request.node_id, rejection)
            await _abort(context, rejection)
        try:
            while True:
                task = await queue.get()
                yield convert.task_to_pb(task)
                if task.kind is TaskKind.STOP:
                    return
        finally:
            self.engine.close_stream(request.node_id, queue)

    async def GetModel(self, request: pb.GetModelRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            self._authenticate(request.node_id, context)
            version, weights = self.engine.model_for(request.node_id, request.model_version)
        except Rejected as rejection:
            self.engine.refused(request.node_id, rejection)
            await _abort(context, rejection)
        held = request.held_version if request.HasField("held_version") else None
        download = await self.model.download(version, weights, held=held)
        self.engine.model_sent(download.nbytes)
        for chunk in download.chunks:
            yield chunk

    async def SubmitUpdate(self, request_iterator: AsyncIterator[wire.ReceivedChunk],
                           context: grpc.aio.ServicerContext) -> pb.SubmitReply:
        node_id = ""
        try:
            iterator = aiter(request_iterator)
            first = await self.engine.uploads.first(iterator)
            if first is None or not first.HasField("header"):
                raise Rejected(RejectReason.MALFORMED, "an update must start with an UpdateHeader")
            header = convert.header_from_pb(first.header)
            node_id = header.node_id
            self._authenticate(node_id, context)
            logs.bind(round=header.round)
            return await self._submit(header, iterator)
        except Rejected as rejection:
            self.engine.refused(node_id, rejection)
            await _abort(context, rejection)

    async def _submit(self, header: UpdateHeader,
                      chunks: AsyncIterator[wire.ReceivedChunk]) -> pb.SubmitReply:
        self.engine.admit(header)
        if header.payload is Payload.REFUSAL:
            self.engine.record_refusal(header)
            return pb.SubmitReply(accepted=True, message="refusal recorded")
        uploads = self.engine.uploads
        room = uploads.reservation(header.upload_bytes)
        declared = room < uploads.slot_bytes  # a smaller room than a whole model's
        async with uploads.slot(header.node_id, room):
            # Fresh memory, not a BufferPool's: a spare upload kept mapped would sit beside
            # the running sum and the round's mean at close, 4x the model instead of 3x.
            assembler = wire.TensorAssembler(self.engine.schema,
                                             max_bytes=room if declared else None)
            try:
                async for part in uploads.rest(chunks):
                    if not part.HasField("tensor"):
                        raise Rejected(RejectReason.MALFORMED,
                                       "a second UpdateHeader in one update")
                    assembler.add(part)
                delta = assembler.finish()
            except wire.WireError as error:
                if declared and error.reason is RejectReason.OVERSIZE:
                    raise Rejected(error.reason, f"{error} (its header's upload_bytes "
                                   f"declared {header.upload_bytes})") from None
                raise Rejected(error.reason, str(error)) from None
            await self.engine.accept_update(header, delta, assembler.bytes_received)
            del delta, assembler  # released before the next upload takes the slot
        return pb.SubmitReply(accepted=True, message=f"round {header.round} update accepted")

    # ------------------------------------------------------ secure aggregation

    async def SecAggAdvertise(self, request: pb.SecAggAdvert,
                              context: grpc.aio.ServicerContext) -> pb.SecAggRoster:
        try:
            self.engine.authenticate(request.node_id, _session(context))
            stage = self.engine.secure_stage(request.node_id)
            roster = await stage.advertise(convert.advert_from_pb(request))
        except Rejected as rejection:
            self.engine.refused(request.node_id, rejection)
            await _abort(context, rejection)
        return convert.roster_to_pb(roster)

    async def SecAggShare(self, request: pb.SecAggShareBundle,
                          context: grpc.aio.ServicerContext) -> pb.SecAggDelivery:
        try:
            self.engine.authenticate(request.node_id, _session(context))
            stage = self.engine.secure_stage(request.node_id)
            delivery = await stage.share(convert.bundle_from_pb(request))
        except Rejected as rejection:
            self.engine.refused(request.node_id, rejection)
            await _abort(context, rejection)
        return convert.delivery_to_pb(delivery)

    async def SecAggMaskedInput(self, request_iterator: AsyncIterator[pb.UpdateChunk],
                                context: grpc.aio.ServicerContext) -> pb.SecAggUnmaskRequest:
        node_id = ""
        try:
            iterator = aiter(request_iterator)
            first = await self.engine.uploads.first(iterator)
            if first is None or not first.HasField("header"):
                raise Rejected(RejectReason.MALFORMED,
                               "a masked input must start with an UpdateHeader")
            header = convert.header_from_pb(first.header)
            node_id = header.node_id
            self.engine.authenticate(node_id, _session(context))
            if header.payload is not Payload.MASKED:
                raise Rejected(RejectReason.MALFORMED, "SecAggMaskedInput takes payload 'masked'")
            self.engine.admit(header)
            stage = self.engine.secure_stage(node_id)
            width = stage.wire_width()
            schema = {"masked": wire.TensorSpec((stage.length * width,), "uint8")}
            async with self.engine.uploads.slot(node_id):
                assembler = wire.TensorAssembler(schema)
                try:
                    async for part in self.engine.uploads.rest(iterator):
                        if not part.HasField("tensor"):
                            raise Rejected(RejectReason.MALFORMED,
                                           "a second UpdateHeader in one masked input")
                        assembler.add(part.tensor)
                    vector = stage.from_wire(assembler.finish()["masked"].numpy())
                except wire.WireError as error:
                    raise Rejected(error.reason, str(error)) from None
            request = await self.engine.accept_masked(header, vector, assembler.bytes_received)
        except Rejected as rejection:
            self.engine.refused(node_id, rejection)
            await _abort(context, rejection)
        return convert.unmask_request_to_pb(request)

    async def SecAggUnmask(self, request: pb.SecAggUnmaskResponse,
                           context: grpc.aio.ServicerContext) -> pb.SubmitReply:
        try:
            self.engine.authenticate(request.node_id, _session(context))
            stage = self.engine.secure_stage(request.node_id)
            await stage.unmask(convert.unmask_response_from_pb(request))
        except Rejected as rejection:
            self.engine.refused(request.node_id, rejection)
            await _abort(context, rejection)
        return pb.SubmitReply(accepted=True, message=f"round {request.round} sum released")


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None  # mTLS: require client certificates signed by this CA


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
    logs.bind(job=engine.name)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    mutual = tls is not None and tls.client_ca is not None
    add_servicer(CoordinatorServicer(engine, client_certificates=mutual), server)
    # grpc.health.v1 for the pod's probes: SERVING while the job runs, and still after it
    # ends (the server stays up to hand out STOP tasks), NOT_SERVING while shutting down.
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    address = f"{host}:{port}"
    if tls is not None:
        credentials = grpc.ssl_server_credentials(
            [(tls.key.read_bytes(), tls.cert.read_bytes())],
            root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
            require_client_auth=mutual)
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    await server.start()
    for service in HEALTH_SERVICES:
        await checks.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("coordinator for %s listening on %s:%d", engine.name, host, bound)
    if on_bound is not None:
        on_bound.set_result(bound)
    try:
        status = await engine.run()
        # Let agents read their STOP task before the server goes away.
        await asyncio.sleep(0.2)
        return status
    finally:
        await checks.enter_graceful_shutdown()
        await server.stop(grace)
