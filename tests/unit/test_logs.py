"""runtime/logs.py: job, round and node reach every JSON line from the context where they
are bound, each task keeping its own, threads of to_thread included."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading

import pytest
from fedkube.runtime import logs


@pytest.fixture
def lines():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.ContextFilter())
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("fedkube.test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)
    logs._process.clear()


def _fields(entry: dict) -> tuple:
    return entry["message"], entry.get("job"), entry.get("round"), entry.get("node")


def test_each_task_logs_its_own_node_and_round(lines) -> None:
    logger, read = lines

    async def agent(node: str, rounds: int) -> None:
        logs.bind(job="j", node=node)
        for number in range(1, rounds + 1):
            with logs.bound(round=number):
                await asyncio.sleep(0)  # the other task runs in between
                await asyncio.to_thread(logger.info, f"{node} trains")
        logger.info(f"{node} done")

    async def both() -> None:
        await asyncio.gather(agent("a", 2), agent("b", 1))
        logger.info("after")  # the tasks' bindings stayed in the tasks

    asyncio.run(both())
    assert sorted(map(_fields, read())) == sorted([
        ("a trains", "j", 1, "a"), ("a trains", "j", 2, "a"), ("a done", "j", None, "a"),
        ("b trains", "j", 1, "b"), ("b done", "j", None, "b"), ("after", None, None, None)])


def test_extra_wins_and_plain_threads_get_the_process_default(lines) -> None:
    logger, read = lines
    logs.bind_process(job="proc")
    with logs.bound(node="n1", round=3):
        logger.info("explicit", extra={"node": "n2", "round": 4})
        thread = threading.Thread(target=logger.info, args=("thread",))
        thread.start()
        thread.join()
    assert [_fields(e) for e in read()] == [("explicit", "proc", 4, "n2"),
                                           ("thread", "proc", None, None)]
    with pytest.raises(TypeError, match="nodes"):
        logs.bind(nodes="x")


def test_json_mode_silences_grpcs_own_plain_text_lines_unless_asked() -> None:
    environ: dict[str, str] = {}
    logs.quiet_grpc_core(environ)
    assert environ == {"GRPC_VERBOSITY": "NONE"}
    environ = {"GRPC_VERBOSITY": "debug"}
    logs.quiet_grpc_core(environ)
    assert environ == {"GRPC_VERBOSITY": "debug"}


def test_the_handler_follows_stderr_when_a_stand_in_was_swapped_in_and_closed(
        monkeypatch) -> None:
    handler = logs.CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("fedkube.test-logs.stderr")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        stand_in = io.StringIO()
        monkeypatch.setattr("sys.stderr", stand_in)
        logger.warning("first")
        assert stand_in.getvalue() == "first\n"
        stand_in.close()  # as pytest closes its capture at the end of a test
        later = io.StringIO()
        monkeypatch.setattr("sys.stderr", later)
        logger.warning("second")
        handler.flush()
        assert later.getvalue() == "second\n"  # not "--- Logging error ---"
    finally:
        logger.removeHandler(handler)
