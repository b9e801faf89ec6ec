"""`fedkube operator` and `fedkube crds`, plugged into the runtime's `fedkube` command
through the `fedkube.commands` entry point (the runtime never imports the operator)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

DEFAULT_LIVENESS_PORT = 8080
# Handlers that run on every watch event or timer tick: their successes are not news.
ROUTINE_HANDLERS = ("count_job", "count_node", "watch_coordinator", "mark_offline")


class QuietRoutineSuccesses(logging.Filter):
    """Drops kopf's "Handler 'x' succeeded." lines for ROUTINE_HANDLERS, which would
    otherwise log once per ClientNode heartbeat and per timer tick; failures still log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (record.levelno <= logging.INFO and message.endswith(" succeeded.")
                    and any(f"'{name}'" in message for name in ROUTINE_HANDLERS))


def register(subparsers: Any) -> None:
    """Add `operator` and `crds` to the `fedkube` sub-command parser."""
    operator = subparsers.add_parser(
        "operator", help="run the Kubernetes operator (kopf) for FederatedJobs and ClientNodes")
    scope = operator.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable; globs allowed, as in kopf)")
    scope.add_argument("--all-namespaces", "-A", action="store_true",
                       help="watch the whole cluster (the default when no --namespace)")
    operator.add_argument("--metrics-port", type=int, default=None, metavar="N",
                          help="serve Prometheus metrics on this port (0: any free port)")
    operator.add_argument("--liveness-port", type=int, default=DEFAULT_LIVENESS_PORT,
                          metavar="N", help="serve /healthz on this port (0: no endpoint)")
    operator.set_defaults(func=cmd_operator)

    crds = subparsers.add_parser("crds", help="write the CustomResourceDefinitions")
    crds.add_argument("--output", "-o", default="crds", metavar="DIR",
                      help="folder to write into (default ./crds); `-` prints them")
    crds.set_defaults(func=cmd_crds)


def cmd_crds(args: argparse.Namespace) -> int:
    from .crdgen import print_crds, write_crds

    if args.output == "-":
        print_crds(sys.stdout)
        return 0
    for path in write_crds(Path(args.output)):
        print(f"wrote {path}")
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    import kopf

    from . import handlers  # noqa: F401  (registers the handlers with kopf's default registry)
    from .metrics import OperatorMetrics

    log = logging.getLogger("fedkube.operator")
    logging.getLogger("kopf.objects").addFilter(QuietRoutineSuccesses())
    metrics = OperatorMetrics()
    if args.metrics_port is not None:
        log.info("metrics on :%d/metrics", metrics.serve(args.metrics_port))
    liveness = (f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port
                else None)
    try:
        asyncio.run(kopf.operator(
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            # One replica (the chart's Deployment uses Recreate): no peering objects needed.
            standalone=True,
            liveness_endpoint=liveness,
            memo=kopf.Memo(metrics=metrics),
        ))
    finally:
        metrics.close()
    return 0
