"""MLflow experiment tracking, fed by the engine's event stream (the `mlflow` extra).

One MLflow run per job: the spec as parameters, a metric per round figure (step = round),
and at the end the per-client table, summary.json, the plot and the final model as an
MLflow PyTorch model (`mlflow.pytorch.load_model("runs:/<id>/model")` gives it back). The
run's id is kept in the output folder, so a resumed job continues the same run.

Tracking must never stop training, nor slow it: every call to the store runs on one
worker thread of its own, in the order of the events (a slow or unreachable tracking
server never blocks the engine's event loop), and the first failure (store unreachable,
mlflow missing) logs one warning and the tracker goes quiet for the rest of the job.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..spec import FederatedJob, Phase
from ..training import load_weights
from .events import Event, JobStatusChanged, RoundClosed, RoundRecord

log = logging.getLogger("fedkube.coordinator.tracking")

RUN_ID_FILE = "mlflow-run.json"
CLIENTS_TABLE = "clients.json"
MODEL_PATH = "model"
# The MLflow store's limits: 100 params per batch call, values up to 6000 characters.
PARAMS_PER_BATCH = 100
PARAM_VALUE_LIMIT = 6000
_END_STATUS = {Phase.succeeded: "FINISHED", Phase.failed: "FAILED", Phase.stopped: "KILLED"}


def round_metrics(record: RoundRecord) -> dict[str, float]:
    """The MLflow metrics of one closed round (unknown figures left out)."""
    metrics: dict[str, float | None] = {
        "accuracy": record.accuracy, "loss": record.loss, "epsilon": record.epsilon,
        "train_loss": record.train_loss, "bytes_up": record.bytes_up,
        "bytes_down": record.bytes_down, "clients_selected": record.clients_selected,
        "clients_in": record.clients_in, "clients_dropped": record.clients_dropped,
        "set_aside": record.set_aside, "round_seconds": record.seconds,
    }
    return {name: float(value) for name, value in metrics.items() if value is not None}


def flat_params(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """A nested spec as dotted MLflow parameters: `privacy.targetEpsilon` -> "3.0"."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from flat_params(value, prefix=f"{name}.")
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            yield name, text[:PARAM_VALUE_LIMIT]


class MlflowTracker:
    """An event subscriber logging one job to one MLflow run."""

    def __init__(self, job: FederatedJob, *, tracking_uri: str, experiment: str | None = None,
                 output_dir: Path | None = None) -> None:
        self.job = job
        self.tracking_uri = tracking_uri
        self.experiment = experiment or job.metadata.name
        self.output_dir = output_dir
        self.run_id: str | None = None
        self._client: Any = None
        self._broken = False
        self._closed = False
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow")
        self._submit("start", self._start)

    # ------------------------------------------------------------ the stream

    def __call__(self, event: Event) -> None:
        if isinstance(event, RoundClosed):
            self._submit("log round", self._log_round, event.record)
        elif isinstance(event, JobStatusChanged) and event.status.phase in _END_STATUS:
            self._submit("tag status", self._tag_status, event)

    def wait(self) -> None:
        """Until everything submitted so far has reached the store (or failed)."""
        if not self._closed:
            self._worker.submit(lambda: None).result()

    def finish(self, *, model: torch.nn.Module | None = None,
               weights: Mapping[str, torch.Tensor] | None = None,
               phase: Phase | None = None) -> None:
        """Log the run's files and the final model, close the run, stop the worker."""
        self._submit("finish", self._finish, model, weights, phase)
        self._closed = True
        self._worker.shutdown(wait=True)

    # ------------------------------------------------------------ the work

    def _start(self) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as error:
            raise RuntimeError("tracking.mlflow is set but mlflow is not installed "
                               "(pip install 'fedkube[mlflow]')") from error
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        resumed = self._saved_run_id()
        if resumed is not None:
            self.run_id = resumed
            self._client.update_run(resumed, status="RUNNING")
            log.info("continuing MLflow run %s", resumed)
            return
        found = self._client.get_experiment_by_name(self.experiment)
        experiment_id = (found.experiment_id if found is not None
                         else self._client.create_experiment(self.experiment))
        run = self._client.create_run(experiment_id, run_name=self.job.metadata.name,
                                      tags={"fedkube.job": self.job.metadata.name})
        self.run_id = run.info.run_id
        self._save_run_id()
        self._log_params()
        log.info("MLflow run %s in experiment %r at %s", self.run_id, self.experiment,
                 self.tracking_uri)

    def _log_params(self) -> None:
        from mlflow.entities import Param

        params = [Param(key, value) for key, value in flat_params(self.job.spec.to_wire())]
        for start in range(0, len(params), PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=params[start:start + PARAMS_PER_BATCH])

    def _log_round(self, record: RoundRecord) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            return
        stamp = _now_ms()
        metrics = [Metric(name, value, stamp, record.round)
                   for name, value in round_metrics(record).items()]
        self._client.log_batch(self.run_id, metrics=metrics)

    def _tag_status(self, event: JobStatusChanged) -> None:
        if self.run_id is None:
            return
        status = event.status
        self._client.set_tag(self.run_id, "fedkube.phase", status.phase.value)
        if status.message:
            self._client.set_tag(self.run_id, "fedkube.message", status.message[:5000])

    def _finish(self, model: torch.nn.Module | None,
                weights: Mapping[str, torch.Tensor] | None, phase: Phase | None) -> None:
        from .report import CLIENTS_PLOT, PLOT, SUMMARY

        if self.run_id is None:
            return
        if self.output_dir is not None:
            for name in (SUMMARY, PLOT, CLIENTS_PLOT):
                if (self.output_dir / name).exists():
                    self._client.log_artifact(self.run_id, str(self.output_dir / name))
            summary_path = self.output_dir / SUMMARY
            if summary_path.exists():
                clients = json.loads(summary_path.read_text()).get("clients") or {}
                self._client.log_table(self.run_id, data=client_table(clients),
                                       artifact_file=CLIENTS_TABLE)
        if model is not None:
            self._log_model(model, weights)
        status = _END_STATUS.get(phase, "FINISHED") if phase is not None else "FINISHED"
        self._client.set_terminated(self.run_id, status=status)

    def _log_model(self, model: torch.nn.Module,
                   weights: Mapping[str, torch.Tensor] | None) -> None:
        import mlflow.pytorch

        if weights is not None:
            load_weights(model, weights)
        with tempfile.TemporaryDirectory() as folder:
            saved = Path(folder) / MODEL_PATH
            # Requirements given, not inferred: inference loads the model again in a
            # child interpreter, which costs more than the whole of a small job.
            # Pickled, not mlflow 3's traced pt2 default: that needs an input example and
            # a graph torch.export accepts, which a user's module:factory may not give.
            mlflow.pytorch.save_model(model, str(saved), serialization_format="pickle",
                                      pip_requirements=[
                                          f"torch=={torch.__version__.split('+')[0]}",
                                          "fedkube"])
            self._client.log_artifacts(self.run_id, str(saved), artifact_path=MODEL_PATH)

    # ------------------------------------------------------------ helpers

    def _saved_run_id(self) -> str | None:
        if self.output_dir is None or not (self.output_dir / RUN_ID_FILE).exists():
            return None
        saved = json.loads((self.output_dir / RUN_ID_FILE).read_text())
        if saved.get("trackingUri") != self.tracking_uri:
            return None  # another store: a new run there
        return str(saved["runId"])

    def _save_run_id(self) -> None:
        if self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / RUN_ID_FILE).write_text(json.dumps(
            {"runId": self.run_id, "trackingUri": self.tracking_uri,
             "experiment": self.experiment}) + "\n")

    def _submit(self, what: str, work: Callable[..., None], *args: Any) -> None:
        if not self._closed:
            self._worker.submit(self._guarded, what, work, *args)

    def _guarded(self, what: str, work: Callable[..., None], *args: Any) -> None:
        if self._broken:
            return
        try:
            work(*args)
        except Exception as error:  # noqa: BLE001 - tracking never stops training
            self._broken = True
            log.warning("MLflow tracking stopped (%s failed: %s); the job goes on untracked",
                        what, error)


def client_table(clients: Mapping[str, Mapping[str, Any]]) -> dict[str, list[Any]]:
    """summary.json's clients as MLflow table columns, one row per client."""
    rows = []
    for node_id, entry in sorted(clients.items()):
        status = dict(entry.get("status") or {})
        status.pop("privacy", None)
        spec = entry.get("spec") or {}
        rows.append({"nodeId": node_id, "device": spec.get("device"), **status})
    columns = sorted({key for row in rows for key in row} - {"nodeId"})
    return {"nodeId": [row["nodeId"] for row in rows],
            **{column: [row.get(column) for row in rows] for column in columns}}


def _now_ms() -> int:
    return int(time.time() * 1000)


def tracker_for(job: FederatedJob, *, output_dir: Path | None,
                uri_override: str | None = None) -> MlflowTracker | None:
    """The job's tracker, when the spec or `--mlflow-uri` asks for one."""
    configured = job.spec.tracking.mlflow
    uri = uri_override or (configured.tracking_uri if configured else None)
    if not uri:
        return None
    return MlflowTracker(job, tracking_uri=uri,
                         experiment=configured.experiment if configured else None,
                         output_dir=output_dir)
