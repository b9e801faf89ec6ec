"""What TLS and mutual TLS cost a coordinator's clients, against plaintext gRPC measured in
the same run.

Three real coordinators (`RoundEngine` + `serve`, the job idle: its clients register but
never stream, so no round opens) listen on 127.0.0.1: plaintext, TLS, and mutual TLS
(client certificate whose subject CN is the node id, minted by `tests/certs.py` with
`cryptography`). For each, in interleaved repeats so that a busy machine slows all three
alike:

- connect: a new channel, the handshake and one `Register` (what an agent pays once per
  (re)connection);
- heartbeat: one `Heartbeat` round trip on an open channel (the per-RPC cost; mTLS adds
  the certificate check of `identity.py` to every call);
- model: one `GetModel` stream of the whole model (bulk bytes through the cipher).

Medians in milliseconds, and each mode over plaintext in percent.

    python -P bench/tls.py                    # mlp, 7 repeats
    python -P bench/tls.py --model cnn28 --repeats 5 --output tls.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # certs.py: the tests' certificate minting

from certs import Authority, Issued
from fedkube.runtime.coordinator.engine import RoundEngine
from fedkube.runtime.coordinator.server import TlsFiles, serve
from fedkube.runtime.proto import fedkube_pb2 as pb
from fedkube.runtime.proto import fedkube_pb2_grpc as pb_grpc
from fedkube.runtime.spec import parse_job

MODES = ("plaintext", "tls", "mtls")


def _job(name: str, model: str):
    return parse_job({"apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
                      "metadata": {"name": name},
                      "spec": {"model": model, "data": {"dataset": "digits"}, "rounds": 1,
                               "minClients": 1, "simulation": {"clients": 1}}})


class Target:
    """One coordinator and how a client reaches it."""

    def __init__(self, mode: str, model: str, ca: Authority, client: Issued) -> None:
        self.mode, self.model, self.ca, self.client = mode, model, ca, client
        self.engine = RoundEngine(_job(f"bench-{mode}", model), registration_timeout=3600)

    async def start(self) -> None:
        server = self.ca.server()
        tls = None if self.mode == "plaintext" else TlsFiles(
            cert=server.cert, key=server.key,
            client_ca=self.ca.cert if self.mode == "mtls" else None)
        bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(serve(self.engine, host="127.0.0.1", port=0, tls=tls,
                                              on_bound=bound))
        self.port = await bound

    def channel(self) -> grpc.aio.Channel:
        address = f"127.0.0.1:{self.port}"
        if self.mode == "plaintext":
            return grpc.aio.insecure_channel(address)
        mutual = self.mode == "mtls"
        return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(
            root_certificates=self.ca.cert.read_bytes(),
            private_key=self.client.key.read_bytes() if mutual else None,
            certificate_chain=self.client.cert.read_bytes() if mutual else None))

    async def connect(self) -> tuple[float, str]:
        """Milliseconds for channel + handshake + Register; the session it got."""
        started = time.perf_counter()
        async with self.channel() as channel:
            reply = await pb_grpc.CoordinatorStub(channel).Register(pb.RegisterRequest(
                node_id="bench-node", session=getattr(self, "session", ""),
                facts=pb.DeviceFacts(num_samples=10)))
        self.session = reply.session
        return (time.perf_counter() - started) * 1000, reply.session

    async def calls(self, count: int) -> tuple[float, float]:
        """Median milliseconds of a Heartbeat and of a whole GetModel, on one channel."""
        metadata = (("fedkube-session", self.session),)
        beats, models = [], []
        async with self.channel() as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            await stub.Heartbeat(pb.HeartbeatRequest(node_id="bench-node"), metadata=metadata)
            for _ in range(count):
                started = time.perf_counter()
                await stub.Heartbeat(pb.HeartbeatRequest(node_id="bench-node"),
                                     metadata=metadata)
                beats.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                async for _chunk in stub.GetModel(pb.GetModelRequest(
                        node_id="bench-node", model_version=self.engine.version),
                        metadata=metadata):
                    pass
                models.append((time.perf_counter() - started) * 1000)
        return statistics.median(beats), statistics.median(models)


async def measure(model: str, repeats: int, calls: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as folder:
        ca = Authority(Path(folder))
        client = ca.client("bench-node")
        targets = [Target(mode, model, ca, client) for mode in MODES]
        for target in targets:
            await target.start()
        figures: dict[str, dict[str, list[float]]] = {
            mode: {"connect": [], "heartbeat": [], "model": []} for mode in MODES}
        for _ in range(repeats):
            for target in targets:  # interleaved: load falls on every mode alike
                connect, _session = await target.connect()
                heartbeat, whole_model = await target.calls(calls)
                figures[target.mode]["connect"].append(connect)
                figures[target.mode]["heartbeat"].append(heartbeat)
                figures[target.mode]["model"].append(whole_model)
        for target in targets:
            target.task.cancel()
        await asyncio.gather(*(t.task for t in targets), return_exceptions=True)
    medians = {mode: {k: round(statistics.median(v), 3) for k, v in by.items()}
               for mode, by in figures.items()}
    base = medians["plaintext"]
    over = {mode: {k: round(100 * (v / base[k] - 1), 1) for k, v in medians[mode].items()}
            for mode in MODES if mode != "plaintext"}
    return {"model": model, "model_bytes": targets[0].engine.model_bytes, "repeats": repeats,
            "calls_per_repeat": calls, "median_ms": medians, "over_plaintext_percent": over}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20, help="RPCs per repeat")
    parser.add_argument("--quick", action="store_true", help="3 repeats of 5 calls")
    parser.add_argument("--output", help="write the figures as JSON here")
    args = parser.parse_args()
    repeats, calls = (3, 5) if args.quick else (args.repeats, args.calls)
    result = asyncio.run(measure(args.model, repeats, calls))
    print(f"{result['model']} ({result['model_bytes']:,} model bytes), median of "
          f"{repeats} repeats x {calls} calls, ms (over plaintext)")
    print(f"{'':10} {'connect+Register':>22} {'Heartbeat':>18} {'GetModel':>18}")
    for mode in MODES:
        row = result["median_ms"][mode]
        over = result["over_plaintext_percent"].get(mode, {})
        cells = [f"{row[k]:8.2f}" + (f" ({over[k]:+6.1f}%)" if over else " " * 10)
                 for k in ("connect", "heartbeat", "model")]
        print(f"{mode:10} {cells[0]:>22} {cells[1]:>18} {cells[2]:>18}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
