"""A client of our own making, straight from the generated stubs: it sends what a
well-behaved agent never would. Imported as `rawclient` (tests/ is on sys.path).

Each scenario runs a real coordinator (`RoundEngine` + `serve`) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from fedkube.runtime import wire
from fedkube.runtime.coordinator.engine import RoundEngine
from fedkube.runtime.coordinator.events import Event
from fedkube.runtime.coordinator.server import TlsFiles, serve
from fedkube.runtime.proto import fedkube_pb2 as pb
from fedkube.runtime.proto import fedkube_pb2_grpc as pb_grpc
from fedkube.runtime.spec import FederatedJobStatus, parse_job
from support import RecordingSink

Weights = dict[str, torch.Tensor]


def job(name: str, **spec: Any):
    base = {"model": "mlp", "data": {"dataset": "digits"}, "rounds": 1, "minClients": 1,
            "roundTimeoutSeconds": 60}
    return parse_job({"apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
                      "metadata": {"name": name}, "spec": {**base, **spec}})


async def chunks(header: pb.UpdateHeader, tensors: Weights) -> AsyncIterator[pb.UpdateChunk]:
    yield pb.UpdateChunk(header=header)
    for chunk in wire.to_chunks(tensors, model_version=header.model_version):
        yield pb.UpdateChunk(tensor=chunk)


def filled(weights: Weights, value: float) -> Weights:
    return {k: torch.full_like(v, value) if v.is_floating_point() else torch.zeros_like(v)
            for k, v in weights.items()}


@dataclass
class Coordinator:
    """A running coordinator: its engine, its port and the job's end."""

    engine: RoundEngine
    port: int
    finished: asyncio.Task[FederatedJobStatus]
    initial: Weights
    sink: RecordingSink

    def untouched(self) -> bool:
        return all(torch.equal(self.engine.weights[k], self.initial[k]) for k in self.initial)

    def moved(self) -> Weights:
        return {k: self.engine.weights[k] - self.initial[k] for k in self.initial}

    def when(self, predicate: Callable[[Event], bool]) -> asyncio.Event:
        """An asyncio.Event set once an event on the engine's stream matches."""
        seen = asyncio.Event()
        self.engine.events.subscribe(lambda event: predicate(event) and seen.set())
        return seen


async def start(spec_job, *, tls: TlsFiles | None = None, **engine_options: Any) -> Coordinator:
    sink = RecordingSink()
    engine = RoundEngine(spec_job, sink=sink, **engine_options)
    initial = {k: v.clone() for k, v in engine.weights.items()}
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    finished = asyncio.create_task(serve(engine, host="127.0.0.1", port=0, tls=tls,
                                         on_bound=bound))
    return Coordinator(engine, await bound, finished, initial, sink)


@dataclass
class RawClient:
    """One node id with its session, its channel and its open task stream."""

    stub: pb_grpc.CoordinatorStub
    node_id: str
    session: str
    tasks: Any = None
    plan: pb.TrainPlan | None = None
    outcomes: list[Any] = field(default_factory=list)

    @classmethod
    async def join(cls, channel: grpc.aio.Channel, node_id: str, *, samples: int = 10,
                   session: str = "") -> RawClient:
        stub = pb_grpc.CoordinatorStub(channel)
        reply = await stub.Register(pb.RegisterRequest(
            node_id=node_id, session=session, facts=pb.DeviceFacts(num_samples=samples)))
        return cls(stub, reply.node_id, reply.session)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("fedkube-session", self.session),)

    def open(self) -> RawClient:
        """Open the task stream (the node counts as live from then on)."""
        if self.tasks is None:
            self.tasks = self.stub.StreamTasks(pb.StreamTasksRequest(node_id=self.node_id),
                                               metadata=self.metadata)
        return self

    async def next_task(self) -> pb.Task:
        self.open()
        task = await self.tasks.read()
        if task.kind == pb.Task.TRAIN:
            self.plan = task.plan
        return task

    def header(self, **changes: Any) -> pb.UpdateHeader:
        assert self.plan is not None
        fields = {"node_id": self.node_id, "round": self.plan.round, "payload": "delta",
                  "model_version": self.plan.model_version, "num_samples": 10, **changes}
        return pb.UpdateHeader(**fields)

    async def submit(self, tensors: Weights, **changes: Any) -> Any:
        """'accepted' or (status code, details)."""
        try:
            await self.stub.SubmitUpdate(chunks(self.header(**changes), tensors),
                                         metadata=self.metadata)
            return "accepted"
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details()

    def leave(self) -> None:
        if self.tasks is not None:
            self.tasks.cancel()


async def drain_stream(call: Any) -> tuple[grpc.StatusCode, str] | str:
    """Read a server stream to its end: 'accepted' or (code, details)."""
    try:
        async for _ in call:
            pass
        return "accepted"
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details()


async def finish(coordinator: Coordinator, *clients: RawClient) -> FederatedJobStatus:
    for client in clients:
        client.leave()
    with contextlib.suppress(asyncio.CancelledError):
        return await asyncio.wait_for(coordinator.finished, timeout=90)
    raise AssertionError("the coordinator was cancelled")
