"""`fedkube run JOB.yaml`: the coordinator and `spec.simulation.clients` agents on one
machine. The coordinator runs in this process; each agent is a separate OS process that
talks to it over real gRPC on 127.0.0.1 — the same code path as a cluster."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from .coordinator.engine import RoundEngine, RoundRecord
from .coordinator.report import RunReport
from .coordinator.server import serve
from .coordinator.status import FanOut
from .coordinator.tracking import tracker_for
from .spec import ClientNodeSpec, ClientNodeStatus, FederatedJob, FederatedJobStatus

log = logging.getLogger("fedkube.run")


@dataclass(frozen=True)
class RunOptions:
    output: Path
    clients: int | None = None  # overrides spec.simulation.clients
    quiet: bool = False
    agent_threads: int = 1
    # One interpreter per core, each hosting several agents, each with its own channel:
    # N clients on a laptop should not cost N copies of torch in memory and start-up.
    agent_processes: int = max(1, os.cpu_count() or 1)
    extra_agent_args: tuple[str, ...] = ()
    mlflow_uri: str | None = None  # overrides spec.tracking.mlflow.trackingUri


class ConsoleProgress:
    """A progress bar over rounds and one line per round."""

    def __init__(self, job: FederatedJob, *, stream: TextIO, enabled: bool) -> None:
        self.privacy = job.spec.privacy.mode != "none"
        # The bar only where a person watches a terminal; logs get the per-round lines.
        self.bar = tqdm(total=job.spec.rounds, desc=job.metadata.name, unit="round",
                        file=stream, disable=not (enabled and stream.isatty()),
                        dynamic_ncols=True, leave=True)
        self.enabled = enabled

    def round(self, record: RoundRecord) -> None:
        line = (f"round {record.round:>3}  accuracy {record.accuracy:.4f}  loss "
                f"{record.loss:.4f}  clients {record.clients_in}/{record.clients_selected}  "
                f"{record.seconds:.2f}s")
        if record.epsilon is not None:
            line += f"  ε {record.epsilon:.3f}"
        if self.enabled:
            tqdm.write(line, file=sys.stderr)
        self.bar.update(1)

    def publish_job(self, status: FederatedJobStatus) -> None:
        if status.accuracy is not None:
            self.bar.set_postfix(acc=f"{status.accuracy:.3f}", clients=status.clients_summary)

    def publish_client(self, spec: ClientNodeSpec, status: ClientNodeStatus) -> None:
        """Clients are shown in summary.json; the console stays one line per round."""

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        if warning and self.enabled:
            self.bar.write(f"warning: {reason}: {message}")

    def close(self) -> None:
        self.bar.close()


def agent_command(*, port: int, indexes: list[int], state_dir: Path) -> list[str]:
    command = [sys.executable, "-P", "-m", "fedkube.runtime.cli", "agent",
               "--coordinator", f"127.0.0.1:{port}", "--device", "cpu",
               "--state-dir", str(state_dir), "--give-up-after", "60"]
    for index in indexes:
        command += ["--simulated-index", str(index)]
    return command


def agent_groups(clients: int, processes: int) -> list[list[int]]:
    """Simulated client indexes spread over `processes` OS processes, round-robin."""
    count = max(1, min(clients, processes))
    return [list(range(start, clients, count)) for start in range(count)]


def _agent_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # N agents share the machine's cores: one thread each avoids oversubscription.
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONSAFEPATH="1", FEDKUBE_TORCH_THREADS=str(threads))
    return env


class AgentProcesses:
    def __init__(self, count: int, *, port: int, output: Path, threads: int, processes: int,
                 extra_args: tuple[str, ...]) -> None:
        logs = output / "agents"
        logs.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen[bytes]] = []
        self._files = []
        for number, indexes in enumerate(agent_groups(count, processes)):
            log_file = (logs / f"agents-{number:02d}.log").open("ab")
            self._files.append(log_file)
            self.processes.append(subprocess.Popen(
                [*agent_command(port=port, indexes=indexes, state_dir=output / "agent-state"),
                 *extra_args],
                stdout=log_file, stderr=subprocess.STDOUT, env=_agent_env(threads),
                start_new_session=True))

    def stop(self, timeout: float = 10.0) -> list[int | None]:
        deadline = time.monotonic() + timeout
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for f in self._files:
            f.close()
        return [p.returncode for p in self.processes]


async def run_job(job: FederatedJob, options: RunOptions) -> dict[str, Any]:
    """Run the job to its end; returns summary.json's content."""
    clients = options.clients if options.clients is not None else job.spec.simulation.clients
    if clients < 1:
        raise ValueError("spec.simulation.clients: fedkube run needs at least 1 simulated "
                         "client (or pass --clients N)")
    if clients != job.spec.simulation.clients:
        spec = job.spec.model_copy(update={
            "simulation": job.spec.simulation.model_copy(update={"clients": clients})})
        job = job.model_copy(update={"spec": type(job.spec).model_validate(spec.model_dump())})
    options.output.mkdir(parents=True, exist_ok=True)
    report = RunReport(options.output, job=job.metadata.name,
                       target_epsilon=job.spec.privacy.target_epsilon,
                       target_accuracy=job.spec.convergence.target_accuracy)
    progress = ConsoleProgress(job, stream=sys.stderr, enabled=not options.quiet)

    def on_round(record: RoundRecord) -> None:
        report.round(record)
        progress.round(record)

    engine = RoundEngine(job, sink=FanOut(report, progress), output_dir=options.output,
                         on_round=on_round)
    tracker = tracker_for(job, output_dir=options.output, uri_override=options.mlflow_uri)
    if tracker is not None:
        engine.events.subscribe(tracker)
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    started = time.monotonic()
    server = asyncio.create_task(serve(engine, host="127.0.0.1", port=0, on_bound=bound))
    agents: AgentProcesses | None = None
    try:
        port = await asyncio.wait_for(asyncio.shield(bound), timeout=60)
        agents = AgentProcesses(clients, port=port, output=options.output,
                                threads=options.agent_threads,
                                processes=options.agent_processes,
                                extra_args=options.extra_agent_args)
        status = await server
    finally:
        progress.close()
        if not server.done():
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server
        exit_codes = await asyncio.to_thread(agents.stop) if agents else []
    summary = report.finish({
        "wall_seconds": round(time.monotonic() - started, 3),
        "agents": clients,
        "agent_exit_codes": exit_codes,
        "phase": status.phase.value,
        "message": status.message,
    })
    if tracker is not None:
        await asyncio.to_thread(tracker.finish, model=engine.model, weights=engine.weights,
                                phase=status.phase)
    return summary
