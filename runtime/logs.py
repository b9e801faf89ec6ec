"""Log output: the usual text lines, or one JSON object per line when
FEDKUBE_LOG_FORMAT=json (what log collectors in a cluster parse). A record's `job`,
`round` and `node` become fields of their own: passed as `extra=`, or else taken from the
context where they are known, so that every line carries them without each call naming
them. `bind()` sets them for the current asyncio task (and what it starts: tasks, threads
of `asyncio.to_thread`): the engine's round loop binds the round, the servicer the node of
each RPC, the agent loop its job, node and round. `bind_process()` sets a default for the
whole process (plain threads, such as the Kubernetes writer's, start with no context).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, MutableMapping

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = ("job", "round", "node", "reason")
CONTEXT_FIELDS = ("job", "round", "node")

_context: dict[str, contextvars.ContextVar[object]] = {
    name: contextvars.ContextVar(f"fedkube_log_{name}", default=None) for name in CONTEXT_FIELDS}
_process: dict[str, object] = {}


def _check(fields: dict[str, object]) -> None:
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise TypeError(f"log context fields are {CONTEXT_FIELDS}, not {sorted(unknown)}")


def bind(**fields: object) -> None:
    """Set job/round/node for the rest of the current task (None clears one)."""
    _check(fields)
    for name, value in fields.items():
        _context[name].set(value)


@contextlib.contextmanager
def bound(**fields: object) -> Iterator[None]:
    """Set job/round/node for the `with` block only."""
    _check(fields)
    tokens = [(_context[name], _context[name].set(value)) for name, value in fields.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def bind_process(**fields: object) -> None:
    """Defaults for every line of this process that its context leaves unset."""
    _check(fields)
    _process.update(fields)


class ContextFilter(logging.Filter):
    """Fills a record's job/round/node from the context unless `extra=` gave them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name in CONTEXT_FIELDS:
            if getattr(record, name, None) is None:
                value = _context[name].get()
                if value is None:
                    value = _process.get(name)
                if value is not None:
                    setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def quiet_grpc_core(environ: MutableMapping[str, str]) -> None:
    """gRPC's C core writes plain-text lines of its own to stderr (a refused TLS handshake,
    say), which would break one JSON object per line: silence it unless GRPC_VERBOSITY
    says otherwise. Takes effect when grpc loads, which the CLI does after this."""
    environ.setdefault("GRPC_VERBOSITY", "NONE")


class CurrentStderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is when a record comes, not the one there
    was at set-up: a caller that swaps stderr and closes its stand-in (pytest's capture,
    an embedding program) must not leave every later line a "Logging error"."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # handle() holds the handler's lock around emit
        super().emit(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self.stream = sys.stderr
        super().flush()


def configure(level: int) -> None:
    """Set up the root logger from FEDKUBE_LOG_FORMAT (text unless `json`)."""
    handler = CurrentStderrHandler()
    handler.addFilter(ContextFilter())
    if os.environ.get("FEDKUBE_LOG_FORMAT", "").lower() == "json":
        handler.setFormatter(JsonFormatter())
        # Python's warnings (Opacus, torch) as log lines too, not bare text on stderr.
        logging.captureWarnings(True)
        quiet_grpc_core(os.environ)
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    # force: a library imported before this (Opacus) may have configured logging already.
    logging.basicConfig(level=level, handlers=[handler], force=True)
