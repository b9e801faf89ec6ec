"""Malformed updates get a gRPC error and never touch the global model.

The coordinator runs in-process (real grpc.aio server on 127.0.0.1); the client here is a
raw gRPC stub, because the point is to send what a well-behaved agent never would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import torch
from fedkube.runtime import wire
from fedkube.runtime.coordinator.engine import RoundEngine
from fedkube.runtime.coordinator.server import serve
from fedkube.runtime.proto import fedkube_pb2 as pb
from fedkube.runtime.proto import fedkube_pb2_grpc as pb_grpc
from fedkube.runtime.spec import parse_job
from support import RecordingSink

pytestmark = pytest.mark.timeout(120)


def _job():
    return parse_job({
        "apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
        "metadata": {"name": "validation"},
        "spec": {"model": "mlp", "data": {"dataset": "digits"}, "rounds": 1,
                 "clientsPerRound": 1, "minClients": 1, "roundTimeoutSeconds": 30}})


async def _stream(header: pb.UpdateHeader, tensors: dict[str, torch.Tensor],
                  ) -> AsyncIterator[pb.UpdateChunk]:
    yield pb.UpdateChunk(header=header)
    for chunk in wire.to_chunks(tensors, model_version=header.model_version):
        yield pb.UpdateChunk(tensor=chunk)


async def _scenario() -> dict[str, object]:
    engine = RoundEngine(_job(), sink=RecordingSink(), registration_timeout=30)
    initial = {k: v.clone() for k, v in engine.weights.items()}
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve(engine, host="127.0.0.1", port=0, on_bound=bound))
    port = await bound
    outcomes: dict[str, object] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        reply = await stub.Register(pb.RegisterRequest(
            node_id="raw-client", facts=pb.DeviceFacts(num_samples=10)))
        session = (("fedkube-session", reply.session),)
        tasks = stub.StreamTasks(pb.StreamTasksRequest(node_id=reply.node_id), metadata=session)
        task = await anext(aiter(tasks))
        assert task.kind == pb.Task.TRAIN and task.plan.round == 1

        def header(**changes) -> pb.UpdateHeader:
            fields = {"node_id": "raw-client", "round": 1, "payload": "delta",
                      "model_version": task.plan.model_version, "num_samples": 10}
            fields.update(changes)
            return pb.UpdateHeader(**fields)

        zeros = {k: torch.zeros_like(v) for k, v in initial.items()}
        first = next(iter(zeros))
        attempts = {
            "nan": (header(), {**zeros, first: torch.full_like(zeros[first], float("nan"))}),
            "inf": (header(), {**zeros, first: torch.full_like(zeros[first], float("inf"))}),
            "wrong_shape": (header(), {**zeros, first: torch.zeros(3, 3)}),
            "wrong_dtype": (header(), {**zeros, first: zeros[first].double()}),
            "missing_tensor": (header(), dict(list(zeros.items())[1:])),
            "extra_tensor": (header(), {**zeros, "smuggled": torch.zeros(2)}),
            "unknown_node": (header(node_id="nobody"), zeros),
            "future_round": (header(round=7), zeros),
            "stale_version": (header(model_version=task.plan.model_version + 1), zeros),
            "no_samples": (header(num_samples=0), zeros),
            "nan_metric": (header(metrics={"loss": float("nan")}), zeros),
        }
        for name, (head, tensors) in attempts.items():
            try:
                await stub.SubmitUpdate(_stream(head, tensors), metadata=session)
                outcomes[name] = "accepted"
            except grpc.aio.AioRpcError as error:
                outcomes[name] = (error.code(), error.details())
            outcomes[f"{name}:untouched"] = all(
                torch.equal(engine.weights[k], initial[k]) for k in initial)

        headerless = pb.UpdateChunk(tensor=next(wire.to_chunks(zeros)))

        async def no_header():
            yield headerless
        try:
            await stub.SubmitUpdate(no_header(), metadata=session)
            outcomes["no_header"] = "accepted"
        except grpc.aio.AioRpcError as error:
            outcomes["no_header"] = (error.code(), error.details())

        # A good update is still accepted after all that, and it is the only one folded.
        step = {k: torch.full_like(v, 0.5) if v.is_floating_point() else torch.zeros_like(v)
                for k, v in initial.items()}
        good = await stub.SubmitUpdate(_stream(header(), step), metadata=session)
        outcomes["good"] = good.accepted
        tasks.cancel()
    status = await server
    outcomes["phase"] = status.phase.value
    outcomes["final_delta"] = {k: (engine.weights[k] - initial[k]) for k in initial}
    return outcomes


def test_bad_updates_are_refused_and_the_model_stays_bit_identical() -> None:
    outcomes = asyncio.run(_scenario())
    expected_codes = {
        "nan": grpc.StatusCode.INVALID_ARGUMENT,
        "inf": grpc.StatusCode.INVALID_ARGUMENT,
        "wrong_shape": grpc.StatusCode.INVALID_ARGUMENT,
        "wrong_dtype": grpc.StatusCode.INVALID_ARGUMENT,
        "missing_tensor": grpc.StatusCode.INVALID_ARGUMENT,
        "extra_tensor": grpc.StatusCode.INVALID_ARGUMENT,
        "unknown_node": grpc.StatusCode.NOT_FOUND,
        "future_round": grpc.StatusCode.FAILED_PRECONDITION,
        "stale_version": grpc.StatusCode.FAILED_PRECONDITION,
        "no_samples": grpc.StatusCode.INVALID_ARGUMENT,
        "nan_metric": grpc.StatusCode.INVALID_ARGUMENT,
        "no_header": grpc.StatusCode.INVALID_ARGUMENT,
    }
    for name, code in expected_codes.items():
        outcome = outcomes[name]
        assert outcome != "accepted", name
        assert outcome[0] == code, (name, outcome)
        assert outcome[1], f"{name}: the error must say why"
        if f"{name}:untouched" in outcomes:
            assert outcomes[f"{name}:untouched"], f"{name} changed the global model"
    assert "NaN" in outcomes["nan"][1]
    assert "shape" in outcomes["wrong_shape"][1]
    assert outcomes["good"] is True
    assert outcomes["phase"] == "Succeeded"
    # FedAvg of the single accepted update: the model moved by exactly that update.
    for name, moved in outcomes["final_delta"].items():
        if moved.is_floating_point():
            assert torch.allclose(moved, torch.full_like(moved, 0.5)), name
