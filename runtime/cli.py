"""The `fedkube` command.

    fedkube run JOB.yaml          coordinator + simulated agents on this machine
    fedkube coordinator --job F   the gRPC aggregation server (what the operator's pod runs)
    fedkube agent --coordinator   a client: register, train, upload
    fedkube validate JOB.yaml     check a manifest; print model size and memory
    fedkube privacy plan JOB.yaml noise, epsilon per round, rounds the budget allows
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
import time
from collections.abc import Coroutine
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from .logs import bind_process as bind_log_context
from .logs import configure as configure_logs
from .spec import ManifestError, load_job
from .threads import Role, ThreadsError, apply_torch_threads

if TYPE_CHECKING:  # the coordinator (torch, grpc) loads only for the commands that run it
    from .coordinator.server import TlsFiles

EXIT_BAD_INPUT = 2
STARTED = time.monotonic()  # the command's wall time counts from here (before torch loads)
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


def _tune_process(role: Role) -> None:
    """Torch threads for this role, and glibc keeping the wire's large buffers mapped."""
    from .wire.allocator import keep_large_buffers_mapped

    keep_large_buffers_mapped()
    try:
        apply_torch_threads(role)
    except ThreadsError as error:
        raise ManifestError(str(error)) from None


def cmd_run(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    from .prefork import start_server, stop_server

    # The agents' fork server imports torch while this process does the same.
    start_server()
    # Imported after the manifest is read: a spec error is reported without loading torch.
    from .local import RunOptions, run_job, with_clients
    from .progress import outcome_line

    _tune_process("local")
    job = with_clients(job, args.clients)
    bind_log_context(job=job.metadata.name)
    output = Path(args.output or Path("runs") / job.metadata.name)
    existing = "resume" if args.resume else "fresh" if args.fresh else "refuse"
    options = RunOptions(output=output, quiet=args.quiet, existing=existing,
                         job_file=args.job, started=STARTED,
                         mlflow_uri=args.mlflow_uri)
    if args.agent_processes:
        options = dataclasses.replace(options, agent_processes=args.agent_processes)
    try:
        summary = asyncio.run(run_job(job, options))
    finally:
        stop_server()
    print(outcome_line(job.metadata.name, summary))
    print(f"wrote {output}/metrics.jsonl, summary.json, metrics.png")
    if summary["stoppedBy"]:
        print(f"resume with: fedkube run {args.job} --output {output} --resume")
        return 128 + signal.Signals[summary["stoppedBy"]].value
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
    from .coordinator.async_rounds import engine_for
    from .coordinator.report import RunReport
    from .coordinator.server import serve
    from .coordinator.status import FanOut, StatusSink

    _tune_process("coordinator")
    job = load_job(args.job)
    bind_log_context(job=job.metadata.name)  # threads too (the Kubernetes writer's)
    output = Path(args.output) if args.output else None
    sinks: list[StatusSink] = []
    report = None
    if output is not None:
        report = RunReport(output, job=job.metadata.name,
                           target_epsilon=job.spec.privacy.target_epsilon,
                           target_accuracy=job.spec.convergence.target_accuracy)
        sinks.append(report)
    kube_sink = None
    if args.kube:
        from .kube.sink import KubernetesStatusSink

        namespace = job.metadata.namespace or os.environ.get("FEDKUBE_NAMESPACE", "default")
        kube_sink = KubernetesStatusSink(job_name=job.metadata.name, namespace=namespace)
        sinks.append(kube_sink)
    metrics = None
    if args.metrics_port is not None:
        from .coordinator.metrics import CoordinatorMetrics

        metrics = CoordinatorMetrics()
        port = metrics.serve(args.metrics_port)
        logging.getLogger("fedkube.coordinator").info("metrics on :%d/metrics", port)
    tls = _coordinator_tls(args)
    engine = engine_for(
        job, sink=FanOut(*sinks), output_dir=output,
        join_token=_secret(args.join_token_file, "FEDKUBE_JOIN_TOKEN") or None,
        metrics=metrics, on_round=report.round if report else None,
        registration_timeout=args.registration_timeout, job_file=Path(args.job),
        releases=kube_sink)
    if report is not None and engine.history:  # restarted: continue the checkpoint's log
        report.restart_from(engine.history)
    from .coordinator.tracking import tracker_for

    tracker = tracker_for(job, output_dir=output, uri_override=args.mlflow_uri)
    if tracker is not None:
        engine.events.subscribe(tracker)
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
    if tracker is not None:
        tracker.finish(model=engine.model, weights=engine.weights, phase=status.phase)
    print(json.dumps({"phase": status.phase.value, "round": status.round,
                      "accuracy": status.accuracy, "message": status.message}))
    return 0 if status.phase.value == "Succeeded" else 1


def _coordinator_tls(args: argparse.Namespace) -> TlsFiles | None:
    from .coordinator.server import TlsFiles

    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ManifestError("--tls-cert and --tls-key go together")
        return TlsFiles(cert=Path(args.tls_cert), key=Path(args.tls_key),
                        client_ca=Path(args.tls_client_ca) if args.tls_client_ca else None)
    if args.tls_client_ca:
        raise ManifestError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS "
                            "plus client certificates)")
    return None


def cmd_agent(args: argparse.Namespace) -> int:
    from .agent.client import AgentConfig, run_agents

    _tune_process("agent")
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
        **_agent_tls(args),
        "labels": _labels(args.label),
        "give_up_after": args.give_up_after,
    }
    network = None
    if args.simulated_network:
        from .agent.network import link_for
        from .spec import NetworkSpec

        network = NetworkSpec.model_validate_json(args.simulated_network)
    configs = [
        AgentConfig(node_id=args.node_id or (f"sim-{index:03d}" if index is not None else ""),
                    simulated_index=index,
                    network=(link_for(network, seed=args.simulated_seed, index=index)
                             if network is not None and index is not None else None),
                    **common)
        for index in indexes
    ]
    return run_agents(configs)


def _agent_tls(args: argparse.Namespace) -> dict[str, Path | None]:
    """--tls-ca/--tls-cert/--tls-key, each defaulting to $FEDKUBE_TLS_CA/_CERT/_KEY."""
    paths = {name: getattr(args, name) or os.environ.get(f"FEDKUBE_{name.upper()}") or None
             for name in ("tls_ca", "tls_cert", "tls_key")}
    if bool(paths["tls_cert"]) != bool(paths["tls_key"]):
        raise ManifestError("--tls-cert and --tls-key (or $FEDKUBE_TLS_CERT and "
                            "$FEDKUBE_TLS_KEY) go together")
    return {name: Path(value).expanduser() if value else None for name, value in paths.items()}


def cmd_validate(args: argparse.Namespace) -> int:
    """Each manifest, then what a run would load first: the data (path, arrays) and the
    model (name, built for the data's shape). With several manifests, like `kubectl apply
    -f a.yaml -f b.yaml`, every one is checked and each bad one gets its own error line."""
    if len(args.job) == 1:
        return _validate_one(args.job[0])
    failed = 0
    for path in args.job:
        try:
            _validate_one(path)
        except Exception as error:
            message = _user_error(error)
            if message is None:
                raise
            first, *more = message.splitlines() or [""]
            if not first.startswith(path):
                first = f"{path}: {first}"
            _print_error(first, more)
            failed += 1
    return EXIT_BAD_INPUT if failed else 0


def _validate_one(path: str) -> int:
    job = load_job(path)
    # Imported after the manifest is read: a spec error is reported without loading torch.
    from .data import load_dataset
    from .models import build_model

    spec = job.spec
    data = load_dataset(spec.data, seed=spec.seed)  # errors: see _user_error
    model = build_model(spec.model, input_shape=data.input_shape,
                        num_classes=data.num_classes, seed=spec.seed)
    parameters = sum(p.numel() for p in model.parameters())
    clients = (f"{spec.simulation.clients} simulated clients" if spec.simulation.clients
               else "no simulated clients: real agents must join")
    print(f"{path}: FederatedJob {job.metadata.name} is valid: model {spec.model} "
          f"({parameters:,} parameters), data {spec.data.dataset} ({len(data.y_train)} "
          f"training, {len(data.y_test)} test examples of {'x'.join(map(str, data.input_shape))},"
          f" {data.num_classes} classes), {clients}")
    from .sizing import format_footprint, job_footprint

    print(format_footprint(job_footprint(spec)))
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"fedkube {_version()}")
    return 0


def _count(text: str) -> int:
    """A whole number of at least 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedkube", description="Federated learning, the Kubernetes way.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (repeat for debug logs)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run a job on this machine with simulated agents",
        description="Run a job on this machine: the coordinator and spec.simulation.clients "
        "agents over gRPC on 127.0.0.1. An output folder holds one run: a finished run "
        "there is refused, an unfinished one is continued with --resume; --fresh starts "
        "over. Ctrl-C stops the run and keeps what was done.")
    run.add_argument("job", help="FederatedJob manifest (YAML)")
    run.add_argument("--output", "-o", help="folder for metrics.jsonl, summary.json, "
                     "metrics.png, the checkpoint and agent logs (default runs/<job name>)")
    run.add_argument("--clients", type=_count, metavar="N",
                     help="number of simulated clients (overrides spec.simulation.clients)")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the unfinished run in the output folder from its last "
                       "checkpointed round")
    again.add_argument("--fresh", action="store_true",
                       help="delete the previous run's files in the output folder and start "
                       "over")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    run.add_argument("--agent-processes", type=_count, metavar="N",
                     help="OS processes the simulated agents share (default: one per core)")
    run.add_argument("--mlflow-uri", help="log the job to MLflow at this tracking URI "
                     "(overrides spec.tracking.mlflow.trackingUri)")
    run.set_defaults(func=cmd_run)

    coordinator = commands.add_parser(
        "coordinator", help="serve a job's aggregation over gRPC",
        description="The gRPC aggregation server (what the operator's coordinator pod runs). "
        "Restarted with the same --output, it continues from its last checkpoint; after "
        "the job ended it reports that outcome again.")
    coordinator.add_argument("--job", required=True, help="FederatedJob manifest (YAML)")
    coordinator.add_argument("--host", default="0.0.0.0",
                             help="address to listen on (default 0.0.0.0: all interfaces)")
    coordinator.add_argument("--port", type=int, help="port to listen on (default "
                             "spec.coordinator.port; 0 picks a free one)")
    coordinator.add_argument("--output", help="folder for checkpoints, metrics and the model "
                             "(without it nothing is saved and a restart starts over)")
    coordinator.add_argument("--kube", action="store_true",
                             help="publish status to the FederatedJob and ClientNodes")
    coordinator.add_argument("--join-token-file", help="agents must present this token "
                             "(default: $FEDKUBE_JOIN_TOKEN)")
    coordinator.add_argument("--tls-cert", help="PEM certificate to serve TLS with (needs "
                             "--tls-key)")
    coordinator.add_argument("--tls-key", help="PEM private key of --tls-cert")
    coordinator.add_argument("--tls-client-ca", help="mutual TLS: require client "
                             "certificates signed by this CA; a certificate's subject CN is "
                             "the node id it may act as (needs --tls-cert)")
    coordinator.add_argument("--metrics-port", type=int,
                             help="serve Prometheus metrics on this port")
    coordinator.add_argument("--registration-timeout", type=_seconds, default=120.0,
                             metavar="SECONDS",
                             help="seconds to wait for simulated clients before starting "
                             "(default 120)")
    coordinator.add_argument("--mlflow-uri", help="log the job to MLflow at this tracking URI "
                             "(overrides spec.tracking.mlflow.trackingUri)")
    coordinator.set_defaults(func=cmd_coordinator)

    agent = commands.add_parser("agent", help="join a job as a client")
    agent.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    agent.add_argument("--node-id", help="stable id of this device (default: assigned)")
    agent.add_argument("--device", default="auto", choices=["auto", "mps", "cuda", "cpu"],
                       help="where to train (default auto: MPS, then CUDA, then CPU)")
    agent.add_argument("--data", help="this device's data: a .npz file or an MNIST IDX "
                       "folder (overrides spec.data.path)")
    agent.add_argument("--simulated-index", type=int, action="append", default=[],
                       help="train on this partition of the job's dataset (simulation); "
                       "repeat to run several simulated agents in this process")
    agent.add_argument("--simulated-network", metavar="JSON", help=argparse.SUPPRESS)
    agent.add_argument("--simulated-seed", type=int, default=0, help=argparse.SUPPRESS)
    agent.add_argument("--state-dir", default="~/.fedkube",
                       help="where the privacy budget is kept between runs")
    agent.add_argument("--join-token-file", help="file with the job's join token "
                       "(default: $FEDKUBE_JOIN_TOKEN)")
    agent.add_argument("--tls-ca", help="CA certificate to verify the coordinator "
                       "(default: $FEDKUBE_TLS_CA)")
    agent.add_argument("--tls-cert", help="mutual TLS: this node's client certificate, "
                       "subject CN = the node id (default: $FEDKUBE_TLS_CERT; needs --tls-key)")
    agent.add_argument("--tls-key", help="private key of --tls-cert (default: $FEDKUBE_TLS_KEY)")
    agent.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                       help="label this device for spec.clientSelector (repeatable)")
    agent.add_argument("--give-up-after", type=_seconds, metavar="SECONDS",
                       help="exit after this many seconds without a coordinator "
                       "(default: keep trying)")
    agent.set_defaults(func=cmd_agent)

    validate = commands.add_parser(
        "validate", help="check a FederatedJob manifest, its data and its model",
        description="Check a manifest as a run would: every field, the data (path exists, "
        "holds the expected arrays) and the model (name resolves, builds for the data).")
    validate.add_argument("job", nargs="+", help="FederatedJob manifest(s) (YAML)")
    validate.set_defaults(func=cmd_validate)

    from .planning import register as register_privacy

    register_privacy(commands)

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


# Errors that mean "the input is wrong", by where they are raised and how to name them;
# looked up only in modules already imported (a command that never loaded torch cannot
# have raised the model zoo's error), so `fedkube version` stays quick.
_USER_ERRORS = (
    ("fedkube.runtime.data.datasets", "DatasetError", "spec.data: "),
    ("fedkube.runtime.models.zoo", "ModelError", "spec.model: "),
    ("fedkube.runtime.coordinator.checkpoint", "CheckpointError", ""),
    ("fedkube.runtime.local", "RunFolderError", ""),
)


def _user_error(error: BaseException) -> str | None:
    """The one-line message for a user's mistake, or None for anything else (a bug)."""
    if isinstance(error, ManifestError):
        return str(error)
    if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                          PermissionError)) and error.filename:
        reason = (error.strerror or "cannot be read").lower()
        return f"{error.filename}: {reason.replace('no such file or directory', 'no such file')}"
    for module_name, class_name, prefix in _USER_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(error, getattr(module, class_name)):
            return prefix + str(error)
    return None


# Commands that are always a process of their own (an agent, `fedkube run`): when their
# work is done and written, they exit at once. Python's own teardown (a full garbage
# collection over torch's objects) takes seconds, 10 s and more on a busy machine, and
# `fedkube run` waits for its agents to be gone.
OWN_PROCESS_COMMANDS = ("run", "agent")


def _leave(code: int) -> NoReturn:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _Parser(argparse.ArgumentParser):
    """argparse with our error style: one `error:` line, exit 2, no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see `{self.prog} --help`)\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logs(logging.WARNING - 10 * min(args.verbose, 2) if args.command == "run"
                   else logging.INFO - 10 * min(args.verbose, 1))
    try:
        code = args.func(args)
        if args.command in OWN_PROCESS_COMMANDS:
            _leave(code)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        message = _user_error(error)
        if message is None:
            raise
        first, *more = message.splitlines() or [""]
        _print_error(first, more)
        return EXIT_BAD_INPUT


def _print_error(first: str, more: list[str]) -> None:
    """One `error:` line; further problems (pydantic lists each) follow, indented."""
    print("\n".join([f"error: {first}", *(f"       {line}" for line in more)]),
          file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
