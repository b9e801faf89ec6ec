"""Log output: the usual text lines, or one JSON object per line when
FEDKUBE_LOG_FORMAT=json (what log collectors in a cluster parse). A record's `job`,
`round` and `node` (passed as `extra=`) become fields of their own."""

from __future__ import annotations

import json
import logging
import os
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = ("job", "round", "node", "reason")


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


def configure(level: int) -> None:
    """Set up the root logger from FEDKUBE_LOG_FORMAT (text unless `json`)."""
    handler = logging.StreamHandler()
    if os.environ.get("FEDKUBE_LOG_FORMAT", "").lower() == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    # force: a library imported before this (Opacus) may have configured logging already.
    logging.basicConfig(level=level, handlers=[handler], force=True)
