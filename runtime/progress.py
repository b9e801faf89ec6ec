"""What `fedkube run` shows while a job runs: a bar over rounds on a terminal (with what
it is doing before round 1, the best accuracy and the privacy budget spent), and one
line per stage and per round where no one watches a terminal (logs, CI)."""

from __future__ import annotations

from typing import Any, TextIO

from tqdm import tqdm

from .coordinator.engine import RoundRecord
from .spec import ClientNodeSpec, ClientNodeStatus, FederatedJob, FederatedJobStatus, Phase


class ConsoleProgress:
    """A StatusSink (and `on_round` listener) that draws progress on stderr."""

    def __init__(self, job: FederatedJob, *, stream: TextIO, enabled: bool,
                 expected_clients: int) -> None:
        self.name = job.metadata.name
        self.total_rounds = job.spec.rounds
        # strategy.mode async counts server steps where a synchronous job counts rounds.
        self.unit = "step" if job.spec.strategy.mode == "async" else "round"
        self.expected_clients = expected_clients
        self.enabled = enabled
        self.stream = stream
        self.interactive = enabled and stream.isatty()
        # The bar only where a person watches a terminal; logs get the lines.
        self.bar = tqdm(total=job.spec.rounds, desc=self.name, unit=self.unit, file=stream,
                        disable=not self.interactive, dynamic_ncols=True, leave=True)
        self.best: float | None = None
        self.epsilon: float | None = None
        self.registered = 0
        self.rounds_started = False

    # ------------------------------------------------------------- stages

    def stage(self, text: str) -> None:
        """What the run is doing now (before round 1, and while it stops)."""
        if self.interactive:
            self.bar.set_description_str(f"{self.name}: {text}")
        elif self.enabled:
            self._line(text)

    def note(self, text: str) -> None:
        """A line that stays (resuming, interrupted, warnings)."""
        if self.enabled:
            self._line(text)

    def _line(self, text: str) -> None:
        tqdm.write(text, file=self.stream)

    # ----------------------------------------------------------- the sink

    def round(self, record: RoundRecord) -> None:
        if not self.rounds_started:
            self.rounds_started = True
            self.bar.set_description_str(self.name)
        self.best = record.accuracy if self.best is None else max(self.best, record.accuracy)
        if record.epsilon is not None:
            self.epsilon = record.epsilon
        line = (f"{self.unit} {record.round:>3}  accuracy {record.accuracy:.4f}  loss "
                f"{record.loss:.4f}  clients {record.clients_in}/{record.clients_selected}  "
                f"{record.seconds:.2f}s")
        if record.epsilon is not None:
            line += f"  ε {record.epsilon:.3f}"
        if self.enabled:
            self._line(line)
        # A resumed run starts its bar where the checkpoint left off.
        self.bar.n = record.round
        postfix = {"best": f"{self.best:.4f}"}
        if self.epsilon is not None:
            postfix["ε"] = f"{self.epsilon:.3f}"
        self.bar.set_postfix(postfix, refresh=True)

    def publish_job(self, status: FederatedJobStatus) -> None:
        if self.rounds_started or status.phase != Phase.running:
            return
        registered = status.clients.registered
        if registered != self.registered:
            self.registered = registered
            self.stage(f"registered {registered}/{self.expected_clients} clients")

    def publish_client(self, spec: ClientNodeSpec, status: ClientNodeStatus) -> None:
        """Clients are shown in summary.json; the console stays one line per round."""

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        if warning:
            self.note(f"warning: {reason}: {message}")

    # -------------------------------------------------------------- the end

    def finish(self, status: FederatedJobStatus | None) -> None:
        """Complete the bar, or say why it stopped before the planned rounds."""
        if status is not None and self.bar.n < self.total_rounds:
            if status.phase == Phase.succeeded:
                self.bar.total = self.bar.n  # ended early on purpose: the job is complete
                self.bar.set_description_str(f"{self.name}: {status.message}")
            else:
                self.bar.set_description_str(f"{self.name}: {status.phase.value}: "
                                             f"{status.message}")
        self.bar.refresh()
        self.bar.close()


def outcome_line(name: str, summary: dict[str, Any]) -> str:
    """`digits: Succeeded after 6 rounds, best accuracy 0.9722 (last 0.9722), 14.1s
    (start-up 4.2s, shut-down 1.1s)`."""
    line = f"{name}: {summary['phase']} after {summary['rounds']} rounds"
    if summary["bestAccuracy"] is not None:
        line += (f", best accuracy {summary['bestAccuracy']:.4f} "
                 f"(last {summary['finalAccuracy']:.4f})")
    if summary.get("epsilon") is not None:
        line += f", ε {summary['epsilon']:.3f} (target {summary['targetEpsilon']})"
    if summary["phase"] != "Succeeded" or summary["rounds"] == 0:
        line += f" ({summary['message']})"
    return (f"{line}, {summary['wallSeconds']:.1f}s (start-up {summary['startupSeconds']:.1f}s, "
            f"shut-down {summary['shutdownSeconds']:.1f}s)")
