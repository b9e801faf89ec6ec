"""FEDKUBE_LOG_FORMAT=json on a real run: a coordinator process and an agent process
holding two simulated agents (so two nodes log through one process). Every line of both
logs is one JSON object; every log event names its job once the job is known, every agent
event after registration names its node, and every event of a round names that round."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from support import Processes, fedkube_command, free_port, write_job

pytestmark = pytest.mark.timeout(180)

ROUND = re.compile(r"\bround (\d+)\b")


def _events(text: str) -> list[dict[str, object]]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(event, dict), line
        events.append(event)
    return events


def _log_events(events: list[dict[str, object]]) -> list[dict[str, object]]:
    """Log records (the coordinator's last stdout line is its JSON summary, no record)."""
    records = [e for e in events if "logger" in e]
    assert all({"time", "level", "message"} <= set(e) for e in records)
    assert all("phase" in e for e in events if "logger" not in e)
    return records


def _assert_round_named(records: list[dict[str, object]]) -> None:
    for record in records:
        said = ROUND.match(str(record["message"]))  # "round 2: ..." / "round 2 deadline"
        if said:
            assert record.get("round") == int(said.group(1)), record


def test_every_line_of_a_run_is_json_with_job_round_and_node(tmp_path: Path,
                                                             processes: Processes) -> None:
    job = write_job(tmp_path / "job.yaml", "json-logs", model="mlp",
                    data={"dataset": "digits"}, rounds=2, clientsPerRound=2, minClients=2,
                    roundTimeoutSeconds=60, simulation={"clients": 2})
    port = free_port()
    coordinator = processes.start("coordinator", fedkube_command(
        "coordinator", "--job", str(job), "--host", "127.0.0.1", "--port", str(port),
        "--output", str(tmp_path / "out")), FEDKUBE_LOG_FORMAT="json")
    agents = processes.start("agents", fedkube_command(
        "agent", "--coordinator", f"127.0.0.1:{port}", "--simulated-index", "0",
        "--simulated-index", "1", "--state-dir", str(tmp_path / "state"),
        "--give-up-after", "60"), FEDKUBE_LOG_FORMAT="json")
    assert coordinator.wait(timeout=150) == 0, processes.log("coordinator")[-3000:]
    assert agents.wait(timeout=30) == 0, processes.log("agents")[-3000:]

    served = _log_events(_events(processes.log("coordinator")))
    assert all(e.get("job") == "json-logs" for e in served), [
        e for e in served if e.get("job") != "json-logs"]
    _assert_round_named(served)
    registered = [e for e in served if str(e["message"]).startswith("registered ")]
    assert {e.get("node") for e in registered} == {"sim-000", "sim-001"}
    assert {e.get("round") for e in served} >= {1, 2}

    agent_events = _log_events(_events(processes.log("agents")))
    joined = [e for e in agent_events if str(e["message"]).startswith("registered as ")]
    assert len(joined) == 2
    for node in ("sim-000", "sim-001"):
        mine = [e for e in agent_events if e.get("node") == node]
        first = next(i for i, e in enumerate(mine) if e in joined)
        assert all(e.get("job") == "json-logs" for e in mine[first:]), mine
        # Both nodes trained both rounds, each line naming its own node and round.
        assert {e.get("round") for e in mine if "update accepted" in str(e["message"])} == {1, 2}
    assert all(e.get("node") in ("sim-000", "sim-001") for e in agent_events), [
        e for e in agent_events if e.get("node") not in ("sim-000", "sim-001")]
    _assert_round_named(agent_events)
