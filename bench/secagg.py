"""What secure aggregation costs per round, beside the plain round measured in the same run.

For each client count n (default 10, 50, 100 at a 1M-parameter model; plus 1,000 clients
at a smaller model, `--large`), the same updates go through:

- plain: each client's float32 delta serialized to the wire's tensor chunks
  (`wire.to_update_chunks`); the coordinator assembles them (`wire.TensorAssembler`) and
  folds them into fedkube's FedAvg `RoundAggregator` (float64 running sum), then `finish`.
- secure: the real `SecAggClient` / `SecAggServer` of `runtime/secagg` through all four
  phases (keys, encrypted Shamir shares over the SecAgg+ graph, masked input, unmasking),
  with `--drop` of the clients leaving after sharing so their masks are recovered
  (default 5%: the expensive path the coordinator must be able to take). The masked input
  travels through the same chunk encoding as a plain update (one uint8 tensor of 4 bytes
  per coordinate).
- secure qB (`--quantize-bits`, default 8): the same, with B-bit stochastic quantization
  as the fixed-point step (compression.quantizeBits): codes on a scale of
  `--quantized-value-range`/(2^(B-1)-1), masked in the smallest ring holding n clients'
  sum, ceil(ring bits/8) bytes per coordinate on the wire. Its bytes are reported against
  plain fp32 and plain secure aggregation.

Client time is the mean per client (its share of all four phases, serialization
included); coordinator time is everything the coordinator does for the round (assembling,
folding, the protocol's closes and the unmasking). Bytes are payload bytes on the wire per
client, up and down (keys, shares and ids included; protobuf framing of the small
messages estimated at 8 bytes per field). The decoded secure sum is checked against the
plain sum to the fixed-point resolution.

    python -P bench/secagg.py                 # 10, 50, 100 clients x 1M params
    python -P bench/secagg.py --quick         # 10, 20 clients x 100k params
    python -P bench/secagg.py --large --output secagg.json
    python -P bench/secagg.py --quantize-bits 8,16,4,2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import numpy as np
import torch
from fedkube.runtime import wire
from fedkube.runtime.aggregation import AggregationConfig, RoundAggregator
from fedkube.runtime.secagg import (
    MaskedInput,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    encoding_for,
    from_wire,
    neighbour_count,
    to_wire,
)


def payload_bytes(message: Any) -> int:
    """Bytes a protocol message carries: its bytes/str fields, arrays, 8 per number."""
    if isinstance(message, bytes | str):
        return len(message) + 2
    if isinstance(message, np.ndarray):
        return message.nbytes
    if isinstance(message, int | float):
        return 8
    if isinstance(message, tuple | list):
        return sum(payload_bytes(m) for m in message)
    if dataclasses.is_dataclass(message):
        return sum(payload_bytes(getattr(message, f.name)) for f in dataclasses.fields(message))
    raise TypeError(type(message))


def plain_round(updates: list[np.ndarray]) -> dict[str, float]:
    template = {"w": torch.zeros(updates[0].size)}
    schema = wire.schema_of(template)
    client_seconds = 0.0
    up = 0
    chunks_of = []
    for update in updates:
        start = time.perf_counter()
        chunks = list(wire.to_update_chunks({"w": torch.from_numpy(update)}))
        client_seconds += time.perf_counter() - start
        up += sum(c.ByteSize() for c in chunks)
        chunks_of.append(chunks)
    start = time.perf_counter()
    aggregator = RoundAggregator(AggregationConfig(), template, max_buffered=0)
    for index, chunks in enumerate(chunks_of):
        assembler = wire.TensorAssembler(schema)
        for chunk in chunks:
            assembler.add(chunk.tensor)
        aggregator.add(f"n{index}", assembler.finish(), 1)
    mean = aggregator.finish().mean_delta["w"]
    coordinator = time.perf_counter() - start
    return {"client_seconds": client_seconds / len(updates), "coordinator_seconds": coordinator,
            "client_bytes_up": up / len(updates), "client_bytes_down": 0.0,
            "mean": mean.numpy()}


def secure_round(updates: list[np.ndarray], *, drop: float, threshold: float, bits: int = 32,
                 value_range: float = 4.0) -> dict[str, Any]:
    n, length = len(updates), updates[0].size
    nodes = [f"node-{i:04d}" for i in range(n)]
    config = SecAggConfig(threshold=threshold, quantize_bits=bits, value_range=value_range)
    leaving = set(nodes[:: max(1, round(1 / drop))][: int(drop * n)]) if drop > 0 else set()
    encoding = encoding_for(value_range, n, bits)
    schema = {"masked": wire.TensorSpec((length * encoding.width,), "uint8")}
    client_time = dict.fromkeys(nodes, 0.0)
    up = dict.fromkeys(nodes, 0)
    down = dict.fromkeys(nodes, 0)
    server_time = 0.0

    def on_client(node, step):
        start = time.perf_counter()
        out = step()
        client_time[node] += time.perf_counter() - start
        return out

    def on_server(step):
        nonlocal server_time
        start = time.perf_counter()
        out = step()
        server_time += time.perf_counter() - start
        return out

    server = on_server(lambda: SecAggServer(round=1, selected=nodes, length=length,
                                            config=config, seed=1))
    clients = {node: SecAggClient(node, 1, quantize_bits=bits) for node in nodes}
    for node in nodes:
        advert = on_client(node, clients[node].advertise)
        up[node] += payload_bytes(advert)
        on_server(lambda a=advert: server.receive_advert(a))
    rosters = on_server(server.close_advertising)
    for node, roster in rosters.items():
        down[node] += payload_bytes(roster)
        bundle = on_client(node, lambda r=roster, c=clients[node]: c.share(r))
        up[node] += payload_bytes(bundle)
        on_server(lambda b=bundle: server.receive_shares(b))
    deliveries = on_server(server.close_sharing)
    for node, delivery in deliveries.items():
        down[node] += payload_bytes(delivery)
        if node in leaving:
            continue
        index = nodes.index(node)

        def mask(c=clients[node], d=delivery, u=updates[index]):
            masked = c.mask(d, u)
            return list(wire.to_update_chunks(
                {"masked": torch.from_numpy(to_wire(masked.vector, encoding.width))}))

        chunks = on_client(node, mask)
        up[node] += sum(c.ByteSize() for c in chunks)

        def receive(chunks=chunks, node=node):
            assembler = wire.TensorAssembler(schema)
            for chunk in chunks:
                assembler.add(chunk.tensor)
            vector = from_wire(assembler.finish()["masked"].numpy(), encoding.width, length)
            server.receive_masked(MaskedInput(node, 1, vector))

        on_server(receive)
    requests = on_server(server.close_masking)
    for node, request in requests.items():
        down[node] += payload_bytes(request)
        response = on_client(node, lambda r=request, c=clients[node]: c.unmask(r))
        up[node] += payload_bytes(response)
        on_server(lambda r=response: server.receive_unmask(r))
    result = on_server(server.finish)
    stayed = [i for i, node in enumerate(nodes) if node not in leaving]
    expected = sum(np.clip(updates[i].astype(np.float64), -value_range, value_range)
                   for i in stayed)
    error = float(np.abs(result.total - expected).max())
    bound = len(stayed) * encoding.resolution
    survivors = [node for node in nodes if node not in leaving]
    return {
        "client_seconds": float(np.mean([client_time[s] for s in survivors])),
        "coordinator_seconds": server_time,
        "client_bytes_up": float(np.mean([up[s] for s in survivors])),
        "client_bytes_down": float(np.mean([down[s] for s in survivors])),
        "neighbours": neighbour_count(n, None), "dropped": len(leaving),
        "ring_bits": encoding.ring_bits, "wire_bytes_per_coordinate": encoding.width,
        "max_error": error, "error_bound": bound, "exact_to_quantization": error <= bound,
    }


def _print_row(n: int, params: int, kind: str, plain: dict, secure: dict,
               secure32: dict | None = None) -> None:
    to_secure = (f"{secure['client_bytes_up'] / secure32['client_bytes_up']:>7.3f}"
                 if secure32 else f"{'':>7}")
    print(f"{n:>7} {params:>9} {kind:>6} {secure['neighbours']:>3} {secure['ring_bits']:>4} | "
          f"{plain['coordinator_seconds']:>13.3f} {secure['coordinator_seconds']:>8.3f} "
          f"{secure['coordinator_seconds'] / plain['coordinator_seconds']:>5.2f} | "
          f"{plain['client_seconds']:>14.4f} {secure['client_seconds']:>8.4f} | "
          f"{plain['client_bytes_up']:>14.0f} {secure['client_bytes_up']:>10.0f} "
          f"{secure['client_bytes_up'] / plain['client_bytes_up']:>5.3f} {to_secure} "
          f"{secure['client_bytes_down']:>8.0f} | {secure['exact_to_quantization']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,50,100")
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--large", action="store_true",
                        help="also 1,000 clients (at --large-params parameters)")
    parser.add_argument("--large-params", type=int, default=100_000)
    parser.add_argument("--drop", type=float, default=0.05,
                        help="share of clients that leave after sharing their keys")
    parser.add_argument("--threshold", type=float, default=0.67)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--quantize-bits", default="8",
                        help="comma-separated quantizeBits for the quantized secure rows "
                        "(16, 8, 4, 2; empty: none)")
    parser.add_argument("--quantized-value-range", type=float, default=0.25,
                        help="valueRange of the quantized rows (the updates are N(0, 0.05))")
    parser.add_argument("--output")
    args = parser.parse_args()
    quantized = [int(b) for b in args.quantize_bits.split(",") if b.strip()]
    torch.set_num_threads(1)
    cases = [(int(n), args.params) for n in args.clients.split(",")]
    if args.quick:
        cases = [(10, 100_000), (20, 100_000)]
    if args.large:
        cases.append((1000, args.large_params))
    plain_round([np.zeros(1000, np.float32)] * 2)  # warm-up: first-call costs out
    secure_round([np.zeros(1000, np.float32)] * 3, drop=0.0, threshold=args.threshold)
    rows = []
    print(f"{'clients':>7} {'params':>9} {'kind':>6} {'k':>3} {'ring':>4} | "
          f"{'coord s plain':>13} {'secure':>8} {'x':>5} | {'client s plain':>14} {'secure':>8} | "
          f"{'bytes up plain':>14} {'secure':>10} {'x':>5} {'x sec32':>7} {'down':>8} | exact")
    for n, params in cases:
        rng = np.random.default_rng(n)
        updates = [rng.normal(0, 0.05, params).astype(np.float32) for _ in range(n)]
        plain = plain_round(updates)
        plain.pop("mean")
        secure = secure_round(updates, drop=args.drop, threshold=args.threshold)
        row = {"clients": n, "params": params, "plain": plain, "secure": secure,
               "coordinator_ratio": secure["coordinator_seconds"] / plain["coordinator_seconds"],
               "client_bytes_ratio": secure["client_bytes_up"] / plain["client_bytes_up"]}
        rows.append(row)
        _print_row(n, params, "secure", plain, secure)
        for bits in quantized:
            coded = secure_round(updates, drop=args.drop, threshold=args.threshold, bits=bits,
                                 value_range=args.quantized_value_range)
            rows.append({"clients": n, "params": params, "quantize_bits": bits,
                         "value_range": args.quantized_value_range, "plain": plain,
                         "secure": coded,
                         "coordinator_ratio": coded["coordinator_seconds"]
                         / plain["coordinator_seconds"],
                         "client_bytes_ratio": coded["client_bytes_up"] / plain["client_bytes_up"],
                         "client_bytes_ratio_to_secure": coded["client_bytes_up"]
                         / secure["client_bytes_up"]})
            _print_row(n, params, f"q{bits}", plain, coded, secure)
    print("targets: coordinator <= 2x plain at 100 clients; client bytes up <= 1.2x plain "
          "(x: against plain fp32; x sec32: quantized against plain secure aggregation)")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"drop": args.drop, "threshold": args.threshold, "rows": rows}, handle,
                      indent=2)


if __name__ == "__main__":
    main()
