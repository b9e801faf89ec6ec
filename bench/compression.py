"""What compressed updates buy: the same job run side by side with each compression
setting, in one run of this script, every client behind a simulated 10 Mbit/s uplink.

Settings (spec.compression): fp32 (the baseline, uncompressed), 16-bit, 8-bit, 4-bit,
2-bit (stochastic rounding, per-block scale), top-k 10% + error feedback, top-k 5% and 1%
+ error feedback + 8-bit, lossless only (zstd), top-k 1% + EF + 8-bit on top of local
DP-SGD, and fp32 updates with the global model sent down as exact deltas (downlink delta).
Each is a whole `run_job` (the code path of `fedkube run`: coordinator in this process,
agents in OS processes over real gRPC on 127.0.0.1) with the same seed, data and model.

Per setting: upload bytes per round as a fraction of fp32's (from metrics.jsonl's
round_bytes_up), download bytes per round likewise (round_bytes_down), final and best
accuracy, the first round reaching fp32's best accuracy
minus 1 point, wall seconds per round (dispatch to evaluated model, under the simulated
uplink; the first round, which pays for warm-up, is skipped), and encode / decode
throughput in MB of raw float32 per second, measured here on a model-sized delta
(encode: `compress_update` with error feedback as the agent runs it; decode: the
coordinator's path, parse and check every encoding then read each tensor once).

Targets (issue 12): at most 10% of fp32's bytes within 1 point of its accuracy (stretch
3%); encode and decode faster than the link they save (well over 100 MB/s); compression
off no slower than before (bench/wire.py measures the raw path).

    python -P bench/compression.py                    # mnist5k, cnn28, 10 clients, 20 rounds
    python -P bench/compression.py --quick            # digits, mlp, 4 clients, 4 rounds
    python -P bench/compression.py --output compression.json
    python -P bench/compression.py --throughput-only  # encode/decode MB/s, no runs
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
from typing import Any

import numpy as np
import torch
from fedkube.runtime import wire
from fedkube.runtime.compression import CompressionConfig, DecodedUpdate, compress_update
from fedkube.runtime.coordinator.report import METRICS
from fedkube.runtime.local import RunOptions, run_job
from fedkube.runtime.models import build_model
from fedkube.runtime.spec import FederatedJob

SETTINGS: list[tuple[str, dict[str, Any], bool]] = [
    ("fp32", {}, False),
    ("16-bit", {"quantizeBits": 16}, False),
    ("8-bit", {"quantizeBits": 8}, False),
    ("4-bit", {"quantizeBits": 4}, False),
    ("2-bit", {"quantizeBits": 2}, False),
    ("top-k 10% + EF", {"topK": 0.1, "errorFeedback": True}, False),
    ("top-k 5% + EF + 8-bit", {"topK": 0.05, "quantizeBits": 8, "errorFeedback": True}, False),
    ("top-k 1% + EF + 8-bit", {"topK": 0.01, "quantizeBits": 8, "errorFeedback": True}, False),
    ("lossless zstd", {"lossless": "zstd"}, False),
    ("top-k 1% + EF + 8-bit, local DP",
     {"topK": 0.01, "quantizeBits": 8, "errorFeedback": True}, True),
    ("downlink delta", {"downlink": "delta"}, False),
]


def _job(name: str, compression: dict[str, Any], *, private: bool, args: argparse.Namespace
         ) -> FederatedJob:
    spec: dict[str, Any] = {
        "model": args.model, "data": {"dataset": args.dataset, "partition": "iid"},
        "rounds": args.rounds, "clientsPerRound": args.clients, "minClients": args.clients,
        "roundTimeoutSeconds": 300, "localEpochs": 1, "batchSize": 32,
        "learningRate": args.learning_rate, "seed": 0,
        "compression": compression,
        "simulation": {"clients": args.clients, "network": {"uplinkMbps": args.uplink_mbps}},
    }
    if private:
        spec["privacy"] = {"mode": "local", "targetEpsilon": args.epsilon}
    return FederatedJob.model_validate({
        "apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
        "metadata": {"name": name.replace(" ", "-").replace("%", "").replace("+", "")
                     .replace(",", "").replace("--", "-").lower()},
        "spec": spec})


def _config(compression: dict[str, Any]) -> CompressionConfig:
    return CompressionConfig(top_k=compression.get("topK"),
                             bits=compression.get("quantizeBits", 32),
                             error_feedback=compression.get("errorFeedback", False),
                             lossless=compression.get("lossless", "none"))


def _throughput(config: CompressionConfig, delta: dict[str, torch.Tensor], repeats: int,
                clock=time.perf_counter) -> tuple[float | None, float | None]:
    """(encode, decode) MB of raw float32 per second, best of `repeats` by `clock`."""
    if not config.enabled:
        return None, None
    raw = sum(t.numel() * t.element_size() for t in delta.values()) / 1e6
    # One torch thread, as agents run (RunOptions.agent_threads): on a busy two-core
    # machine two threads spend most of a small tensor's time waiting for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _timed(config, delta, raw, repeats, clock)
    finally:
        torch.set_num_threads(threads)


def _timed(config: CompressionConfig, delta: dict[str, torch.Tensor], raw: float,
           repeats: int, clock) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    residual = {k: torch.zeros_like(v) for k, v in delta.items()} if config.error_feedback else None
    encode = decode = float("inf")
    for _ in range(repeats):
        start = clock()
        out = compress_update(delta, config, residual=residual, generator=rng)
        encode = min(encode, clock() - start)
        start = clock()
        view = DecodedUpdate(out.parts, {k: tuple(v.shape) for k, v in delta.items()})
        for name in view:
            view[name].sum()
        decode = min(decode, clock() - start)
    return raw / max(encode, 1e-9), raw / max(decode, 1e-9)


def _copy_baseline(delta: dict[str, torch.Tensor], repeats: int) -> float:
    """MB/s of cloning the same update, best of `repeats`: the machine's state in this
    run (a loaded machine lowers it and the codec's figures alike)."""
    raw = sum(t.numel() * t.element_size() for t in delta.values()) / 1e6
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the codec's figures
    best = float("inf")
    try:
        for _ in range(repeats + 1):  # the first warms the allocator
            start = time.perf_counter()
            for tensor in delta.values():
                tensor.clone()
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return raw / best


def _raw_path(repeats: int = 3) -> dict[str, float]:
    """Compression off: the agent's upload path (`to_compressed_update_chunks` with raw
    tensors) against the previous one (`to_update_chunks`), each assembled and checked by
    the coordinator's `TensorAssembler`, on a 47 MB update; GB/s, best of `repeats`."""
    weights = {f"layer{i}": torch.randn(11_700_000 // 4) for i in range(4)}
    schema = wire.schema_of(weights)
    size = sum(t.numel() * 4 for t in weights.values()) / 1e9
    figures = {}
    for name, chunks in (("before", wire.to_update_chunks),
                         ("agent_now", wire.to_compressed_update_chunks)):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            assembler = wire.TensorAssembler(schema)
            for part in chunks(weights):
                assembler.add(part.tensor)
            assembler.finish()
            best = min(best, time.perf_counter() - start)
        figures[name] = size / best
    return figures


_STEP = 1e-3


def _downlink(args: argparse.Namespace) -> dict[str, float]:
    """Bytes of `compression.downlink`'s exact delta against the fp32 model, for two
    versions one synthetic SGD-sized step apart (every float entry moved by
    _STEP * mean|w| * N(0, 1)); the "downlink delta" row measures what a real job sends."""
    from fedkube.runtime.compression.downlink import model_delta

    shapes = {"mnist5k": (1, 28, 28), "digits": (1, 8, 8)}.get(args.dataset, (1, 28, 28))
    old = build_model(args.model, input_shape=shapes, num_classes=10, seed=0).state_dict()
    torch.manual_seed(1)
    new = {k: v + _STEP * v.abs().mean() * torch.randn_like(v) if v.is_floating_point()
           else v for k, v in old.items()}
    raw = sum(v.numel() * v.element_size() for v in new.values())
    return {lossless: sum(d.nbytes for d in model_delta(old, new, lossless=lossless).values())
            / raw for lossless in ("zstd", "lz4")}


def _throughput_table(settings: list[tuple[str, dict[str, Any], bool]],
                      delta: dict[str, torch.Tensor], args: argparse.Namespace) -> int:
    rows = []
    print(f"{args.model} delta of {sum(t.numel() for t in delta.values()):,} float32, "
          f"one torch thread, best of {args.repeats}")
    print("wall: best wall-clock time; cpu: best CPU time of this thread (what other "
          "processes on a loaded machine do not take)")
    print(f"{'setting':34} {'enc MB/s':>9} {'dec MB/s':>9} {'enc cpu':>9} {'dec cpu':>9}")
    copy = _copy_baseline(delta, args.repeats)
    for name, compression, private in settings:
        if private:  # the codec does not know about DP: the same as the row without it
            continue
        encode, decode = _throughput(_config(compression), delta, repeats=args.repeats)
        encode_cpu, decode_cpu = _throughput(_config(compression), delta,
                                             repeats=args.repeats, clock=time.thread_time)
        rows.append({"setting": name, "encode_mb_per_s": encode, "decode_mb_per_s": decode,
                     "encode_cpu_mb_per_s": encode_cpu, "decode_cpu_mb_per_s": decode_cpu})
        if encode is not None and decode is not None:
            print(f"{name:34} {encode:9.0f} {decode:9.0f} {encode_cpu:9.0f} {decode_cpu:9.0f}")
    print(f"{'baseline: clone the update':34} {copy:9.0f}")
    downlink = _downlink(args)
    print(f"\ndownlink, exact delta (XOR + byte shuffle) of a global model after a step of "
          f"{_STEP:g} x mean|w|, bytes vs fp32: "
          + ", ".join(f"{k} {v:.3f}" for k, v in downlink.items()))
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "throughput": rows,
                                                 "clone_mb_per_s": copy,
                                                 "downlink_bytes_vs_fp32": downlink},
                                                indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


def _records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / METRICS).read_text().splitlines() if line]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits, mlp, 4 clients, 4 rounds")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--model", default="cnn28")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--uplink-mbps", type=float, default=10.0)
    parser.add_argument("--epsilon", type=float, default=8.0, help="local DP target")
    parser.add_argument("--only", action="append", default=[],
                        help="run only settings whose name holds this text (repeatable)")
    parser.add_argument("--throughput-only", action="store_true",
                        help="only encode/decode MB/s per setting (no federated runs)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="encode/decode timings: best of this many (a loaded machine)")
    parser.add_argument("--output", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.dataset, args.model, args.clients, args.rounds = "digits", "mlp", 4, 4
    settings = [s for s in SETTINGS if not args.only or any(o in s[0] for o in args.only)]
    if settings[0][0] != "fp32":
        settings.insert(0, SETTINGS[0])  # the baseline is always measured

    shapes = {"mnist5k": (1, 28, 28), "digits": (1, 8, 8)}.get(args.dataset, (1, 28, 28))
    model = build_model(args.model, input_shape=shapes, num_classes=10, seed=0)
    torch.manual_seed(0)
    delta = {k: torch.randn_like(v) * 0.01 for k, v in model.state_dict().items()
             if v.dtype == torch.float32}
    if args.throughput_only:
        return _throughput_table(settings, delta, args)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedkube-bench-compression-") as tmp:
        for name, compression, private in settings:
            job = _job(name, compression, private=private, args=args)
            folder = Path(tmp) / job.metadata.name
            started = time.monotonic()
            print(f"running {name} ...", file=sys.stderr, flush=True)
            summary = asyncio.run(run_job(job, RunOptions(output=folder, quiet=True)))
            records = _records(folder)
            encode, decode = _throughput(_config(compression), delta, repeats=args.repeats)
            seconds = [r["seconds"] for r in records[1:]] or [r["seconds"] for r in records]
            results.append({
                "setting": name, "phase": summary["phase"], "rounds": len(records),
                "bytes_up_per_round": statistics.mean(r["round_bytes_up"] for r in records),
                "bytes_down_per_round": statistics.mean(r["round_bytes_down"] for r in records),
                "compression_ratio": summary.get("compressionRatio"),
                "final_accuracy": records[-1]["accuracy"],
                "best_accuracy": max(r["accuracy"] for r in records),
                "accuracies": [r["accuracy"] for r in records],
                "seconds_per_round": statistics.median(seconds),
                "wall_seconds": round(time.monotonic() - started, 1),
                "epsilon": summary.get("epsilon"),
                "encode_mb_per_s": encode, "decode_mb_per_s": decode,
            })
    baseline = results[0]
    reference = baseline["best_accuracy"] - 0.01
    for result in results:
        result["bytes_vs_fp32"] = result["bytes_up_per_round"] / baseline["bytes_up_per_round"]
        result["down_vs_fp32"] = (result["bytes_down_per_round"]
                                  / baseline["bytes_down_per_round"])
        result["rounds_to_fp32_minus_1pt"] = next(
            (i + 1 for i, a in enumerate(result["accuracies"]) if a >= reference), None)
        result["within_1pt"] = result["best_accuracy"] >= reference

    def fmt(value: float | None, spec: str, width: int) -> str:
        return ("-" if value is None else format(value, spec)).rjust(width)

    print(f"\n{args.dataset}, {args.model}, {args.clients} clients, {args.rounds} rounds, "
          f"uplink {args.uplink_mbps:g} Mbit/s; delta of {sum(t.numel() for t in delta.values()):,}"
          " float32 for encode/decode")
    header = (f"{'setting':34} {'bytes/fp32':>10} {'down/fp32':>9} {'final':>7} {'best':>7} {'to fp32-1pt':>11} "
              f"{'s/round':>8} {'enc MB/s':>9} {'dec MB/s':>9} {'eps':>6}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['setting']:34} {r['bytes_vs_fp32']:10.4f} {r['down_vs_fp32']:9.4f} "
              f"{r['final_accuracy']:7.4f} "
              f"{r['best_accuracy']:7.4f} {fmt(r['rounds_to_fp32_minus_1pt'], 'd', 11)} "
              f"{r['seconds_per_round']:8.2f} {fmt(r['encode_mb_per_s'], '.0f', 9)} "
              f"{fmt(r['decode_mb_per_s'], '.0f', 9)} {fmt(r['epsilon'], '.2f', 6)}")
    raw = _raw_path()
    print(f"\ncompression off, 47 MB update chunked + assembled in-process: before "
          f"{raw['before']:.2f} GB/s, the agent's path now {raw['agent_now']:.2f} GB/s")
    meeting = [r for r in results[1:] if r["within_1pt"] and r["bytes_vs_fp32"] <= 0.10
               and "DP" not in r["setting"]]
    print("\ntarget (<= 10% of fp32's bytes within 1 point): "
          + (", ".join(f"{r['setting']} ({r['bytes_vs_fp32']:.1%})" for r in meeting)
             or "not met"))
    if args.output:
        Path(args.output).write_text(json.dumps(
            {"args": vars(args), "results": results, "raw_path_gb_per_s": raw},
            indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
