"""The `fedkube` command.

    fedkube run JOB.yaml          coordinator + simulated agents on this machine
    fedkube coordinator --job F   the gRPC aggregation server (what the operator's pod runs)
    fedkube agent --coordinator   a client: register, train, upload
    fedkube validate JOB.yaml     check a manifest
    fedkube version

Sub-commands of other packages (the operator's `operator` and `crds`) plug in through the
`fedkube.commands` entry point group, so the runtime never imports the operator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import Any, TypeVar

from .logs import configure as configure_logs
from .spec import ManifestError, load_job

EXIT_BAD_INPUT = 2
T = TypeVar("T")


def _version() -> str:
    try:
        return version("fedkube")
    except PackageNotFoundError:  # running from a source tree without metadata
        return "0+unknown"


def _labels(values: list[str]) -> dict[str, str]:
    labels = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ManifestError(f"--label {item!r}: expected key=value")
        labels[key] = value
    return labels


def _secret(path: str | None, env: str) -> str:
    if path:
        return Path(path).read_text().strip()
    return os.environ.get(env, "").strip()


def cmd_run(args: argparse.Namespace) -> int:
    from .local import RunOptions, run_job

    job = load_job(args.job)
    output = Path(args.output or Path("runs") / job.metadata.name)
    options = RunOptions(output=output, clients=args.clients, quiet=args.quiet)
    if args.agent_processes:
        options = dataclasses.replace(options, agent_processes=args.agent_processes)
    summary = asyncio.run(run_job(job, options))
    accuracy = summary["final_accuracy"]
    line = (f"{job.metadata.name}: {summary['phase']} after {summary['rounds']} rounds, "
            f"accuracy {accuracy:.4f}" if accuracy is not None
            else f"{job.metadata.name}: {summary['phase']} ({summary['message']})")
    if summary.get("epsilon") is not None:
        line += f", ε {summary['epsilon']:.3f} (target {summary['target_epsilon']})"
    print(f"{line}, {summary['wall_seconds']:.1f}s")
    print(f"wrote {output}/metrics.jsonl, summary.json, metrics.png")
    return 0 if summary["phase"] == "Succeeded" else 1


async def _until_terminated(work: Coroutine[Any, Any, T]) -> T:
    """Run `work`; SIGTERM (how Kubernetes stops a pod) cancels it, so the job ends
    Stopped with its status written instead of vanishing mid-round."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    return await task


def cmd_coordinator(args: argparse.Namespace) -> int:
    from .coordinator.engine import RoundEngine
    from .coordinator.report import RunReport
    from .coordinator.server import TlsFiles, serve
    from .coordinator.status import FanOut, StatusSink

    job = load_job(args.job)
    output = Path(args.output) if args.output else None
    sinks: list[StatusSink] = []
    report = None
    if output is not None:
        report = RunReport(output, job=job.metadata.name,
                           target_epsilon=job.spec.privacy.target_epsilon)
        sinks.append(report)
    kube_sink = None
    if args.kube:
        from .coordinator.kube_status import KubernetesStatusSink

        namespace = job.metadata.namespace or os.environ.get("FEDKUBE_NAMESPACE", "default")
        kube_sink = KubernetesStatusSink(job_name=job.metadata.name, namespace=namespace)
        sinks.append(kube_sink)
    metrics = None
    if args.metrics_port is not None:
        from .coordinator.metrics import CoordinatorMetrics

        metrics = CoordinatorMetrics()
        port = metrics.serve(args.metrics_port)
        logging.getLogger("fedkube.coordinator").info("metrics on :%d/metrics", port)
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ManifestError("--tls-cert and --tls-key go together")
        tls = TlsFiles(cert=Path(args.tls_cert), key=Path(args.tls_key))
    engine = RoundEngine(
        job, sink=FanOut(*sinks), output_dir=output,
        join_token=_secret(args.join_token_file, "FEDKUBE_JOIN_TOKEN") or None,
        metrics=metrics, on_round=report.round if report else None,
        registration_timeout=args.registration_timeout, job_file=Path(args.job))
    port = args.port if args.port is not None else job.spec.coordinator.port
    try:
        status = asyncio.run(_until_terminated(serve(engine, host=args.host, port=port,
                                                     tls=tls)))
    except asyncio.CancelledError:
        status = engine.status  # stopped by SIGTERM; the engine marked the job Stopped
    finally:
        if kube_sink is not None:
            kube_sink.close(timeout=10)  # the last status must reach the API server
    if report is not None:
        report.finish()
    print(json.dumps({"phase": status.phase.value, "round": status.round,
                      "accuracy": status.accuracy, "message": status.message}))
    return 0 if status.phase.value == "Succeeded" else 1


def cmd_agent(args: argparse.Namespace) -> int:
    from .agent.client import AgentConfig, run_agents

    threads = os.environ.get("FEDKUBE_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    indexes: list[int | None] = list(args.simulated_index) or [None]
    if len(indexes) > 1 and args.node_id:
        raise ManifestError("--node-id names one agent; with several --simulated-index "
                            "each is named sim-<index>")
    common: dict[str, Any] = {
        "coordinator": args.coordinator,
        "device": args.device,
        "data_path": args.data,
        "state_dir": Path(args.state_dir).expanduser(),
        "join_token": _secret(args.join_token_file, "FEDKUBE_JOIN_TOKEN"),
        "tls_ca": Path(args.tls_ca) if args.tls_ca else None,
        "labels": _labels(args.label),
        "give_up_after": args.give_up_after,
    }
    configs = [
        AgentConfig(node_id=args.node_id or (f"sim-{index:03d}" if index is not None else ""),
                    simulated_index=index, **common)
        for index in indexes
    ]
    return run_agents(configs)


def cmd_validate(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    print(f"{args.job}: FederatedJob {job.metadata.name} is valid")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"fedkube {_version()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedkube", description="Federated learning, the "
                                     "Kubernetes way.")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a job on this machine with simulated agents")
    run.add_argument("job", help="FederatedJob manifest (YAML)")
    run.add_argument("--output", "-o", help="folder for metrics.jsonl, summary.json, "
                     "metrics.png (default runs/<job name>)")
    run.add_argument("--clients", type=int, help="override spec.simulation.clients")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    run.add_argument("--agent-processes", type=int,
                     help="OS processes the simulated agents share (default: one per core)")
    run.set_defaults(func=cmd_run)

    coordinator = commands.add_parser("coordinator", help="serve a job's aggregation over gRPC")
    coordinator.add_argument("--job", required=True, help="FederatedJob manifest (YAML)")
    coordinator.add_argument("--host", default="0.0.0.0")
    coordinator.add_argument("--port", type=int, help="default: spec.coordinator.port")
    coordinator.add_argument("--output", help="folder for checkpoints, metrics and the model")
    coordinator.add_argument("--kube", action="store_true",
                             help="publish status to the FederatedJob and ClientNodes")
    coordinator.add_argument("--join-token-file", help="agents must present this token "
                             "(default: $FEDKUBE_JOIN_TOKEN)")
    coordinator.add_argument("--tls-cert")
    coordinator.add_argument("--tls-key")
    coordinator.add_argument("--metrics-port", type=int, help="serve Prometheus metrics")
    coordinator.add_argument("--registration-timeout", type=float, default=120.0,
                             help="seconds to wait for simulated clients before starting")
    coordinator.set_defaults(func=cmd_coordinator)

    agent = commands.add_parser("agent", help="join a job as a client")
    agent.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    agent.add_argument("--node-id", help="stable id of this device (default: assigned)")
    agent.add_argument("--device", default="auto", choices=["auto", "mps", "cuda", "cpu"])
    agent.add_argument("--data", help="this device's data (overrides spec.data.path)")
    agent.add_argument("--simulated-index", type=int, action="append", default=[],
                       help="train on this partition of the job's dataset (simulation); "
                       "repeat to run several simulated agents in this process")
    agent.add_argument("--state-dir", default="~/.fedkube",
                       help="where the privacy budget is kept between runs")
    agent.add_argument("--join-token-file", help="default: $FEDKUBE_JOIN_TOKEN")
    agent.add_argument("--tls-ca", help="CA certificate to verify the coordinator")
    agent.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    agent.add_argument("--give-up-after", type=float,
                       help="exit after this many seconds without a coordinator")
    agent.set_defaults(func=cmd_agent)

    validate = commands.add_parser("validate", help="check a FederatedJob manifest")
    validate.add_argument("job")
    validate.set_defaults(func=cmd_validate)

    show_version = commands.add_parser("version", help="print the version")
    show_version.set_defaults(func=cmd_version)

    for plugin in entry_points(group="fedkube.commands"):
        try:
            register = plugin.load()
        except ImportError as error:  # e.g. the operator's dependencies are not installed
            logging.getLogger("fedkube").debug("sub-commands %s unavailable: %s",
                                               plugin.name, error)
            continue
        register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logs(logging.WARNING - 10 * min(args.verbose, 2) if args.command == "run"
                   else logging.INFO - 10 * min(args.verbose, 1))
    try:
        return args.func(args)
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FileNotFoundError as error:
        print(f"error: {error.filename}: no such file", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
