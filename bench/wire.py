"""How fast a 47 MB update crosses the wire over loopback, against raw grpcio moving the
same bytes in the same run.

A coordinator-shaped gRPC server runs in its own process on 127.0.0.1: the `Coordinator`
service's `GetModel` and `SubmitUpdate` with the coordinator's GRPC_OPTIONS, serving the
model as the engine does (its chunk messages built once per model version) and taking an
update as the servicer does (an UpdateHeader, then every chunk through `TensorAssembler`
with all its checks: names, shapes, dtypes, sizes, order, oversize, finite values). The client, in this process with the agent's
GRPC_OPTIONS and stub, downloads the model into a `TensorAssembler` (the agent's reused
buffers) and uploads it with `serialized_update_chunks`. The figure counts payload bytes over
wall time from the call to the assembled, checked tensors (or the server's reply).

The baseline is raw grpcio on the same server and channel: the same bytes in messages of
the same size, with identity (de)serializers, neither side doing anything with them.
With `flwr` importable, Flower's own (de)serialization (`ndarrays_to_parameters`,
`parameters_to_ndarrays`) is timed on the same tensors and added to the raw transfer time
(Flower sends its Parameters in one gRPC message, which raw grpcio's figure bounds); a
note says so when flwr is missing.

    python -P bench/wire.py                      # 5 rounds of each, best and median
    python -P bench/wire.py --output wire.json   # upload_gb_per_s, download_gb_per_s, ...
    python -P bench/wire.py --glibc-defaults     # without runtime/wire/allocator.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import torch

#: An update of 11.7M float32 parameters (46.8 MB, ResNet-18's size), in a few tensors.
SHAPES = {"features.weight": (2048, 4096), "features.bias": (2048,),
          "head.weight": (1024, 3232), "head.bias": (1024,), "scale": ()}
RAW_DOWNLOAD = "/bench.Raw/Download"
RAW_UPLOAD = "/bench.Raw/Upload"


def update() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def _identity(data: bytes) -> bytes:
    return data


def _raw_payload(weights: dict[str, torch.Tensor], chunk_bytes: int) -> list[bytes]:
    """The same payload bytes in messages of the same size, for raw grpcio."""
    from fedkube.runtime import wire

    return [chunk.data for chunk in wire.to_chunks(weights, chunk_bytes=chunk_bytes)]


def tune(glibc_defaults: bool) -> None:
    """What the `fedkube` entry points do at start, unless asked to keep glibc's defaults."""
    from fedkube.runtime.wire.allocator import keep_large_buffers_mapped

    if not glibc_defaults:
        keep_large_buffers_mapped()
    torch.set_num_threads(1)


def serve(port_queue: Any, stop: Any, chunk_bytes: int, glibc_defaults: bool) -> None:
    """The server process: the coordinator-shaped service and the raw one, one port."""
    from fedkube.runtime import wire
    from fedkube.runtime.coordinator.server import GRPC_OPTIONS, add_servicer
    from fedkube.runtime.proto import fedkube_pb2 as pb
    from fedkube.runtime.proto import fedkube_pb2_grpc as pb_grpc

    tune(glibc_defaults)
    weights = update()
    schema = wire.schema_of(weights)
    model_chunks = list(wire.serialized_chunks(weights, model_version=1,
                                               chunk_bytes=chunk_bytes))
    raw = _raw_payload(weights, chunk_bytes)

    class Coordinator(pb_grpc.CoordinatorServicer):
        async def GetModel(self, request: pb.GetModelRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            for chunk in model_chunks:
                yield chunk

        async def SubmitUpdate(self, request_iterator: AsyncIterator[pb.UpdateChunk],
                               context: grpc.aio.ServicerContext) -> pb.SubmitReply:
            iterator = aiter(request_iterator)
            first = await anext(iterator)
            if not first.HasField("header"):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no UpdateHeader")
            assembler = wire.TensorAssembler(schema)
            try:
                async for part in iterator:
                    assembler.add(part)  # a wire.ReceivedChunk, as the coordinator's
                delta = assembler.finish()
            except wire.WireError as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            return pb.SubmitReply(accepted=True, message=f"{len(delta)} tensors")

    async def download(request: bytes, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[bytes]:
        for data in raw:
            yield data

    async def upload(request_iterator: AsyncIterator[bytes],
                     context: grpc.aio.ServicerContext) -> bytes:
        received = 0
        async for data in request_iterator:
            received += len(data)
        return str(received).encode()

    async def main() -> None:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        add_servicer(Coordinator(), server)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Raw", {
            "Download": grpc.unary_stream_rpc_method_handler(
                download, request_deserializer=_identity, response_serializer=_identity),
            "Upload": grpc.stream_unary_rpc_method_handler(
                upload, request_deserializer=_identity, response_serializer=_identity),
        })])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_queue.put(port)
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await server.stop(0)

    asyncio.run(main())


async def measure(port: int, *, repeats: int, chunk_bytes: int,
                  weights: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Seconds per transfer for each way of moving the update, interleaved."""
    from fedkube.runtime import wire
    from fedkube.runtime.agent.client import DOWNLOAD_BUFFERS, GRPC_OPTIONS, coordinator_stub
    from fedkube.runtime.proto import fedkube_pb2 as pb

    schema = wire.schema_of(weights)
    raw = _raw_payload(weights, chunk_bytes)
    DOWNLOAD_BUFFERS.allow(wire.encoded_size(weights))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
        # The agent's stub: pre-serialised upload chunks, downloads parsed without copies.
        stub = coordinator_stub(channel)
        raw_download = channel.unary_stream(RAW_DOWNLOAD, request_serializer=_identity,
                                            response_deserializer=_identity)
        raw_upload = channel.stream_unary(RAW_UPLOAD, request_serializer=_identity,
                                          response_deserializer=_identity)

        async def fedkube_download() -> None:
            assembler = wire.TensorAssembler(schema, pool=DOWNLOAD_BUFFERS)
            async for chunk in stub.GetModel(pb.GetModelRequest(node_id="bench",
                                                                model_version=1)):
                assembler.add(chunk)
            assert torch.equal(assembler.finish()["scale"], weights["scale"])

        async def fedkube_upload() -> None:
            async def parts() -> AsyncIterator[pb.UpdateChunk | bytes]:
                yield pb.UpdateChunk(header=pb.UpdateHeader(node_id="bench", round=1,
                                                            payload="delta"))
                for part in wire.serialized_update_chunks(weights, chunk_bytes=chunk_bytes):
                    yield part

            reply = await stub.SubmitUpdate(parts())
            assert reply.accepted, reply.message

        async def grpc_download() -> None:
            received = 0
            async for data in raw_download(b""):
                received += len(data)
            assert received == wire.encoded_size(weights)

        async def grpc_upload() -> None:
            async def parts() -> AsyncIterator[bytes]:
                for data in raw:
                    yield data

            assert int(await raw_upload(parts())) == wire.encoded_size(weights)

        ways: dict[str, Callable[[], Any]] = {
            "fedkube_upload": fedkube_upload, "fedkube_download": fedkube_download,
            "grpc_upload": grpc_upload, "grpc_download": grpc_download}
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for attempt in range(repeats + 1):  # the first round warms both ends up
            for name, way in ways.items():
                started = time.perf_counter()
                await way()
                if attempt:
                    seconds[name].append(time.perf_counter() - started)
        return seconds


def flower_seconds(weights: dict[str, torch.Tensor], repeats: int) -> dict[str, float] | None:
    """Flower's serialization and deserialization of the same tensors (best of repeats),
    or None without flwr."""
    try:
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    except ImportError:
        return None
    arrays = [t.numpy() for t in weights.values()]
    serialize, deserialize = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        parameters = ndarrays_to_parameters(arrays)
        serialize.append(time.perf_counter() - started)
        started = time.perf_counter()
        parameters_to_ndarrays(parameters)
        deserialize.append(time.perf_counter() - started)
    return {"serialize": min(serialize), "deserialize": min(deserialize)}


def summarize(seconds: dict[str, list[float]], payload: int,
              flower: dict[str, float] | None) -> dict[str, Any]:
    def rate(values: Sequence[float], pick: Callable[[Sequence[float]], float]) -> float:
        return round(payload / pick(values) / 1e9, 3)

    figures: dict[str, Any] = {}
    for name, values in seconds.items():
        figures[f"{name}_gb_per_s"] = rate(values, min)
        figures[f"{name}_gb_per_s_median"] = rate(values, statistics.median)
    result: dict[str, Any] = {
        "upload_gb_per_s": figures["fedkube_upload_gb_per_s"],
        "download_gb_per_s": figures["fedkube_download_gb_per_s"],
        "raw_grpc_upload_gb_per_s": figures["grpc_upload_gb_per_s"],
        "raw_grpc_download_gb_per_s": figures["grpc_download_gb_per_s"],
        "flower_upload_gb_per_s": None, "flower_download_gb_per_s": None,
        "flower_note": "flwr is not importable here: no Flower baseline",
        "all": figures, "seconds": seconds,
    }
    if flower is not None:
        for way, extra in (("upload", flower["serialize"] + flower["deserialize"]),
                           ("download", flower["serialize"] + flower["deserialize"])):
            best_raw = min(seconds[f"grpc_{way}"])
            result[f"flower_{way}_gb_per_s"] = round(payload / (best_raw + extra) / 1e9, 3)
        result["flower_note"] = ("Flower: ndarrays_to_parameters + parameters_to_ndarrays "
                                 "on the same tensors, added to raw grpcio's transfer time")
        result["flower_seconds"] = flower
    return result


def render(result: dict[str, Any], payload: int, repeats: int, chunk_bytes: int) -> str:
    figures = result["all"]

    def cell(key: str) -> str:
        return f"{figures[f'{key}_gb_per_s']:.3f} ({figures[f'{key}_gb_per_s_median']:.3f})"

    lines = [(f"update: {payload / 1e6:.1f} MB float32 in {len(SHAPES)} tensors, "
              f"{chunk_bytes >> 20} MiB chunks, loopback, GB/s best (median) of {repeats}"),
             f"{'':<26} {'upload':>16} {'download':>16}"]
    for label, key in (("fedkube (wire + checks)", "fedkube"),
                       ("raw grpcio, same bytes", "grpc")):
        lines.append(f"{label:<26} {cell(key + '_upload'):>16} {cell(key + '_download'):>16}")
    if result["flower_upload_gb_per_s"] is not None:
        lines.append(f"{'Flower (serde + raw)':<26} {result['flower_upload_gb_per_s']:>16.3f} "
                     f"{result['flower_download_gb_per_s']:>16.3f}")
    lines.append(f"note: {result['flower_note']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from fedkube.runtime import wire

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repeats instead of --repeats")
    parser.add_argument("--chunk-bytes", type=int, default=wire.CHUNK_BYTES,
                        help="payload bytes per message (default: the wire's CHUNK_BYTES)")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="leave glibc's malloc thresholds alone (the fedkube entry points "
                        "raise them: runtime/wire/allocator.py), to see what that changes")
    parser.add_argument("--output", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 2
    tune(args.glibc_defaults)
    weights = update()
    payload = wire.encoded_size(weights)
    context = multiprocessing.get_context("spawn")
    port_queue, stop = context.Queue(), context.Event()
    server = context.Process(target=serve, daemon=True,
                             args=(port_queue, stop, args.chunk_bytes, args.glibc_defaults))
    server.start()
    try:
        port = port_queue.get(timeout=120)
        seconds = asyncio.run(measure(port, repeats=args.repeats, chunk_bytes=args.chunk_bytes,
                                      weights=weights))
    finally:
        stop.set()
        server.join(timeout=10)
    result = summarize(seconds, payload, flower_seconds(weights, args.repeats))
    result.update(payload_bytes=payload, chunk_bytes=args.chunk_bytes, repeats=args.repeats,
                  torch_threads=1, grpc_version=grpc.__version__,
                  glibc_malloc_thresholds="defaults" if args.glibc_defaults else "raised")
    print(render(result, payload, args.repeats, args.chunk_bytes))
    if args.output:
        with open(args.output, "w") as file:
            json.dump(result, file, indent=2)
            file.write("\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
