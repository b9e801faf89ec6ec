"""The run's pictures: metrics.png (the job, round by round) and clients.png (who took
part and how long each took). Sized and labelled to be read at a glance: every axis says
what and in which unit, the targets are drawn as lines, the best round is marked."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .events import RoundRecord

FIGURE_DPI = 110
# zlib level 1: a third less CPU than the default 6 for a slightly larger file, paid at
# shut-down of every run.
PNG_OPTIONS = {"compress_level": 1}
FONT_SIZE = 11
# metrics.png's 3 x 2 panels on 13 x 12.5 inches, as tight_layout placed them.
ROUNDS_MARGINS = {"left": 0.075, "right": 0.985, "bottom": 0.045, "top": 0.94,
                  "wspace": 0.25, "hspace": 0.32}
# clients.png names each client on its own row up to this many; a larger fleet is drawn
# as two histograms of a fixed size (a row per client would be a picture 0.35 inch tall
# per client: at 1,000 clients a 220 MB bitmap, and most of the run's shut-down time).
MAX_NAMED_CLIENTS = 60


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": FONT_SIZE})
    return plt


def plot_rounds(history: Sequence[RoundRecord], path: Path, *, title: str,
                target_epsilon: float | None, target_accuracy: float | None = None) -> Path:
    """Accuracy (target line, best-so-far marker), loss, privacy spent (target line) or,
    without privacy, the round's duration, the clients in and dropped per round, the
    bytes up and down per round and the upload's compression ratio."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    rounds = [r.round for r in history]
    figure, grid = plt.subplots(3, 2, figsize=(13, 12.5))
    accuracy, loss, third, clients, traffic, ratio = grid.flat
    # strategy.mode async records server steps (they carry the buffer's mean staleness).
    unit = "server step" if history and history[-1].mean_staleness is not None else "round"

    accuracy.plot(rounds, [r.accuracy for r in history], marker="o", label="test accuracy")
    best = max(history, key=lambda r: r.accuracy)
    accuracy.scatter([best.round], [best.accuracy], s=160, marker="*", color="tab:green",
                     zorder=3, label=f"best {best.accuracy:.3f} (round {best.round})")
    if target_accuracy is not None:
        accuracy.axhline(target_accuracy, linestyle="--", color="black",
                         label=f"target {target_accuracy:g}")
    accuracy.set(title="Global model accuracy", xlabel=unit, ylabel="accuracy (test set)",
                 ylim=(0, 1.02))
    accuracy.legend(loc="lower right")

    loss.plot(rounds, [r.loss for r in history], marker="o", color="tab:orange",
              label="test (global model)")
    train = [(r.round, r.train_loss) for r in history if r.train_loss is not None]
    if train:
        loss.plot(*zip(*train, strict=True), marker=".", linestyle="--", color="tab:gray",
                  label="train (clients' mean)")
    loss.set(title="Loss", xlabel=unit, ylabel="cross-entropy loss")
    loss.legend(loc="upper right")

    if any(r.epsilon is not None for r in history):
        third.plot(rounds, [r.epsilon or 0.0 for r in history], marker="o", color="tab:red",
                   label="ε spent")
        if target_epsilon is not None:
            third.axhline(target_epsilon, linestyle="--", color="black",
                          label=f"target ε {target_epsilon:g}")
        third.set(title="Privacy budget", xlabel=unit, ylabel="ε spent", ylim=(0, None))
        third.legend(loc="lower right")
    else:
        third.bar(rounds, [r.seconds for r in history], color="tab:purple")
        third.set(title=f"{unit.capitalize()} duration", xlabel=unit, ylabel="seconds")

    clients.bar(rounds, [r.clients_in for r in history], color="tab:blue", label="in")
    clients.bar(rounds, [r.clients_dropped for r in history],
                bottom=[r.clients_in for r in history], color="tab:gray", label="dropped")
    clients.set(title=f"Clients per {unit}", xlabel=unit, ylabel="clients")
    clients.yaxis.set_major_locator(MaxNLocator(integer=True))
    clients.legend(loc="lower right")

    mb = 1e-6
    up = [r.round_bytes_up * mb for r in history]
    traffic.bar([x - 0.2 for x in rounds], up, width=0.4, color="tab:blue", label="up (updates)")
    traffic.bar([x + 0.2 for x in rounds], [r.round_bytes_down * mb for r in history],
                width=0.4, color="tab:gray", label="down (model)")
    traffic.set(title="Traffic per round", xlabel="round", ylabel="MB")
    traffic.legend(loc="upper right")

    ratios = [(r.round, r.compression_ratio) for r in history if r.compression_ratio is not None]
    if ratios:
        ratio.plot(*zip(*ratios, strict=True), marker="o", color="tab:green",
                   label="upload / raw float32")
        ratio.axhline(1.0, linestyle="--", color="black", label="uncompressed")
        ratio.set_yscale("log")
        ratio.legend(loc="upper right")
    ratio.set(title="Compression ratio", xlabel="round", ylabel="bytes sent / fp32 bytes")

    for axis in grid.flat:
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(title, fontsize=FONT_SIZE + 3)
    # Fixed margins, not tight_layout: the panels and their labels are always the same,
    # and tight_layout measures every tick label by drawing the figure once more (about
    # 40% of this function's CPU, paid at every run's shut-down).
    figure.subplots_adjust(**ROUNDS_MARGINS)
    figure.savefig(path, dpi=FIGURE_DPI, pil_kwargs=PNG_OPTIONS)
    plt.close(figure)
    return path


def plot_clients(clients: Mapping[str, Mapping[str, Any]], path: Path, *, title: str,
                 rounds: int) -> Path:
    """Per client (summary.json's `clients`): rounds taken part in out of the job's
    rounds, and the seconds its last accepted update took from dispatch."""
    plt = _pyplot()

    names = sorted(clients)
    status = [dict(clients[name].get("status") or {}) for name in names]
    if len(names) > MAX_NAMED_CLIENTS:
        return _plot_client_histograms(plt, status, path, title=title, rounds=rounds)
    height = max(3.5, 0.35 * len(names) + 1.5)
    figure, (taken, seconds) = plt.subplots(1, 2, figsize=(13, height), sharey=True)
    positions = range(len(names))
    taken.barh(positions, [s.get("roundsParticipated", 0) for s in status], color="tab:blue")
    taken.axvline(rounds, linestyle="--", color="black", label=f"job rounds ({rounds})")
    taken.set(title="Participation", xlabel="rounds taken part in", yticks=list(positions),
              yticklabels=names)
    taken.legend(loc="lower right")
    seconds.barh(positions, [s.get("lastRoundSeconds") or 0.0 for s in status],
                 color="tab:orange")
    seconds.set(title="Time per client (last round)", xlabel="seconds, dispatch to update")
    for axis in (taken, seconds):
        axis.grid(alpha=0.3, axis="x")
    taken.invert_yaxis()  # shared: the first client on top in both panels
    figure.suptitle(f"{title}: clients", fontsize=FONT_SIZE + 3)
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI, pil_kwargs=PNG_OPTIONS)
    plt.close(figure)
    return path


def _plot_client_histograms(plt: Any, status: Sequence[Mapping[str, Any]], path: Path, *,
                            title: str, rounds: int) -> Path:
    """clients.png for a large fleet: how many clients took part in how many rounds, and
    how their last round's time was spread; the same size whatever the fleet's."""
    from matplotlib.ticker import MaxNLocator

    figure, (taken, seconds) = plt.subplots(1, 2, figsize=(13, 4.5))
    participated = [s.get("roundsParticipated", 0) for s in status]
    top = max([rounds, *participated])
    taken.hist(participated, bins=[x - 0.5 for x in range(top + 2)] if top <= 60 else 60,
               color="tab:blue")
    taken.axvline(rounds, linestyle="--", color="black", label=f"job rounds ({rounds})")
    taken.set(title=f"Participation ({len(status)} clients)", xlabel="rounds taken part in",
              ylabel="clients")
    taken.yaxis.set_major_locator(MaxNLocator(integer=True))
    taken.legend(loc="upper right")
    times = [s["lastRoundSeconds"] for s in status if s.get("lastRoundSeconds")]
    seconds.hist(times or [0.0], bins=40, color="tab:orange")
    seconds.set(title=f"Time per client, last round ({len(times)} measured)",
                xlabel="seconds, dispatch to update", ylabel="clients")
    seconds.yaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in (taken, seconds):
        axis.grid(alpha=0.3, axis="y")
    figure.suptitle(f"{title}: clients", fontsize=FONT_SIZE + 3)
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI, pil_kwargs=PNG_OPTIONS)
    plt.close(figure)
    return path
