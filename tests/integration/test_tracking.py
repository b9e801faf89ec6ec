"""MLflow tracking against a real local MLflow store (SQLite under tmp_path), read back
through MLflow's own client: a real job (coordinator here, agents as child processes)
logs one run, a resumed job continues it, and a broken store never stops training."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from fedkube.runtime.coordinator import checkpoint
from fedkube.runtime.coordinator.events import JobStatusChanged, RoundClosed, RoundRecord
from fedkube.runtime.coordinator.tracking import (
    CLIENTS_TABLE,
    RUN_ID_FILE,
    MlflowTracker,
    flat_params,
    tracker_for,
)
from fedkube.runtime.local import RunOptions, run_job
from fedkube.runtime.spec import FederatedJobStatus, Phase, load_job, parse_job
from support import write_job

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.timeout(240)


def _store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _job(**spec: Any):
    return parse_job({"apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
                      "metadata": {"name": "tracked"},
                      "spec": {"model": "mlp", "rounds": 3, **spec}})


def _record(number: int, accuracy: float) -> RoundRecord:
    return RoundRecord(round=number, accuracy=accuracy, loss=1.0 / number, clients_selected=2,
                       clients_in=2, clients_dropped=0, set_aside=0, seconds=0.5,
                       epsilon=None, bytes_up=100 * number, bytes_down=200 * number,
                       train_loss=None, model_version=number)


def test_spec_becomes_dotted_params() -> None:
    params = dict(flat_params({"rounds": 3, "privacy": {"mode": "none", "delta": 1e-5},
                               "clientSelector": {}}))
    assert params == {"rounds": "3", "privacy.mode": "none", "privacy.delta": "1e-05",
                      "clientSelector": "{}"}


def test_tracking_needs_a_uri_from_spec_or_flag(tmp_path: Path) -> None:
    assert tracker_for(_job(), output_dir=tmp_path) is None
    job = _job(tracking={"mlflow": {"trackingUri": _store(tmp_path), "experiment": "exp"}})
    tracker = tracker_for(job, output_dir=tmp_path)
    assert tracker is not None and tracker.experiment == "exp"
    tracker.finish()
    assert MlflowClient(_store(tmp_path)).get_run(tracker.run_id).info.run_name == "tracked"


def test_a_restarted_coordinator_continues_the_same_run(tmp_path: Path) -> None:
    uri = _store(tmp_path)
    first = MlflowTracker(_job(), tracking_uri=uri, output_dir=tmp_path / "out")
    first(RoundClosed(_record(1, 0.5)))
    first.wait()  # a coordinator that stopped after round 1
    again = MlflowTracker(_job(), tracking_uri=uri, output_dir=tmp_path / "out")
    again(RoundClosed(_record(2, 0.7)))
    again(JobStatusChanged(FederatedJobStatus(phase=Phase.succeeded, message="done")))
    again.finish(phase=Phase.succeeded)
    assert again.run_id == first.run_id
    client = MlflowClient(uri)
    history = client.get_metric_history(first.run_id, "accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.7)]
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["fedkube.phase"] == "Succeeded"
    assert run.data.params["rounds"] == "3"


def test_a_broken_store_warns_once_and_the_job_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A SQLite file under a regular file cannot be created: every call would fail.
    (tmp_path / "blocker").write_text("")
    uri = f"sqlite:///{tmp_path / 'blocker' / 'mlflow.db'}"
    with caplog.at_level(logging.WARNING, logger="fedkube.coordinator.tracking"):
        tracker = MlflowTracker(_job(), tracking_uri=uri, output_dir=tmp_path / "out")
        tracker(RoundClosed(_record(1, 0.5)))
        tracker.finish(model=torch.nn.Linear(2, 2), phase=Phase.succeeded)
    assert tracker.run_id is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "goes on untracked" in warnings[0].getMessage()


def _run(job: Path, output: Path, uri: str, *, resume: bool = False,
         interrupt_after: int | None = None) -> dict[str, Any]:
    """`fedkube run` in this process; `interrupt_after` rounds, a Ctrl-C (SIGINT) stops it
    the way a user would, leaving a run that `resume` continues."""
    options = RunOptions(output=output, quiet=True, agent_processes=1, mlflow_uri=uri,
                         existing="resume" if resume else "refuse")
    stop = threading.Event()

    def interrupt() -> None:
        while not stop.wait(0.05):
            lines = (output / "metrics.jsonl").read_text().splitlines() \
                if (output / "metrics.jsonl").exists() else []
            if len(lines) >= (interrupt_after or 0):
                os.kill(os.getpid(), signal.SIGINT)
                return

    watcher = threading.Thread(target=interrupt, daemon=True)
    if interrupt_after is not None:
        watcher.start()
    try:
        return asyncio.run(run_job(load_job(job), options))
    finally:
        stop.set()


def test_a_job_is_one_run_with_metrics_files_and_a_loadable_model(tmp_path: Path) -> None:
    uri, output = _store(tmp_path), tmp_path / "out"
    spec: dict[str, Any] = {
        "model": "mlp", "data": {"dataset": "digits"}, "rounds": 12, "clientsPerRound": 2,
        "minClients": 2, "simulation": {"clients": 2}, "batchSize": 32, "learningRate": 0.1,
        "tracking": {"mlflow": {"trackingUri": "sqlite:///ignored-the-flag-wins.db",
                                "experiment": "digits"}}}
    # Artifacts under tmp_path too (MLflow's default root is ./mlruns in the working dir).
    MlflowClient(uri).create_experiment("digits", artifact_location=str(tmp_path / "artifacts"))
    job = write_job(tmp_path / "job.yaml", "tracked-run", **spec)
    stopped = _run(job, output, uri, interrupt_after=1)
    assert stopped["phase"] == "Stopped" and stopped["rounds"] < 12, stopped
    # Resumed: the same MLflow run continues where the interrupted one stopped.
    summary = _run(job, output, uri, resume=True)
    assert summary["phase"] == "Succeeded" and summary["rounds"] == 12

    client = MlflowClient(uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "digits"]
    [run] = client.search_runs([experiment.experiment_id])
    assert (output / RUN_ID_FILE).exists() and run.info.status == "FINISHED"
    assert run.data.params["rounds"] == "12"
    assert run.data.params["data.dataset"] == "digits"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")]
    assert steps == list(range(1, 13))
    for name in ("bytes_up", "clients_in", "clients_dropped", "round_seconds", "loss"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 12, name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.png", CLIENTS_TABLE, "model"} <= artifacts

    model = mlflow.pytorch.load_model(f"{run.info.artifact_uri}/model")
    final = torch.load(output / checkpoint.MODEL, weights_only=True)  # the job's own copy
    state = model.state_dict()
    assert set(state) == set(final)
    assert all(torch.equal(state[name], final[name]) for name in final)
