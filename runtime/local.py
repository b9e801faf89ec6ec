"""`fedkube run JOB.yaml`: the coordinator and `spec.simulation.clients` agents on one
machine. The coordinator runs in this process; each agent is a separate OS process that
talks to it over real gRPC on 127.0.0.1 — the same code path as a cluster.

An output folder holds one run: a finished run there is refused, an unfinished one is
continued only when asked (`existing="resume"`), and `existing="fresh"` starts over.
SIGINT (Ctrl-C) and SIGTERM stop the run within a couple of seconds: agents are
terminated, the job ends Stopped, summary.json and the plot cover the rounds done, and the
last checkpoint lets `--resume` continue."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .coordinator import checkpoint
from .coordinator.async_rounds import engine_for
from .coordinator.engine import RoundEngine, RoundRecord
from .coordinator.report import RunReport
from .coordinator.server import serve
from .coordinator.status import FanOut
from .coordinator.tracking import tracker_for
from .prefork import ForkedAgent
from .progress import ConsoleProgress
from .spec import FederatedJob, ManifestError, parse_job_spec

log = logging.getLogger("fedkube.run")

Existing = Literal["refuse", "resume", "fresh"]


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
    # What to do with a previous run in `output`: refuse (default), resume it, start over.
    existing: Existing = "refuse"
    job_file: str = "JOB.yaml"  # for the hints in messages
    started: float | None = None  # time.monotonic() when the command started
    mlflow_uri: str | None = None  # overrides spec.tracking.mlflow.trackingUri


class RunFolderError(ValueError):
    """The output folder holds a run that this command may not continue or overwrite."""


def with_clients(job: FederatedJob, clients: int | None) -> FederatedJob:
    """`job` with `simulation.clients` set to `clients` (the `--clients` flag), checked
    like the manifest itself; ManifestError names the flag and the reason."""
    count = clients if clients is not None else job.spec.simulation.clients
    if count < 1:
        where = f"--clients {count}" if clients is not None else "spec.simulation.clients"
        raise ManifestError(f"{where}: fedkube run needs at least 1 simulated client")
    if count == job.spec.simulation.clients:
        return job
    raw = job.spec.model_dump(by_alias=True, exclude_none=True)
    raw["simulation"] = {**raw.get("simulation", {}), "clients": count}
    try:
        spec = parse_job_spec(raw)
    except ManifestError as error:
        reasons = "; ".join(line.removeprefix("spec: ") for line in str(error).splitlines())
        raise ManifestError(f"--clients {count}: {reasons}") from None
    return job.model_copy(update={"spec": spec})


def prepare_folder(output: Path, existing: Existing, *, job_file: str) -> checkpoint.FolderState:
    """Check what `output` holds against `existing`; clear it for a fresh start."""
    state = checkpoint.inspect(output)
    again = f"fedkube run {job_file} --output {output}"
    if existing == "fresh":
        checkpoint.clear(output)
        return checkpoint.FolderState(rounds_done=None)
    if state.finished:
        raise RunFolderError(
            f"{output} holds a finished run ({state.final_phase} after {state.rounds_done} "
            f"rounds: {state.final_message}); start over with `{again} --fresh` or choose "
            "another --output")
    if existing == "resume":
        if state.empty:
            raise RunFolderError(f"--resume: {output} holds no checkpoint to resume; run "
                                 f"without --resume to start")
        return state
    if not state.empty:
        raise RunFolderError(
            f"{output} holds an unfinished run ({state.rounds_done} rounds done); continue "
            f"it with `{again} --resume` or start over with `{again} --fresh`")
    checkpoint.clear(output)  # leftovers of a run stopped before its first checkpoint
    return state


def agent_args(*, port: int, indexes: list[int], state_dir: Path) -> list[str]:
    """The `fedkube` arguments of one agent process hosting the simulated `indexes`."""
    args = ["agent", "--coordinator", f"127.0.0.1:{port}", "--device", "cpu",
            "--state-dir", str(state_dir), "--give-up-after", "120"]
    for index in indexes:
        args += ["--simulated-index", str(index)]
    return args


def network_args(job: FederatedJob) -> list[str]:
    """The agent flags that carry spec.simulation.network (each agent draws its link)."""
    network = job.spec.simulation.network
    if network is None:
        return []
    return ["--simulated-network", network.model_dump_json(by_alias=True),
            "--simulated-seed", str(job.spec.seed)]


def agent_groups(clients: int, processes: int) -> list[list[int]]:
    """Simulated client indexes spread over `processes` OS processes, round-robin."""
    count = max(1, min(clients, processes))
    return [list(range(start, clients, count)) for start in range(count)]


def reserve_port(host: str = "127.0.0.1") -> socket.socket | None:
    """A free port, bound with SO_REUSEPORT and not listening, held until the coordinator's
    gRPC server (which sets SO_REUSEPORT too: grpc's default on Linux) binds it beside
    this socket. So the agents can be started first and import torch while the
    coordinator still loads data and model. None where SO_REUSEPORT is unavailable."""
    if not hasattr(socket, "SO_REUSEPORT"):
        return None
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((host, 0))
    except OSError:
        held.close()
        return None
    return held


def _agent_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # N agents share the machine's cores: one thread each avoids oversubscription.
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONSAFEPATH="1", FEDKUBE_TORCH_THREADS=str(threads))
    return env


class AgentProcesses:
    """The simulated agents' OS processes, forked from a server that imported torch once
    (`prefork`). Each leads its own process group (a Ctrl-C in the terminal reaches only
    `fedkube run`, which then stops them in order), and stopping signals the whole
    group, so nothing an agent started outlives it."""

    def __init__(self, count: int, *, port: int, output: Path, threads: int, processes: int,
                 extra_args: tuple[str, ...]) -> None:
        logs = output / "agents"
        logs.mkdir(parents=True, exist_ok=True)
        env = _agent_env(threads)
        self.processes = [
            ForkedAgent([*agent_args(port=port, indexes=indexes,
                                     state_dir=output / "agent-state"), *extra_args],
                        log_path=logs / f"agents-{number:02d}.log", env=env)
            for number, indexes in enumerate(agent_groups(count, processes))]

    def signal_all(self, signum: int) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signum)
                except ProcessLookupError:
                    # Forked a moment ago, not yet the leader of its own group.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signum)
                except PermissionError:
                    pass

    def _wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))

    def stop(self, *, grace: float) -> list[int | None]:
        """Give the agents `grace` seconds to leave on their own (they were told STOP),
        then SIGTERM, then SIGKILL; returns their exit codes."""
        self._wait_all(grace)
        self.signal_all(signal.SIGTERM)
        self._wait_all(2.0)
        self.signal_all(signal.SIGKILL)
        for process in self.processes:
            process.wait()
        return [p.returncode for p in self.processes]

    def kill(self) -> None:
        """Stop them now (the job could not start): SIGKILL, reaped, logs closed."""
        self.signal_all(signal.SIGKILL)
        for process in self.processes:
            process.wait()


@dataclass
class StopRequest:
    """SIGINT/SIGTERM while a run is in progress: remembered, and `event` set."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    signal_name: str | None = None

    @contextlib.contextmanager
    def installed(self, loop: asyncio.AbstractEventLoop):
        installed = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not main thread
                loop.add_signal_handler(signum, self._received, signum)
                installed.append(signum)
        try:
            yield self
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

    def _received(self, signum: int) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        self.event.set()


@dataclass
class _Clock:
    """Where the run's wall time went: start-up (to the first round's dispatch), rounds,
    shut-down (from the job's end to the files written)."""

    started: float = field(default_factory=time.monotonic)
    first_round: float | None = None
    job_ended: float | None = None

    def round_done(self, record: RoundRecord) -> None:
        if self.first_round is None:
            self.first_round = time.monotonic() - record.seconds

    def figures(self) -> dict[str, float]:
        now = time.monotonic()
        ended = self.job_ended if self.job_ended is not None else now
        startup_end = self.first_round if self.first_round is not None else ended
        return {"wallSeconds": round(now - self.started, 3),
                "startupSeconds": round(startup_end - self.started, 3),
                "shutdownSeconds": round(now - ended, 3)}


async def run_job(job: FederatedJob, options: RunOptions) -> dict[str, Any]:
    """Run the job to its end (or to SIGINT/SIGTERM); returns summary.json's content."""
    clock = _Clock(started=options.started if options.started is not None else time.monotonic())
    job = with_clients(job, options.clients)
    clients = job.spec.simulation.clients
    folder = prepare_folder(options.output, options.existing, job_file=options.job_file)
    created = not options.output.exists()
    options.output.mkdir(parents=True, exist_ok=True)
    report = RunReport(options.output, job=job.metadata.name,
                       target_epsilon=job.spec.privacy.target_epsilon,
                       target_accuracy=job.spec.convergence.target_accuracy)
    progress = ConsoleProgress(job, stream=sys.stderr, enabled=not options.quiet,
                               expected_clients=clients)
    stop = StopRequest()
    with stop.installed(asyncio.get_running_loop()), contextlib.ExitStack() as held:
        # The agents start first, on a port held for the server: their interpreters
        # import torch and connect (retrying) while this process loads data and model.
        reserved = reserve_port()
        agents: AgentProcesses | None = None
        if reserved is not None:
            held.callback(reserved.close)
            progress.stage(f"starting {clients} agents")
            agents = _start_agents(clients, reserved.getsockname()[1], options, job)
        progress.stage("loading data and model")

        def on_round(record: RoundRecord) -> None:
            clock.round_done(record)
            report.round(record)
            progress.round(record)

        try:
            engine = engine_for(job, sink=FanOut(report, progress),
                                 output_dir=options.output, on_round=on_round)
        except Exception:
            if agents is not None:
                agents.kill()
            progress.finish(None)
            if created:  # a run that could not start leaves no folder behind
                shutil.rmtree(options.output, ignore_errors=True)
            raise
        tracker = tracker_for(job, output_dir=options.output, uri_override=options.mlflow_uri)
        if tracker is not None:
            engine.events.subscribe(tracker)
        if not folder.empty:
            report.restart_from(engine.history)
            progress.note(f"resuming at round {engine.round + 1}")
        exit_codes = await _serve_with_agents(engine, options, clients, stop=stop,
                                              progress=progress, clock=clock, report=report,
                                              agents=agents, reserved=reserved)
    progress.finish(engine.status)
    if stop.signal_name is not None:
        progress.note(f"{stop.signal_name}: stopped after {engine.round} rounds")
    summary = report.write_summary({
        **clock.figures(),
        "agents": clients,
        "agentExitCodes": exit_codes,
        "stoppedBy": stop.signal_name,
    })
    if tracker is not None:
        await asyncio.to_thread(tracker.finish, model=engine.model, weights=engine.weights,
                                phase=engine.status.phase)
    return summary


def _warm_plotting() -> None:
    """Import matplotlib while the coordinator waits for agents, not during shut-down."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot


def _start_agents(clients: int, port: int, options: RunOptions, job: FederatedJob
                  ) -> AgentProcesses:
    return AgentProcesses(clients, port=port, output=options.output,
                          threads=options.agent_threads, processes=options.agent_processes,
                          extra_args=(*options.extra_agent_args, *network_args(job)))


async def _serve_with_agents(engine: RoundEngine, options: RunOptions, clients: int, *,
                             stop: StopRequest, progress: ConsoleProgress, clock: _Clock,
                             report: RunReport, agents: AgentProcesses | None,
                             reserved: socket.socket | None) -> list[int | None]:
    """Serve the job with its agents until it ends or `stop` fires; then stop the
    agents, the server and write the plot side by side. Returns the agents' exit codes.
    `agents` already run when a port was `reserved` for the server; else they start
    once the server is bound."""
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    port = reserved.getsockname()[1] if reserved is not None else 0
    server = asyncio.create_task(serve(engine, host="127.0.0.1", port=port, on_bound=bound))
    stopping = asyncio.create_task(stop.event.wait())
    ended = asyncio.create_task(engine.done.wait())
    warming: asyncio.Future[None] | None = None
    try:
        await asyncio.wait({bound, stopping, server}, return_when=asyncio.FIRST_COMPLETED)
        if reserved is not None:
            reserved.close()  # the server holds the port now (or failed to start)
        if bound.done() and not stopping.done():
            if agents is None:
                progress.stage(f"starting {clients} agents")
                agents = _start_agents(clients, bound.result(), options, engine.job)
            warming = asyncio.ensure_future(asyncio.to_thread(_warm_plotting))
            await asyncio.wait({ended, stopping, server}, return_when=asyncio.FIRST_COMPLETED)
        clock.job_ended = time.monotonic()
        if not engine.done.is_set():  # interrupted: stop the agents first, then the job
            progress.stage("stopping")
            if agents is not None:
                agents.signal_all(signal.SIGTERM)
            server.cancel()
        # The agents were told STOP: let them leave while the server winds down.
        stopped = (asyncio.ensure_future(asyncio.to_thread(agents.stop, grace=3.0))
                   if agents else None)
        if warming is not None:
            await warming
        plotted = asyncio.ensure_future(asyncio.to_thread(report.write_plot))
        with contextlib.suppress(asyncio.CancelledError):
            await server
        await plotted
        return (await stopped) if stopped else []
    finally:
        for task in (stopping, ended, server):
            task.cancel()
        if agents is not None:  # an error above: leave no agent behind
            agents.signal_all(signal.SIGKILL)
