"""The agent's loop: register, heartbeat, take tasks, train, upload; reconnect with
backoff whenever the coordinator goes away. All I/O of the agent is here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import signal
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from .. import logs, wire
from ..messages import SESSION_METADATA, Heartbeat, Payload, Registration, TaskKind, UpdateHeader
from ..plan import TrainPlan
from ..privacy.central import add_gaussian_noise, clip_update
from ..proto import fedkube_pb2 as pb
from ..proto import fedkube_pb2_grpc as pb_grpc
from ..secagg import ProtocolError, SecAggClient, to_wire
from ..training import TrainingDiverged, pick_device
from ..wire import convert
from .facts import device_facts
from .trainer import LocalTrainer, Refusal

log = logging.getLogger("fedkube.agent")

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Reconnect within a few seconds of a coordinator restart, not gRPC's default two
    # minutes of exponential backoff.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 3000),
]

# Errors after which the agent reconnects instead of giving up.
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@dataclass(frozen=True)
class AgentConfig:
    coordinator: str
    node_id: str = ""
    device: str = "auto"
    data_path: str | None = None
    simulated_index: int | None = None
    state_dir: Path = Path.home() / ".fedkube"
    join_token: str = ""
    tls_ca: Path | None = None  # verify the coordinator's certificate against this CA
    # mTLS: this node's certificate (its subject CN is the node id) and private key
    tls_cert: Path | None = None
    tls_key: Path | None = None
    labels: dict[str, str] = field(default_factory=dict)
    max_backoff: float = 10.0
    give_up_after: float | None = None  # seconds without a coordinator; None: never
    network: LinkLimits | None = None  # simulated link (spec.simulation.network)


@dataclass(frozen=True)
class LinkLimits:
    """A simulated client's link: bandwidth each way (bits/s, None: unlimited) and the
    one-way latency added to every transfer."""

    uplink_bits_per_second: float | None = None
    downlink_bits_per_second: float | None = None
    latency_seconds: float = 0.0


class JobEnded(Exception):
    """The coordinator said STOP."""


class Disconnected(Exception):
    """The task stream ended without a STOP: the coordinator went away."""


def _channel(config: AgentConfig) -> grpc.aio.Channel:
    if config.tls_ca is not None or config.tls_cert is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=config.tls_ca.read_bytes() if config.tls_ca else None,
            private_key=config.tls_key.read_bytes() if config.tls_key else None,
            certificate_chain=config.tls_cert.read_bytes() if config.tls_cert else None)
        return grpc.aio.secure_channel(config.coordinator, credentials, options=GRPC_OPTIONS)
    return grpc.aio.insecure_channel(config.coordinator, options=GRPC_OPTIONS)


#: Where downloaded models are received, shared by the agents of this process: one
#: model's worth of memory stays mapped between rounds instead of being faulted in afresh
#: by every download (runtime/wire/buffers.py).
DOWNLOAD_BUFFERS = wire.BufferPool(max_bytes=0)


def coordinator_stub(channel: grpc.aio.Channel) -> pb_grpc.CoordinatorStub:
    """The generated stub, except for the two calls whose chunks travel pre-serialised
    (wire.serialized_update_chunks), the plain update and the masked input, and GetModel,
    whose chunks are parsed without copying their payload (wire.parse_tensor_chunk)."""
    stub = pb_grpc.CoordinatorStub(channel)
    stub.GetModel = channel.unary_stream(
        "/fedkube.v1.Coordinator/GetModel",
        request_serializer=pb.GetModelRequest.SerializeToString,
        response_deserializer=wire.parse_tensor_chunk)
    stub.SubmitUpdate = channel.stream_unary(
        "/fedkube.v1.Coordinator/SubmitUpdate", request_serializer=wire.serialize,
        response_deserializer=pb.SubmitReply.FromString)
    stub.SecAggMaskedInput = channel.stream_unary(
        "/fedkube.v1.Coordinator/SecAggMaskedInput", request_serializer=wire.serialize,
        response_deserializer=pb.SecAggUnmaskRequest.FromString)
    return stub


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.device = pick_device(None if config.device == "auto" else config.device)
        self.node_id = config.node_id
        self.trainer: LocalTrainer | None = None
        self.state = "idle"
        # The credential Register returned for node_id, kept in the state folder: an agent
        # restarted with the same id proves it is the same node (and keeps its budget).
        self.session = self._saved_session()
        self.registered_once = False
        self.last_contact = 0.0  # loop time of the last call the coordinator answered
        self.uplink_bytes_per_second = 0.0  # measured on the last upload
        self.heartbeat_seconds = 2.0  # the coordinator's Admission sets it
        # The last global model downloaded, kept under spec.compression.downlink delta so
        # the next download can be the change from it: (version, weights).
        self.held_model: tuple[int, dict[str, torch.Tensor]] | None = None

    def _session_file(self) -> Path:
        return self.config.state_dir / "sessions" / f"{self.node_id}.session"

    def _saved_session(self) -> str:
        if not self.node_id:
            return ""
        try:
            return self._session_file().read_text().strip()
        except OSError:
            return ""

    def _save_session(self) -> None:
        path = self._session_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.touch(mode=0o600)
            tmp.write_text(self.session)
            tmp.replace(path)
        except OSError as error:  # a read-only state folder costs only restarts
            log.warning("cannot keep the session credential in %s: %s", path, error)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return ((SESSION_METADATA, self.session),)

    def _contact(self) -> None:
        self.last_contact = asyncio.get_running_loop().time()

    async def run(self) -> int:
        """Returns the process exit code: 0 when the job ended, 2 when refused for good."""
        backoff = 0.5
        loop = asyncio.get_running_loop()
        logs.bind(node=self.node_id or None)  # this agent's task: every line names its node
        self._contact()
        while True:
            try:
                async with _channel(self.config) as channel:
                    stub = coordinator_stub(channel)
                    await self._register(stub)
                    backoff = 0.5
                    await self._serve(stub)
            except JobEnded as ended:
                log.info("job ended: %s", ended)
                return 0
            except grpc.aio.AioRpcError as error:
                if error.code() not in _TRANSIENT:
                    log.error("coordinator refused this agent: %s: %s", error.code().name,
                              error.details())
                    return 2
                log.warning("coordinator unreachable (%s); retrying in %.1fs",
                            error.code().name, backoff)
            except Disconnected:
                log.warning("coordinator closed the task stream; retrying in %.1fs", backoff)
            # From the last answer of any call, not the last registration: an agent that
            # trained for an hour is not "gone" for an hour when the coordinator restarts.
            gone_for = loop.time() - self.last_contact
            if self.config.give_up_after is not None and gone_for > self.config.give_up_after:
                log.error("no coordinator for %.0fs; giving up", gone_for)
                return 1
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            # Until it first registers, an agent is most likely waiting for a coordinator
            # that is still starting (`fedkube run` starts agents and coordinator together):
            # it keeps knocking every second or so instead of backing off to max_backoff.
            ceiling = (self.config.max_backoff if self.registered_once
                       else min(1.0, self.config.max_backoff))
            backoff = min(ceiling, backoff * 2)

    def _registration(self, samples: int) -> pb.RegisterRequest:
        return convert.registration_to_pb(Registration(
            node_id=self.node_id, join_token=self.config.join_token,
            facts=device_facts(self.device, labels=self.config.labels, num_samples=samples),
            simulated_index=self.config.simulated_index, session=self.session))

    async def _register(self, stub: pb_grpc.CoordinatorStub) -> None:
        samples = self.trainer.num_samples if self.trainer else 0
        admission = convert.admission_from_pb(
            await stub.Register(self._registration(samples), timeout=30))
        self._contact()
        if self.node_id and admission.node_id != self.node_id:
            log.warning("node id %s is held by another session; joined as %s", self.node_id,
                        admission.node_id)
        self.node_id, self.session = admission.node_id, admission.session
        if admission.heartbeat_interval_seconds > 0:
            self.heartbeat_seconds = admission.heartbeat_interval_seconds
        logs.bind(job=admission.job.job_name, node=self.node_id)
        self._save_session()
        if self.trainer is None:
            self.trainer = await asyncio.to_thread(
                LocalTrainer.create, job=admission.job, node_id=self.node_id,
                device=self.device, simulated_index=self.config.simulated_index,
                data_path=self.config.data_path, state_dir=self.config.state_dir)
            # Tell the coordinator how much data we hold now that it is loaded.
            again = convert.admission_from_pb(
                await stub.Register(self._registration(self.trainer.num_samples), timeout=30))
            self.session = again.session
            self._save_session()
        self.registered_once = True
        log.info("registered as %s for job %s", self.node_id, admission.job.job_name)

    async def _serve(self, stub: pb_grpc.CoordinatorStub) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(stub))
        try:
            async for message in stub.StreamTasks(pb.StreamTasksRequest(node_id=self.node_id),
                                                  metadata=self._metadata()):
                self._contact()
                task = convert.task_from_pb(message)
                if task.kind is TaskKind.STOP:
                    raise JobEnded(task.reason or "stopped")
                assert task.plan is not None
                with logs.bound(round=task.plan.round):
                    await self._handle(stub, task.plan)
            raise Disconnected("task stream ended")
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await heartbeat

    async def _heartbeat(self, stub: pb_grpc.CoordinatorStub) -> None:
        while True:
            epsilon = self.trainer.epsilon_spent() if self.trainer else 0.0
            try:
                await stub.Heartbeat(convert.heartbeat_to_pb(Heartbeat(
                    node_id=self.node_id, state=self.state, epsilon_spent=epsilon)), timeout=10,
                    metadata=self._metadata())
                self._contact()
            except grpc.aio.AioRpcError as error:
                log.debug("heartbeat failed: %s", error.code().name)
            await asyncio.sleep(self.heartbeat_seconds)

    async def _handle(self, stub: pb_grpc.CoordinatorStub, plan: TrainPlan) -> None:
        assert self.trainer is not None
        loop = asyncio.get_running_loop()
        if self.trainer.drops_out(plan):
            log.info("round %d: simulated dropout, not answering", plan.round)
            return
        index, job = self.config.simulated_index, self.trainer.job
        if not plan.drills.online(index, now=time.time(), seed=job.seed):
            log.info("round %d: offline (availability drill), not answering", plan.round)
            return
        if plan.secure is not None:
            # Keys first: the advertise phase is short, a DP calibration may not be.
            await self._secure(stub, plan)
            return
        refusal = await asyncio.to_thread(self.trainer.refusal, plan)
        if refusal is not None:
            await self._refuse(stub, plan, refusal)
            return
        self.state = "training"
        try:
            # The version this update is built on: under strategy.mode async the
            # coordinator serves its newest model, which may be newer than the task's.
            version, global_weights = await self._download(stub, plan)
            try:
                started = time.monotonic()
                result = await asyncio.to_thread(self.trainer.train, plan, global_weights)
                slowdown = plan.drills.slowdown_of(
                    index, clients=job.num_simulated_clients, seed=job.seed)
                if slowdown > 1:  # the speed drill: this device computes `slowdown`x slower
                    await asyncio.sleep((time.monotonic() - started) * (slowdown - 1))
            except TrainingDiverged as error:
                # Nothing useful to send; say so rather than let the round wait for us.
                await self._refuse(stub, plan, Refusal(
                    reason=f"local training diverged: {error}",
                    epsilon=self.trainer.epsilon_spent(), delta=0.0))
                return
            self.state = "uploading"
            compressor = self.trainer.compressor
            setting = compressor.setting(result.delta_weights, plan.compression,
                                         bytes_per_second=self.uplink_bytes_per_second)
            compressed = await asyncio.to_thread(compressor.compress, result.delta_weights,
                                                 setting)
            header = UpdateHeader(
                node_id=self.node_id, round=plan.round, model_version=version,
                payload=Payload.DELTA, num_samples=result.num_samples, metrics=result.metrics,
                epsilon_spent=result.epsilon, delta=result.delta,
                compression=setting.describe(),
                uplink_bytes_per_second=self.uplink_bytes_per_second,
                upload_bytes=compressed.sent_bytes)
            started = loop.time()
            reply = await stub.SubmitUpdate(
                _update_stream(header, compressed.parts, self.config.network),
                metadata=self._metadata())
            seconds = loop.time() - started
            if seconds > 0:
                self.uplink_bytes_per_second = compressed.sent_bytes / seconds
            self._contact()
            log.info("round %d: %s (loss %.4f)", plan.round, reply.message,
                     result.metrics.get("loss", float("nan")))
        except grpc.aio.AioRpcError as error:
            # INVALID_ARGUMENT too: an update over the norm bound costs this round, not the
            # agent's place in the job.
            if error.code() in (grpc.StatusCode.FAILED_PRECONDITION,
                                grpc.StatusCode.ALREADY_EXISTS,
                                grpc.StatusCode.INVALID_ARGUMENT):
                log.warning("round %d: update not taken: %s", plan.round, error.details())
            else:
                raise
        finally:
            self.state = "idle"

    async def _download(self, stub: pb_grpc.CoordinatorStub, plan: TrainPlan
                        ) -> tuple[int, dict[str, torch.Tensor]]:
        """The global model for `plan` and its version. Under downlink delta, asked as the
        change from the model held; a delta that does not apply (corrupted, or from a
        version other than the one held) is refused and the whole model asked for."""
        held = self.held_model if plan.compression.downlink == "delta" else None
        try:
            version, weights = await self._fetch(stub, plan, held)
        except wire.WireError as error:
            if held is None:
                raise
            self.held_model = None  # it no longer matches any version the coordinator has
            log.warning("round %d: refusing the model delta from version %d (%s); asking "
                        "for the whole model", plan.round, held[0], error)
            version, weights = await self._fetch(stub, plan, None)
        # Kept only while deltas are on: otherwise the copy is memory for nothing.
        self.held_model = (version, weights) if plan.compression.downlink == "delta" else None
        return version, weights

    async def _fetch(self, stub: pb_grpc.CoordinatorStub, plan: TrainPlan,
                     held: tuple[int, dict[str, torch.Tensor]] | None
                     ) -> tuple[int, dict[str, torch.Tensor]]:
        """One GetModel. Each chunk is copied into the model's storage as it arrives:
        the messages of a whole model are never held at once."""
        assert self.trainer is not None
        network = self.config.network
        link = _Link(network.downlink_bits_per_second if network else None,
                     network.latency_seconds if network else 0.0)
        request = pb.GetModelRequest(node_id=self.node_id, model_version=plan.model_version)
        if held is not None:
            request.held_version = held[0]
        schema = self.trainer.schema
        DOWNLOAD_BUFFERS.allow(sum(spec.nbytes for spec in schema.values()))
        assembler = wire.ModelAssembler(schema, held=held[1] if held else None,
                                        held_version=held[0] if held else None,
                                        pool=DOWNLOAD_BUFFERS)
        version = plan.model_version
        async for chunk in stub.GetModel(request, metadata=self._metadata()):
            await link.pace(chunk.nbytes)
            version = chunk.model_version
            assembler.add(chunk)
        return version, assembler.finish()

    async def _secure(self, stub: pb_grpc.CoordinatorStub, plan: TrainPlan) -> None:
        """A secure round (runtime/secagg): keys and shares first, then train, then the
        masked input and the shares that unmask the sum. Nothing unmasked leaves."""
        assert self.trainer is not None and plan.secure is not None
        meta = self._metadata()
        wait = max(30.0, plan.deadline_unix - time.time()) + 60.0  # phases close server-side
        client = SecAggClient(self.node_id, plan.round,
                              quantize_bits=plan.compression.quantize_bits)
        try:
            _drill("advertise", plan.round)
            roster = convert.roster_from_pb(await stub.SecAggAdvertise(
                convert.advert_to_pb(client.advertise()), metadata=meta, timeout=wait))
            _drill("share", plan.round)
            delivery = convert.delivery_from_pb(await stub.SecAggShare(
                convert.bundle_to_pb(client.share(roster)), metadata=meta, timeout=wait))
            self._contact()
            refusal = await asyncio.to_thread(self.trainer.refusal, plan)
            if refusal is not None:  # it leaves after sharing: its masks are recovered
                await self._refuse(stub, plan, refusal)
                return
            self.state = "training"
            _, global_weights = await self._download(stub, plan)
            result = await asyncio.to_thread(self.trainer.train, plan, global_weights)
            self.state = "uploading"
            delta = result.delta_weights
            if plan.secure.clip_norm > 0:  # distributed central DP: clip, then this
                delta = clip_update(delta, max_norm=plan.secure.clip_norm)  # client's noise
            if plan.secure.noise_std > 0:
                delta = add_gaussian_noise(delta, std=plan.secure.noise_std,
                                           generator=torch.Generator().manual_seed(
                                               secrets.randbits(62)))
            flat = torch.cat([delta[name].detach().reshape(-1).to(torch.float64)
                              for name in self.trainer.schema]).numpy()
            masked = await asyncio.to_thread(client.mask, delivery, flat)
            header = UpdateHeader(
                node_id=self.node_id, round=plan.round, model_version=plan.model_version,
                payload=Payload.MASKED, num_samples=result.num_samples, metrics=result.metrics,
                epsilon_spent=result.epsilon, delta=result.delta)
            _drill("masked", plan.round)
            request = convert.unmask_request_from_pb(await stub.SecAggMaskedInput(
                _update_stream(header, {"masked": torch.from_numpy(to_wire(
                    masked.vector, client.encoding.width))}), metadata=meta, timeout=wait))
            _drill("unmask", plan.round)
            reply = await stub.SecAggUnmask(convert.unmask_response_to_pb(
                client.unmask(request)), metadata=meta, timeout=wait)
            self._contact()
            log.info("round %d: %s (loss %.4f)", plan.round, reply.message,
                     result.metrics.get("loss", float("nan")))
        except TrainingDiverged as error:
            log.warning("round %d: local training diverged, leaving the secure round: %s",
                        plan.round, error)
        except ProtocolError as error:
            log.warning("round %d: refusing the coordinator's secure-aggregation message: %s",
                        plan.round, error)
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.FAILED_PRECONDITION,
                                grpc.StatusCode.ALREADY_EXISTS,
                                grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ABORTED):
                log.warning("round %d: secure round left: %s", plan.round, error.details())
            else:
                raise
        finally:
            self.state = "idle"

    async def _refuse(self, stub: pb_grpc.CoordinatorStub, plan: TrainPlan,
                      refusal: Refusal) -> None:
        log.warning("round %d: declining: %s", plan.round, refusal.reason)
        header = UpdateHeader(
            node_id=self.node_id, round=plan.round, model_version=plan.model_version,
            payload=Payload.REFUSAL, refusal_reason=refusal.reason,
            epsilon_spent=refusal.epsilon, delta=refusal.delta)
        try:
            await stub.SubmitUpdate(_update_stream(header, {}), metadata=self._metadata())
        except grpc.aio.AioRpcError as error:
            if error.code() not in (grpc.StatusCode.FAILED_PRECONDITION,
                                    grpc.StatusCode.ALREADY_EXISTS):
                raise


# Fault drill for tests and demos of dropout recovery: FEDKUBE_SECAGG_DIE_BEFORE=PHASE:ROUND
# (advertise | share | masked | unmask) kills this agent's process with SIGKILL just
# before it would send that phase's message in that round.
DRILL_ENV = "FEDKUBE_SECAGG_DIE_BEFORE"


def _drill(phase: str, round: int) -> None:
    if os.environ.get(DRILL_ENV) == f"{phase}:{round}":
        log.warning("fault drill: dying before the %s phase of round %d", phase, round)
        os.kill(os.getpid(), signal.SIGKILL)


async def _update_stream(header: UpdateHeader, parts: Mapping[str, Any],
                         network: LinkLimits | None = None
                         ) -> AsyncIterator[pb.UpdateChunk | bytes]:
    yield pb.UpdateChunk(header=convert.header_to_pb(header))
    link = _Link(network.uplink_bits_per_second if network else None,
                 network.latency_seconds if network else 0.0)
    for part in wire.serialized_update_chunks(parts, model_version=header.model_version,
                                              chunk_bytes=link.chunk_bytes):
        await link.pace(len(part))
        yield part


class _Link:
    """A simulated link (spec.simulation.network): a message of n bytes may leave only
    once the link would have carried everything before it, at the link's rate after its
    latency; chunks are made small enough for the pacing to be smooth."""

    def __init__(self, bits_per_second: float | None, latency: float) -> None:
        self.rate = bits_per_second / 8 if bits_per_second else None
        self.latency = latency
        self.chunk_bytes = (wire.CHUNK_BYTES if self.rate is None
                            else max(16 << 10, min(wire.CHUNK_BYTES, int(self.rate / 10))))
        self.started: float | None = None
        self.sent = 0

    async def pace(self, nbytes: int) -> None:
        loop = asyncio.get_running_loop()
        if self.started is None:
            self.started = loop.time()
            if self.latency > 0:
                await asyncio.sleep(self.latency)
        if self.rate is not None:
            due = self.started + self.latency + self.sent / self.rate
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
        self.sent += nbytes


def run_agents(configs: list[AgentConfig]) -> int:
    """Run one or more agents in this process (simulation packs several per process so
    N clients need not mean N interpreters); each keeps its own channel to the coordinator.
    Returns the worst exit code."""

    async def all_agents() -> list[int]:
        return list(await asyncio.gather(*(Agent(config).run() for config in configs)))

    return max(asyncio.run(all_agents()), default=0)
