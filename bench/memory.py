"""The coordinator's memory does not grow with the number of clients.

Part 1 folds N client updates of a model of M bytes through the coordinator's own
aggregation path — each update arrives as the encoded SubmitUpdate messages an agent
sends (`wire.serialized_update_chunks`), parsed as the servicer parses them
(`wire.parse_update_chunk`: payloads stay views of the message bytes), is rebuilt by a
`wire.TensorAssembler` and folded into a fedavg `RoundAggregator` — and measures the
peak resident memory that adds, for N = 10, 100, 1000. The baseline, measured in the
same run on the same chunk streams, aggregates the way Flower does: every received
update kept in a list, then flwr's `aggregate()` (framework/py/flwr/server/strategy/
aggregate.py) scales a copy of each by its sample count and sums them: about 2 x N
models at the peak (Flower also keeps each update's serialised bytes until then, so
this baseline is, if anything, kind to it). Uploads are assembled `--concurrency` at a
time, interleaved chunk by chunk, as the coordinator's upload slots allow
(`admission.concurrentUploads`; unset, as here by default, runtime/coordinator/uploads.py
`assembling_slots` gives a fedavg round of a float32 model one: the setting that bounds
the coordinator to about 3x the model).
Each row's `peak_memory_over_model` is the peak added over the model's bytes. Both sides must produce the same mean; the script
checks that they do.

Part 2 sends a 100 MB model through `wire.to_chunks` / `TensorAssembler` (every message
stays under `wire.MAX_MESSAGE_BYTES`, the limit both ends set) and, unless
`--no-grpc`, through a real one-round `fedkube run` (`run_job`): the coordinator serves
the 100 MB model over GetModel and takes the update over SubmitUpdate, both streamed.

Every configuration runs in a fresh interpreter, so one's allocations cannot hide
another's. Peak memory is the kernel's resident high-water mark (VmHWM), reset after
set-up through /proc/self/clear_refs, minus the resident size just before: memory that
torch allocates is invisible to tracemalloc, so RSS is the honest measure. Linux only.

    python -P bench/memory.py                   # 10 MB model, N = 10, 100, 1000; 100 MB wire + gRPC
    python -P bench/memory.py --quick           # 2 MB model, N = 10, 100; 20 MB wire, no gRPC
    python -P bench/memory.py --output memory.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from functools import reduce
from pathlib import Path
from typing import Self

import numpy as np
import torch
from fedkube.runtime import wire
from fedkube.runtime.aggregation import AggregationConfig, RoundAggregator
from fedkube.runtime.coordinator.uploads import assembling_slots
from torch import nn

MB = 1 << 20
# The coordinator assembles this many uploads at once by default (coordinator/uploads.py):
# beside fedavg's float64 running sum, two bytes of sum per byte of float32 model.
UPLOAD_SLOTS = assembling_slots(model_bytes=1 << 20, sum_bytes=2 << 20)
# Distinct client updates encoded up front and reused round-robin: the coordinator's
# work per update is the same, and set-up stays small next to what is measured.
DISTINCT_UPDATES = 4
MAX_MESSAGE = wire.MAX_MESSAGE_BYTES

Weights = dict[str, torch.Tensor]


# ------------------------------------------------------------------- measuring


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Resident memory added at the peak of a block: VmHWM at its end minus VmRSS at
    its start, the high-water mark reset at its start (Linux >= 4.0)."""

    def __enter__(self) -> Self:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size to the current one
        self.before = _status_kb("VmRSS") * 1024
        self.started = time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self.started
        self.peak = _status_kb("VmHWM") * 1024
        self.added = max(0, self.peak - self.before)


# ---------------------------------------------------------------- the updates


def synthetic_layout(model_bytes: int) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a small conv net whose classifier is sized so that the whole
    model holds about `model_bytes` of float32: a few small tensors beside one that
    takes many chunks, as in real models."""
    features = {
        "features.0.weight": (32, 3, 3, 3),
        "features.0.bias": (32,),
        "features.1.weight": (64, 32, 3, 3),
        "features.1.bias": (64,),
    }
    classes, inputs = 10, 1024
    fixed = sum(math.prod(shape) for shape in features.values()) + classes
    # The hidden width h brings h * (inputs + 1 + classes) parameters.
    hidden = max(1, (model_bytes // 4 - fixed) // (inputs + 1 + classes))
    return {
        **features,
        "classifier.0.weight": (hidden, inputs),
        "classifier.0.bias": (hidden,),
        "classifier.1.weight": (classes, hidden),
        "classifier.1.bias": (classes,),
    }


def synthetic_weights(layout: dict[str, tuple[int, ...]], *, seed: int, scale: float
                      ) -> Weights:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * scale
            for name, shape in layout.items()}


def samples_of(client: int) -> int:
    """A client's sample count: unequal, so the weighting matters."""
    return 50 + (client * 37) % 200


def _interleaved(streams: Sequence[list]) -> Iterator[tuple[int, object]]:
    """(stream index, chunk) taking one chunk of each stream in turn: concurrent uploads."""
    longest = max(len(s) for s in streams)
    for position in range(longest):
        for index, stream in enumerate(streams):
            if position < len(stream):
                yield index, stream[position]


def _assembled(encoded: Sequence[list], schema: wire.Schema, clients: range,
               concurrency: int) -> Iterator[tuple[int, Weights]]:
    """Each client's update as the coordinator's servicer rebuilds it, `concurrency`
    uploads in flight at a time."""
    for start in range(clients.start, clients.stop, concurrency):
        group = list(range(start, min(start + concurrency, clients.stop)))
        assemblers = [wire.TensorAssembler(schema) for _ in group]
        for slot, chunk in _interleaved([encoded[c % len(encoded)] for c in group]):
            assemblers[slot].add(wire.parse_update_chunk(chunk))  # type: ignore[arg-type]
        for client, assembler in zip(group, assemblers, strict=True):
            yield client, assembler.finish()


def fold_fedkube(encoded: Sequence[list], template: Weights, clients: int,
                 concurrency: int) -> Weights:
    """The coordinator's path: assemble, then fold into a running weighted sum."""
    aggregator = RoundAggregator(AggregationConfig(rule="fedavg"), template, max_buffered=0)
    for client, delta in _assembled(encoded, wire.schema_of(template), range(clients),
                                    concurrency):
        aggregator.add(f"sim-{client:04d}", delta, samples_of(client))
        del delta
    return aggregator.finish().mean_delta


def flower_aggregate(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """FedAvg as flwr's `aggregate()` computes it (framework/py/flwr/server/strategy/
    aggregate.py): a copy of every client model scaled by its example count, then the
    per-layer sum of those copies over the total count."""
    total = sum(count for _, count in results)
    scaled = [[layer * count for layer in layers] for layers, count in results]
    return [reduce(np.add, per_layer) / total for per_layer in zip(*scaled, strict=True)]


def fold_flower_style(encoded: Sequence[list], template: Weights, clients: int,
                      concurrency: int) -> Weights:
    """The baseline: keep every update, then aggregate them all at once."""
    names = list(template)
    results: list[tuple[list[np.ndarray], int]] = []
    for client, delta in _assembled(encoded, wire.schema_of(template), range(clients),
                                    concurrency):
        results.append(([delta[name].numpy() for name in names], samples_of(client)))
    mean = flower_aggregate(results)
    return {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in
            zip(names, mean, strict=True)}


def fingerprint(weights: Weights) -> float:
    """A fixed random projection of all values, in float64: aggregations that agree give
    the same number, ones that differ almost surely do not."""
    generator = torch.Generator().manual_seed(12345)
    return float(sum(
        torch.dot(torch.randn(t.numel(), generator=generator, dtype=torch.float64),
                  t.double().reshape(-1))
        for t in weights.values()))


def measure_fold(path: str, *, clients: int, model_bytes: int, concurrency: int) -> dict:
    layout = synthetic_layout(model_bytes)
    template = synthetic_weights(layout, seed=0, scale=0.1)
    encoded = [list(wire.serialized_update_chunks(synthetic_weights(layout, seed=1 + k,
                                                                    scale=0.01)))
               for k in range(DISTINCT_UPDATES)]
    fold = {"fedkube": fold_fedkube, "flower": fold_flower_style}[path]
    # A fold of a tiny model first, unmeasured: the fold's kernels are compiled (numba)
    # once per process, and that compiler's memory is not the round's. (Tiny, so that it
    # leaves no freed heap of the model's size for the measured fold to reuse.)
    tiny = synthetic_layout(64 << 10)
    fold([list(wire.serialized_update_chunks(synthetic_weights(tiny, seed=1, scale=0.01)))],
         synthetic_weights(tiny, seed=0, scale=0.1), 2, concurrency)
    gc.collect()
    with PeakMemory() as peak:
        mean = fold(encoded, template, clients, concurrency)
    return {"path": path, "clients": clients, "model_bytes": wire.encoded_size(template),
            "concurrency": concurrency, "peak_added_bytes": peak.added,
            "peak_memory_over_model": round(peak.added / wire.encoded_size(template), 2),
            "rss_before_bytes": peak.before, "seconds": peak.seconds,
            "fingerprint": fingerprint(mean)}


# ------------------------------------------------------------- a 100 MB model


def measure_wire(model_bytes: int) -> dict:
    """One update of `model_bytes` through to_chunks and TensorAssembler."""
    layout = synthetic_layout(model_bytes)
    weights = synthetic_weights(layout, seed=3, scale=0.01)
    largest = count = 0
    with PeakMemory() as peak:
        assembler = wire.TensorAssembler(wire.schema_of(weights))
        for chunk in wire.to_chunks(weights):
            # What gRPC would carry: the chunk inside SubmitUpdate's UpdateChunk.
            size = _update_message_size(chunk)
            largest, count = max(largest, size), count + 1
            assembler.add(chunk)
        rebuilt = assembler.finish()
    exact = all(torch.equal(rebuilt[name], weights[name]) for name in weights)
    return {"model_bytes": wire.encoded_size(weights), "messages": count,
            "largest_message_bytes": largest, "message_limit_bytes": MAX_MESSAGE,
            "bit_exact": exact, "seconds": peak.seconds, "peak_added_bytes": peak.added}


def _update_message_size(chunk: object) -> int:
    from fedkube.runtime.proto import fedkube_pb2 as pb

    return pb.UpdateChunk(tensor=chunk).ByteSize()


def deep_mlp(*, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A `module:factory` model of about FEDKUBE_BENCH_MODEL_MB (default 100) MB of
    float32 for the gRPC run of part 2: a stack of square layers about 2048 wide, so the
    bytes sit in parameters while activations stay small (one very wide layer would
    make evaluation, not the model, the peak)."""
    megabytes = float(os.environ.get("FEDKUBE_BENCH_MODEL_MB", "100"))
    target = megabytes * MB / 4  # float32 parameters
    inputs = math.prod(input_shape)
    hidden_layers = max(1, round(target / 2048**2))
    # Width w with hidden_layers * w * (w + 1) + (inputs + 1) * w + (w + 1) * classes
    # parameters = target: the positive root of that quadratic in w.
    a, b = hidden_layers, hidden_layers + inputs + 1 + num_classes
    width = max(1, int((-b + math.sqrt(b * b + 4 * a * (target - num_classes))) / (2 * a)))
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(inputs, width), nn.ReLU()]
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def measure_grpc(model_mb: float) -> dict:
    """A one-round `fedkube run` of a job whose model is `model_mb` MB, with one agent."""
    from fedkube.runtime.local import RunOptions, run_job
    from fedkube.runtime.spec import FederatedJob

    here = str(Path(__file__).resolve().parent)
    # The agents import the model factory from this file as module `memory`.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH")) if p)
    os.environ["FEDKUBE_BENCH_MODEL_MB"] = str(model_mb)
    sys.path.insert(0, here)
    job = FederatedJob.model_validate({
        "apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
        "metadata": {"name": "memory-grpc"},
        "spec": {
            "model": "memory:deep_mlp",
            # 64 examples: two SGD steps, so the run is about moving the model.
            "data": {"dataset": "digits", "partition": "iid", "limit": 64},
            "rounds": 1, "clientsPerRound": 1, "minClients": 1,
            "roundTimeoutSeconds": 300, "localEpochs": 1, "batchSize": 32,
            "learningRate": 0.01, "simulation": {"clients": 1},
        },
    })
    with tempfile.TemporaryDirectory(prefix="fedkube-memory-") as scratch, \
            PeakMemory() as peak:
        summary = asyncio.run(run_job(job, RunOptions(output=Path(scratch), quiet=True,
                                                      agent_processes=1)))
    return {"phase": summary["phase"], "message": summary["message"],
            "rounds": summary["rounds"], "bytes_down": summary["bytesDown"],
            "bytes_up": summary["bytesUp"], "wall_seconds": summary["wallSeconds"],
            "coordinator_peak_added_bytes": peak.added,
            "coordinator_rss_before_bytes": peak.before}


# ----------------------------------------------------------------- the driver


def _worker(task: dict) -> dict:
    torch.set_num_threads(1)
    kind = task.pop("kind")
    if kind == "fold":
        return measure_fold(**task)
    if kind == "wire":
        return measure_wire(**task)
    if kind == "grpc":
        return measure_grpc(**task)
    raise ValueError(f"unknown task {kind!r}")


def run_isolated(task: dict, *, timeout: float) -> dict:
    """Run one measurement in a fresh interpreter; its result comes back as JSON."""
    done = subprocess.run(
        [sys.executable, "-P", str(Path(__file__).resolve()), "--worker", json.dumps(task)],
        capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"measurement {task} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _project_skipped(rows: list[dict]) -> None:
    """For skipped baselines, the peak a straight line through the two largest measured
    ones predicts."""
    measured = [(r["clients"], r["flower"]["peak_added_bytes"]) for r in rows if "flower" in r]
    if len(measured) < 2:
        return
    (n0, p0), (n1, p1) = measured[-2:]
    slope = (p1 - p0) / (n1 - n0)
    for row in rows:
        if "skipped" in row:
            row["flower_projected_bytes"] = p1 + slope * (row["clients"] - n1)
            row["skipped"] += (f"; projected from N={n0},{n1}: "
                               f"{row['flower_projected_bytes'] / (1024 * MB):.1f} GB")


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / MB:,.1f}"


def render(report: dict) -> str:
    model = report["model_bytes"]
    lines = [
        (f"memory: fedavg fold of N updates of a {model / MB:.1f} MB model, {report['concurrency']} "
        "uploads assembled at a time; resident memory added at the peak (MB)"),
        "",
        (f"{'N':>6} {'fedkube':>10} {'x model':>8} {'s/update':>9} {'flower-style':>13} "
        f"{'x model':>8} {'s/update':>9}  same mean"),
    ]
    for row in report["fold"]:
        f, b = row["fedkube"], row.get("flower")
        fedkube = (f"{_mb(f['peak_added_bytes']):>10} {f['peak_added_bytes'] / model:>8.1f} "
                   f"{f['seconds'] / row['clients']:>9.4f}")
        if b is None:
            baseline = f"{'skipped':>13} {'':>8} {'':>9}  ({row['skipped']})"
        else:
            agree = "yes" if row["same_mean"] else "NO"
            baseline = (f"{_mb(b['peak_added_bytes']):>13} {b['peak_added_bytes'] / model:>8.1f} "
                        f"{b['seconds'] / row['clients']:>9.4f}  {agree}")
        lines.append(f"{row['clients']:>6} {fedkube} {baseline}")
    wire_result = report.get("wire")
    if wire_result:
        lines += [
            "",
            (f"wire: a {wire_result['model_bytes'] / MB:.1f} MB update in "
             f"{wire_result['messages']} messages, the largest "
             f"{wire_result['largest_message_bytes'] / MB:.2f} MB (both ends' limit "
             f"{MAX_MESSAGE / MB:.2f} MB); rebuilt bit-exact: "
             f"{'yes' if wire_result['bit_exact'] else 'NO'}; "
             f"{wire_result['seconds']:.2f} s; peak +{_mb(wire_result['peak_added_bytes'])} MB "
             "(sender and receiver in one process)"),
        ]
    grpc_result = report.get("grpc")
    if grpc_result:
        lines.append(
            f"gRPC: one-round `fedkube run` of a {report['grpc_model_mb']:.0f} MB model: "
            f"{grpc_result['phase']}, GetModel {_mb(grpc_result['bytes_down'])} MB down, "
            f"SubmitUpdate {_mb(grpc_result['bytes_up'])} MB up, "
            f"{grpc_result['wall_seconds']:.1f} s wall; coordinator peak "
            f"+{_mb(grpc_result['coordinator_peak_added_bytes'])} MB")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=lambda s: [int(v) for v in s.split(",")],
                        help="comma-separated N (default 10,100,1000; 10,100 with --quick)")
    parser.add_argument("--model-mb", type=float, help="model size for the fold "
                        "(default 10; 2 with --quick)")
    parser.add_argument("--wire-mb", type=float, help="model size for part 2 "
                        "(default 100; 20 with --quick)")
    parser.add_argument("--concurrency", type=int, default=UPLOAD_SLOTS,
                        help=f"uploads assembled at once (default {UPLOAD_SLOTS}, as the coordinator)")
    parser.add_argument("--baseline-limit-gb", type=float, default=None,
                        help="skip a baseline whose estimated need exceeds this "
                        "(default: a third of the memory available now)")
    parser.add_argument("--no-grpc", action="store_true", help="skip the gRPC run of part 2")
    parser.add_argument("--quick", action="store_true",
                        help="2 MB model, N = 10,100, 20 MB wire test, no gRPC run")
    parser.add_argument("--output", type=Path, help="write the figures as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("bench/memory.py reads /proc (Linux only)")
    clients = args.clients or ([10, 100] if args.quick else [10, 100, 1000])
    model_mb = args.model_mb or (2.0 if args.quick else 10.0)
    wire_mb = args.wire_mb or (20.0 if args.quick else 100.0)
    limit = (args.baseline_limit_gb * 1024 * MB if args.baseline_limit_gb is not None
             else available_bytes() / 3)
    model_bytes = int(model_mb * MB)
    report: dict = {"model_bytes": None, "concurrency": args.concurrency, "fold": [],
                    "baseline_limit_bytes": limit}
    for n in clients:
        fold_task = {"kind": "fold", "clients": n, "model_bytes": model_bytes,
                     "concurrency": args.concurrency}
        row: dict = {"clients": n, "fedkube": run_isolated({**fold_task, "path": "fedkube"},
                                                           timeout=3600)}
        report["model_bytes"] = row["fedkube"]["model_bytes"]
        # Every update kept plus a scaled copy of each: about 2 N models.
        need = 2 * n * row["fedkube"]["model_bytes"]
        if need > limit:
            row["skipped"] = (f"needs about {need / (1024 * MB):.1f} GB, over the "
                              f"{limit / (1024 * MB):.1f} GB allowed")
        else:
            row["flower"] = run_isolated({**fold_task, "path": "flower"}, timeout=3600)
            a, b = row["fedkube"]["fingerprint"], row["flower"]["fingerprint"]
            # float64 sum vs flwr's float32 arithmetic: equal to float32 precision.
            row["same_mean"] = math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
        report["fold"].append(row)
    _project_skipped(report["fold"])
    report["wire"] = run_isolated({"kind": "wire", "model_bytes": int(wire_mb * MB)},
                                  timeout=600)
    if not (args.no_grpc or args.quick):
        report["grpc_model_mb"] = wire_mb
        report["grpc"] = run_isolated({"kind": "grpc", "model_mb": wire_mb}, timeout=900)
    report["machine"] = {"cpus": os.cpu_count(), "load_average": list(os.getloadavg()),
                         "torch": torch.__version__}
    print(render(report))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
