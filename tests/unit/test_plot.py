"""metrics.png: all six panels on the one figure that is saved, and no figure left open
(a run's shut-down pays for every figure drawn)."""

from __future__ import annotations

from pathlib import Path

from fedkube.runtime.coordinator.events import RoundRecord
from fedkube.runtime.coordinator.plot import FIGURE_DPI, plot_rounds


def _record(number: int) -> RoundRecord:
    return RoundRecord(round=number, accuracy=0.5 + 0.1 * number, loss=1.0 / number,
                       clients_selected=2, clients_in=2, clients_dropped=0, set_aside=0,
                       seconds=1.0, epsilon=None, bytes_up=1000 * number,
                       bytes_down=2000 * number, train_loss=0.9 / number, model_version=number,
                       round_bytes_up=1000, round_bytes_down=2000, compression_ratio=0.5)


def test_metrics_plot_draws_traffic_and_compression_on_the_saved_figure(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt
    from PIL import Image

    before = set(plt.get_fignums())
    path = plot_rounds([_record(1), _record(2)], tmp_path / "metrics.png", title="job",
                       target_epsilon=None, target_accuracy=0.9)
    assert set(plt.get_fignums()) == before  # nothing drawn and left behind
    with Image.open(path) as image:
        width, height = image.size
    # Three rows of panels (accuracy/loss, duration/clients, traffic/compression), not two.
    assert (width, height) == (round(13 * FIGURE_DPI), round(12.5 * FIGURE_DPI))
