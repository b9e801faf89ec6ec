"""Heterogeneous devices: time to a target accuracy with 30% of the clients 10x slower,
and what the coordinator costs per round at 10, 100 and 1,000 registered clients.

(a) Time to target, three `run_job` runs (the code path of `fedkube run`: coordinator in
    this process, simulated agents in OS processes over real gRPC on 127.0.0.1), same
    data, model, seed and drill (`simulation.speed: {slowFraction: 0.3, slowdown: 10}`):
      sync-random    the baseline: synchronous FedAvg, uniform selection;
      sync-adaptive  selection: adaptive (Oort-style utility) + localWork: adaptive with
                     strategy fednova;
      async-fedbuff  strategy.mode async (FedBuff), concurrency = clientsPerRound,
                     bufferSize = clientsPerRound, so one server step folds as many
                     updates as one synchronous round.
    Time to target is the sum of the round (server step) durations in metrics.jsonl up to
    the first that reaches the target accuracy (agent start-up and registration excluded,
    the same for all three). Each variant runs once per seed (`--seeds`, default 1,2,3);
    the headline is the median over seeds of each seed's ratio to sync-random.
(b) Coordinator scale, in this process, on the engine's own code without gRPC: N
    clients registered through `RoundEngine.register` with open task streams, then rounds
    of 100 (or N) selected clients: `_open_round` (selection over N), dispatch, every
    update through `RoundEngine.accept_update` (what the servicer calls once an upload is
    decoded: admission, bounds, the running sum, the round's completion check, the
    client's record and the event stream), `close`, the server step. Reported:
    resident memory added over the engine alone, against the target 3x the model + 1 MB
    per 100 clients, and the median time per update and per round's selection, against
    N = 10 and against the same updates per round with 100 registered.

(c) `fedkube run` at 10, 100 and 1,000 simulated clients (100 per round, 2 rounds, mlp
    on digits), each in a fresh interpreter: the coordinator's own resident memory (that
    process: before the run and its peak) apart from the agent processes' (their summed
    peak), and the shut-down time (job end to files written) from summary.json. The
    growth of the coordinator's added memory (peak - before) from 10 to N clients is held
    against 1 MB per 100 clients plus 3x the model. Beside it, in the same run, a bare
    grpcio server (the coordinator's options, no code of ours) with 10 and then N server
    streams held open, as the agents hold their task streams: its RSS per open stream is
    gRPC's own cost, reported apart from the rest of the growth.

Figures are from one run on whatever machine runs it (a shared, loaded one moves the
wall times; the ratios are taken within the run).

    python -P bench/heterogeneity.py                  # mnist5k, mlp, 20 clients
    python -P bench/heterogeneity.py --quick          # digits, fewer rounds
    python -P bench/heterogeneity.py --output heterogeneity.json
    python -P bench/heterogeneity.py --only-accuracy --reuse-scale bench/heterogeneity.json \
        --output heterogeneity.json                  # (a) again, (b) and (c) copied
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------ (a) time to target


def _job(name: str, *, quick: bool, clients: int, per_round: int, rounds: int,
         target: float, seed: int = 1, **extra: Any):
    from fedkube.runtime.spec import FederatedJob

    spec = {
        "model": "mlp",
        "data": {"dataset": "digits" if quick else "mnist5k", "partition": "iid"},
        "rounds": rounds, "clientsPerRound": per_round, "minClients": max(1, per_round // 2),
        "roundTimeoutSeconds": 120, "localEpochs": 3, "batchSize": 16, "learningRate": 0.05,
        "simulation": {"clients": clients, "speed": {"slowFraction": 0.3, "slowdown": 10}},
        "convergence": {"targetAccuracy": target},
        "seed": seed,
        **extra,
    }
    return FederatedJob.model_validate({
        "apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
        "metadata": {"name": name}, "spec": spec})


VARIANTS: dict[str, dict[str, Any]] = {
    "sync-random": {"strategy": {"name": "fedavg"}},
    "sync-adaptive": {"strategy": {"name": "fednova"}, "selection": {"mode": "adaptive"},
                      "localWork": {"mode": "adaptive"}},
    "async-fedbuff": {"strategy": {"name": "fedavg", "mode": "async"}},
}


def _one_run(name: str, extra: dict[str, Any], *, seed: int, quick: bool, clients: int,
             per_round: int, rounds: int, target: float) -> dict[str, Any]:
    from fedkube.runtime.local import RunOptions, run_job

    extra = json.loads(json.dumps(extra))
    if name == "async-fedbuff":
        extra["strategy"]["bufferSize"] = per_round
    job = _job(name, quick=quick, clients=clients, per_round=per_round, rounds=rounds,
               target=target, seed=seed, **extra)
    with tempfile.TemporaryDirectory(prefix=f"fedkube-bench-{name}-") as scratch:
        summary = asyncio.run(run_job(job, RunOptions(output=Path(scratch), quiet=True)))
        records = [json.loads(line) for line in
                   (Path(scratch) / "metrics.jsonl").read_text().splitlines() if line]
    elapsed, reached = 0.0, None
    for record in records:
        elapsed += record["seconds"]
        if record["accuracy"] >= target:
            reached = elapsed
            break
    return {
        "seed": seed, "seconds_to_target": None if reached is None else round(reached, 2),
        "rounds": len(records), "best_accuracy": summary["bestAccuracy"],
        "phase": summary["phase"], "wall_seconds": summary["wallSeconds"],
        # Per round, so a ratio can be read back: round 1 (no speeds known yet) weighs most.
        "round_seconds": [round(r["seconds"], 3) for r in records],
        "accuracies": [r["accuracy"] for r in records],
    }


def time_to_target(*, quick: bool, clients: int, per_round: int, rounds: int,
                   target: float, seeds: list[int]) -> dict[str, Any]:
    """Each variant once per seed (seed: data partition, model init, which clients are
    slow, the selection draws); the variants of one seed run back to back, so a ratio is
    taken between runs minutes apart. The headline is the median over seeds of each
    seed's ratio: one run can need several rounds more or less to cross the target (it
    sits within a round's gain of round 3's accuracy), and a single run's ratio moved
    1.1x-3.5x at the same load and code."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    for seed in seeds:
        for name, extra in VARIANTS.items():
            run = _one_run(name, extra, seed=seed, quick=quick, clients=clients,
                           per_round=per_round, rounds=rounds, target=target)
            runs[name].append(run)
            print(f"  seed {seed} {name:14s} {_fmt(run['seconds_to_target'])} s to "
                  f"{target:.2f} in {run['rounds']} rounds/steps (best {run['best_accuracy']},"
                  f" wall {run['wall_seconds']:.1f} s)", flush=True)
    results: dict[str, Any] = {}
    for name, these in runs.items():
        times = [r["seconds_to_target"] for r in these if r["seconds_to_target"] is not None]
        results[name] = {
            "median_seconds_to_target": round(statistics.median(times), 2) if times else None,
            "reached": f"{len(times)}/{len(these)}", "runs": these}
    base = runs["sync-random"]
    for name in ("sync-adaptive", "async-fedbuff"):
        ratios = [round(b["seconds_to_target"] / m["seconds_to_target"], 2)
                  for b, m in zip(base, runs[name], strict=True)
                  if b["seconds_to_target"] and m["seconds_to_target"]]
        results[name]["speedups_over_sync_random"] = ratios
        # A seed that never reached the target gives no ratio: the count says so.
        results[name]["speedup_over_sync_random"] = (
            round(statistics.median(ratios), 2) if len(ratios) == len(seeds) else None)
    return results


def _fmt(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.1f}"


# ------------------------------------------------------------------ (b) coordinator scale


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def _scale_once(registered: int, per_round: int, rounds: int) -> dict[str, Any]:
    import torch
    from fedkube.runtime.coordinator.engine import RoundEngine
    from fedkube.runtime.coordinator.round import Round
    from fedkube.runtime.messages import NodeFacts, Payload, Registration, UpdateHeader
    from fedkube.runtime.spec import FederatedJob

    job = FederatedJob.model_validate({
        "apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
        "metadata": {"name": f"scale-{registered}"},
        "spec": {"model": "mlp", "data": {"dataset": "digits"}, "rounds": 1000,
                 "clientsPerRound": min(per_round, registered), "minClients": 1,
                 "selection": {"mode": "adaptive"},
                 "admission": {"maxClients": max(1000, registered),
                               "registrationsPerSecond": 1e6, "registrationBurst": 100000}},
    })
    gc.collect()
    engine = RoundEngine(job, registration_timeout=1)
    model_bytes = sum(t.numel() * t.element_size() for t in engine.weights.values())
    gc.collect()
    before = _rss()
    for i in range(registered):
        admission = engine.register(Registration(
            node_id=f"node-{i:05d}", join_token="",
            facts=NodeFacts(num_samples=50 + i % 50), simulated_index=None))
        engine.open_stream(admission.node_id)
    rng = torch.Generator().manual_seed(0)
    update_times: list[float] = []
    select_times: list[float] = []
    for number in range(1, rounds + 1):
        started = time.perf_counter()
        opened = engine._open_round(number)
        select_times.append(time.perf_counter() - started)
        assert isinstance(opened, Round), opened
        engine.open_round = opened
        opened.dispatch()
        for node_id, client in opened.selected.items():
            delta = {k: torch.randn(v.shape, generator=rng) * 1e-3
                     for k, v in engine.weights.items()}
            header = UpdateHeader(node_id=node_id, round=number, payload=Payload.DELTA,
                                  model_version=engine.version, num_samples=50,
                                  metrics={"loss": 1.0 + (hash(node_id) % 7) / 7, "steps": 3.0})
            started = time.perf_counter()
            await engine.accept_update(header, delta, nbytes=0)
            update_times.append(time.perf_counter() - started)
            # The speeds the next selection sees: a spread, as a real fleet's.
            client.update_arrived(nbytes=0, seconds=0.1 + (hash(node_id) % 10) / 10,
                                  metrics=header.metrics)
            while not client.tasks.empty():  # no agent reads them here
                client.tasks.get_nowait()
        result = await opened.close()
        engine.open_round = None
        assert result.aggregate is not None
        engine.weights = engine.server_optimizer.step(engine.weights, result.aggregate.mean_delta)
        engine.version += 1
    gc.collect()
    added = _rss() - before
    budget = 3 * model_bytes + registered / 100 * 1024 * 1024
    return {"registered": registered, "per_round": min(per_round, registered),
            "model_bytes": model_bytes, "added_bytes": added, "budget_bytes": int(budget),
            "within_budget": added <= budget,
            # Medians: on a shared machine a mean follows whoever else is busy.
            "seconds_per_update": statistics.median(update_times),
            "mean_seconds_per_update": statistics.fmean(update_times),
            "selection_seconds_per_round": statistics.median(select_times),
            "selection_seconds_per_client": statistics.median(select_times) / registered}


def coordinator_scale(sizes: list[int], *, per_round: int, rounds: int) -> list[dict]:
    rows = []
    asyncio.run(_scale_once(sizes[0], per_round, rounds))  # warm-up: threads, allocator
    for registered in sizes:
        row = asyncio.run(_scale_once(registered, per_round, rounds))
        rows.append(row)
        print(f"  {registered:5d} registered, {row['per_round']:3d}/round: added memory "
              f"{row['added_bytes'] / 2**20:6.2f} MiB (budget {row['budget_bytes'] / 2**20:.2f}"
              f" MiB), {row['seconds_per_update'] * 1e3:.2f} ms/update, selection "
              f"{row['selection_seconds_per_round'] * 1e3:.2f} ms/round "
              f"({row['selection_seconds_per_client'] * 1e6:.1f} us/client)", flush=True)
    base = rows[0]["seconds_per_update"]
    same_round = {row["per_round"]: row["seconds_per_update"] for row in rows[:-1]}
    for row in rows:
        row["update_time_over_smallest"] = round(row["seconds_per_update"] / base, 2)
        # Against the smaller registry with the same updates per round (1,000 vs 100).
        if row["per_round"] in same_round:
            row["update_time_over_same_round_size"] = round(
                row["seconds_per_update"] / same_round[row["per_round"]], 2)
    return rows


# ------------------------------------------------------------------ (c) fedkube run at scale


def _rss_of(pid: str = "self") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children() -> list[str]:
    me, kids = str(__import__("os").getpid()), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("PPid:"):
                        if line.split()[1] == me:
                            kids.append(entry.name)
                        break
            except OSError:
                pass
    return kids


def run_scale_once(clients: int, *, per_round: int, rounds: int) -> dict[str, Any]:
    import threading

    from fedkube.runtime.local import RunOptions, run_job
    from fedkube.runtime.spec import FederatedJob

    job = FederatedJob.model_validate({
        "apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
        "metadata": {"name": f"run-scale-{clients}"},
        "spec": {"model": "mlp", "data": {"dataset": "digits"}, "rounds": rounds,
                 "clientsPerRound": min(per_round, clients),
                 "minClients": min(per_round, clients), "localEpochs": 1, "batchSize": 16,
                 "roundTimeoutSeconds": 300, "simulation": {"clients": clients},
                 "admission": {"maxClients": max(1000, clients),
                               "registrationsPerSecond": 1e6, "registrationBurst": 100000}}})
    peak = {"coordinator": 0, "agents": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak["coordinator"] = max(peak["coordinator"], _rss_of())
            peak["agents"] = max(peak["agents"], sum(_rss_of(k) for k in _children()))

    gc.collect()
    before = _rss_of()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tempfile.TemporaryDirectory(prefix="fedkube-bench-scale-") as scratch:
        summary = asyncio.run(run_job(job, RunOptions(output=Path(scratch), quiet=True)))
    done.set()
    sampler.join()
    return {"clients": clients, "coordinator_before_bytes": before,
            "coordinator_peak_bytes": max(peak["coordinator"], before),
            "agents_peak_bytes": peak["agents"], "phase": summary["phase"],
            "startup_seconds": summary["startupSeconds"],
            "shutdown_seconds": summary["shutdownSeconds"],
            "wall_seconds": summary["wallSeconds"]}


def run_scale(sizes: list[int], *, per_round: int, rounds: int) -> dict[str, Any]:
    """Each size in a fresh interpreter (this script with --run-scale-child), so no run
    inherits the heap of the one before."""
    import subprocess
    import sys

    rows = []
    for clients in sizes:
        done = subprocess.run(
            [sys.executable, "-P", __file__, "--run-scale-child", str(clients),
             "--per-round", str(per_round), "--run-rounds", str(rounds)],
            check=True, capture_output=True, text=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  {clients:5d} clients: coordinator {row['coordinator_before_bytes'] / 2**20:.0f}"
              f" -> peak {row['coordinator_peak_bytes'] / 2**20:.0f} MiB, agents (all "
              f"processes) peak {row['agents_peak_bytes'] / 2**20:.0f} MiB, start-up "
              f"{row['startup_seconds']:.1f} s, shut-down {row['shutdown_seconds']:.1f} s "
              f"({row['phase']})", flush=True)
    from fedkube.runtime.models import build_model

    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, seed=0)
    model_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    def added(row: dict[str, Any]) -> int:
        return row["coordinator_peak_bytes"] - row["coordinator_before_bytes"]

    for row in rows:
        row["coordinator_added_bytes"] = added(row)
    bare = grpc_stream_baseline([rows[0]["clients"], rows[-1]["clients"]])
    for row in rows[1:]:
        more = row["clients"] - rows[0]["clients"]
        grown = added(row) - added(rows[0])
        budget = 3 * model_bytes + more / 100 * 2**20
        grpc_streams = more * bare["bytes_per_open_stream"]
        row["coordinator_growth_over_smallest_bytes"] = grown
        row["growth_budget_bytes"] = int(budget)
        row["within_budget"] = grown <= budget
        # What is left once gRPC's own cost of the extra open task streams is taken off.
        row["grpc_open_streams_bytes"] = grpc_streams
        row["growth_less_grpc_streams_bytes"] = grown - grpc_streams
        row["within_budget_less_grpc_streams"] = grown - grpc_streams <= budget
        print(f"  {row['clients']:5d} vs {rows[0]['clients']} clients: the coordinator's added "
              f"memory (peak - before) grew {grown / 2**20:.1f} MiB (budget "
              f"{budget / 2**20:.1f} MiB); gRPC's own {more} more open streams "
              f"{grpc_streams / 2**20:.1f} MiB, the rest {(grown - grpc_streams) / 2**20:.1f} MiB",
              flush=True)
    return {"sizes": rows, "grpc_baseline": bare}


# ------------------------------------------------------------------ (c) gRPC's own share

BARE_SERVICE = "bench.BareStreams"


async def _bare_server() -> None:
    """A grpcio server with the coordinator's options and nothing of ours: each Open call
    is held open as StreamTasks holds a task stream; Stats says how many and the RSS."""
    import grpc
    from fedkube.runtime.coordinator.server import GRPC_OPTIONS

    opened, held = 0, asyncio.Event()

    async def open_stream(request: bytes, context: Any):
        nonlocal opened
        opened += 1
        try:
            await held.wait()
            yield b""
        finally:
            opened -= 1

    async def stats(request: bytes, context: Any) -> bytes:
        return json.dumps({"open": opened, "rss": _rss_of()}).encode()

    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(BARE_SERVICE, {
        "Open": grpc.unary_stream_rpc_method_handler(open_stream),
        "Stats": grpc.unary_unary_rpc_method_handler(stats)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def _bare_clients(port: int, count: int) -> None:
    """`count` streams, each on its own channel made as an agent makes its channel."""
    import grpc
    from fedkube.runtime.agent.client import GRPC_OPTIONS

    calls = []
    for _ in range(count):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
        calls.append((channel, asyncio.ensure_future(
            channel.unary_stream(f"/{BARE_SERVICE}/Open")(b"").read())))
    await asyncio.Event().wait()


async def _bare_stats(port: int) -> dict[str, int]:
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return json.loads(await channel.unary_unary(f"/{BARE_SERVICE}/Stats")(b""))


def grpc_stream_baseline(sizes: list[int], *, processes: int = 2) -> dict[str, Any]:
    """What gRPC itself keeps per open server stream: a bare grpcio server (the
    coordinator's options) with 10, then N streams open from `processes` client
    processes (agent channel options), as `fedkube run`'s agents hold their task
    streams. Its RSS growth per stream is the part of (c) no code of ours allocates."""
    import subprocess
    import sys

    child = [sys.executable, "-P", __file__]
    server = subprocess.Popen([*child, "--bare-server-child"], stdout=subprocess.PIPE, text=True)
    clients: list[subprocess.Popen] = []
    rows = []
    try:
        port = int(server.stdout.readline())  # type: ignore[union-attr]
        total = 0
        for target in sizes:
            more = target - total
            for share in (more // processes + (i < more % processes) for i in range(processes)):
                if share:
                    clients.append(subprocess.Popen([*child, "--bare-clients-child",
                                                     f"{port}:{share}"]))
            total = target
            deadline = time.monotonic() + 300
            stats = asyncio.run(_bare_stats(port))
            while stats["open"] < target:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {stats['open']} of {target} bare streams opened")
                time.sleep(0.2)  # polling the child server for its count, with a deadline
                stats = asyncio.run(_bare_stats(port))
            rows.append({"streams": stats["open"], "rss_bytes": stats["rss"]})
    finally:
        for process in (*clients, server):
            process.kill()
            process.wait()
    first, last = rows[0], rows[-1]
    per_stream = (last["rss_bytes"] - first["rss_bytes"]) / (last["streams"] - first["streams"])
    print(f"  bare grpcio server: {per_stream / 1024:.1f} KiB per open server stream "
          f"({first['streams']} -> {last['streams']} streams)", flush=True)
    return {"rows": rows, "bytes_per_open_stream": round(per_stream)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits and fewer rounds")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--target", type=float, default=None,
                        help="target accuracy (default 0.85 on mnist5k, 0.80 on digits)")
    parser.add_argument("--skip-accuracy", action="store_true", help="only the scale parts")
    parser.add_argument("--seeds", default="1,2,3,4,5",
                        help="(a): seeds, each variant once per seed; the median ratio is "
                        "the headline (comma-separated)")
    parser.add_argument("--only-accuracy", action="store_true",
                        help="only (a); with --reuse-scale FILE the scale parts are copied")
    parser.add_argument("--reuse-scale", type=Path,
                        help="with --only-accuracy: take (b) and (c) from this earlier JSON")
    parser.add_argument("--skip-run-scale", action="store_true",
                        help="skip (c), fedkube run with 1,000 clients (minutes)")
    parser.add_argument("--run-sizes", default="10,100,1000",
                        help="client counts of (c), comma-separated")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument("--run-scale-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-rounds", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--bare-server-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare-clients-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_server_child:
        asyncio.run(_bare_server())
        return 0
    if args.bare_clients_child:
        port, count = args.bare_clients_child.split(":")
        asyncio.run(_bare_clients(int(port), int(count)))
        return 0
    if args.run_scale_child:  # one size of (c), in its own interpreter
        print(json.dumps(run_scale_once(args.run_scale_child, per_round=args.per_round,
                                        rounds=args.run_rounds)))
        return 0
    target = args.target or (0.80 if args.quick else 0.85)
    out: dict[str, Any] = {"target_accuracy": target, "clients": args.clients,
                           "per_round": args.per_round, "slow_fraction": 0.3, "slowdown": 10}
    if not args.skip_accuracy:
        print(f"(a) time to accuracy {target:.2f}, {args.clients} clients, 30% 10x slower:")
        out["time_to_target"] = time_to_target(
            quick=args.quick, clients=args.clients, per_round=args.per_round,
            rounds=25 if args.quick else 40, target=target,
            seeds=[int(s) for s in args.seeds.split(",")])
        for name in ("sync-adaptive", "async-fedbuff"):
            row = out["time_to_target"][name]
            print(f"  {name}: median {row['speedup_over_sync_random']}x faster than "
                  f"sync-random (per seed {row['speedups_over_sync_random']}; target 2x)")
    if args.only_accuracy:
        if args.reuse_scale:
            earlier = json.loads(args.reuse_scale.read_text())
            for part in ("coordinator_scale", "run_scale"):
                if part in earlier:
                    out[part] = earlier[part]
            out["scale_parts_from"] = f"an earlier run ({args.reuse_scale.name})"
    else:
        print("(b) coordinator per round (in-process, no gRPC):")
        out["coordinator_scale"] = coordinator_scale([10, 100, 1000], per_round=100, rounds=10)
    if not args.skip_run_scale and not args.only_accuracy:
        print("(c) fedkube run, coordinator and agent processes apart:")
        out["run_scale"] = run_scale([int(n) for n in args.run_sizes.split(",")],
                                     per_round=100, rounds=args.run_rounds)
    if args.output:
        args.output.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
