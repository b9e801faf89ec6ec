"""What a run leaves in its output folder: metrics.jsonl (a line per round), summary.json
(the final status and figures) and metrics.png (accuracy, loss and epsilon per round)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..spec import ClientNodeSpec, ClientNodeStatus, FederatedJobStatus
from .events import RoundRecord

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PLOT = "metrics.png"


class RunReport:
    """A StatusSink that keeps the files of a run up to date."""

    def __init__(self, output_dir: Path, *, job: str, target_epsilon: float | None) -> None:
        self.output_dir = output_dir
        self.job = job
        self.target_epsilon = target_epsilon
        output_dir.mkdir(parents=True, exist_ok=True)
        self.status: FederatedJobStatus | None = None
        self.clients: dict[str, dict[str, Any]] = {}

    def round(self, record: RoundRecord) -> None:
        with (self.output_dir / METRICS).open("a") as f:
            f.write(json.dumps(record.to_dict()) + "\n")

    def publish_job(self, status: FederatedJobStatus) -> None:
        self.status = status

    def publish_client(self, spec: ClientNodeSpec, status: ClientNodeStatus) -> None:
        self.clients[spec.node_id] = {"spec": spec.to_wire(), "status": status.to_wire()}

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        """Events are for Kubernetes and the console; the files keep the status."""

    def history(self) -> list[RoundRecord]:
        path = self.output_dir / METRICS
        if not path.exists():
            return []
        return [RoundRecord(**json.loads(line)) for line in path.read_text().splitlines()
                if line.strip()]

    def restart_from(self, history: Sequence[RoundRecord]) -> None:
        """metrics.jsonl as the checkpoint knows it: a resumed run continues from there
        (a round logged after the last checkpoint would otherwise appear twice)."""
        text = "".join(json.dumps(record.to_dict()) + "\n" for record in history)
        tmp = self.output_dir / (METRICS + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.output_dir / METRICS)

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The plot, then summary.json; returns the summary."""
        self.write_plot()
        return self.write_summary(extra)

    def write_plot(self) -> Path | None:
        history = self.history()
        if not history:
            return None
        return plot(history, self.output_dir / PLOT, title=self.job,
                    target_epsilon=self.target_epsilon)

    def write_summary(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """summary.json: camelCase keys, as in the job's status; clients sorted by node
        id. `extra` adds keys (camelCase too). Returns what it wrote."""
        history = self.history()
        summary: dict[str, Any] = {
            "job": self.job,
            "phase": self.status.phase.value if self.status else None,
            "message": self.status.message if self.status else None,
            "rounds": len(history),
            "finalAccuracy": history[-1].accuracy if history else None,
            "bestAccuracy": max((r.accuracy for r in history), default=None),
            "epsilon": history[-1].epsilon if history else None,
            "targetEpsilon": self.target_epsilon,
            "roundSeconds": round(sum(r.seconds for r in history), 3),
            "bytesUp": history[-1].bytes_up if history else 0,
            "bytesDown": history[-1].bytes_down if history else 0,
            **(extra or {}),
            "status": self.status.to_wire() if self.status else None,
            "clients": {node: self.clients[node] for node in sorted(self.clients)},
        }
        tmp = self.output_dir / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, self.output_dir / SUMMARY)
        return summary


def plot(history: Sequence[RoundRecord], path: Path, *, title: str,
         target_epsilon: float | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r.round for r in history]
    with_privacy = any(r.epsilon is not None for r in history)
    figure, axes = plt.subplots(1, 3 if with_privacy else 2, figsize=(13 if with_privacy else 9,
                                                                      3.6))
    axes[0].plot(rounds, [r.accuracy for r in history], marker="o", color="tab:blue")
    axes[0].set(title="test accuracy", xlabel="round", ylim=(0, 1))
    axes[1].plot(rounds, [r.loss for r in history], marker="o", color="tab:orange",
                 label="test")
    train = [(r.round, r.train_loss) for r in history if r.train_loss is not None]
    if train:
        axes[1].plot(*zip(*train, strict=True), marker=".", linestyle="--", color="tab:gray",
                     label="train (clients)")
        axes[1].legend()
    axes[1].set(title="loss", xlabel="round")
    if with_privacy:
        axes[2].plot(rounds, [r.epsilon or 0.0 for r in history], marker="o", color="tab:red",
                     label="spent")
        if target_epsilon is not None:
            axes[2].axhline(target_epsilon, linestyle="--", color="black", label="target")
        axes[2].set(title="privacy budget ε", xlabel="round", ylim=(0, None))
        axes[2].legend()
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
