"""clients.png stays a picture of fixed size for a large fleet (a row per client would
be 0.35 inch per client: at 1,000 clients a 220 MB bitmap and most of the shut-down)."""

from __future__ import annotations

import struct
from pathlib import Path

from fedkube.runtime.coordinator.plot import MAX_NAMED_CLIENTS, plot_clients


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def _fleet(count: int) -> dict[str, dict]:
    return {f"client-{i:04d}": {"status": {"roundsParticipated": i % 4,
                                           "lastRoundSeconds": 0.5 + i % 7}}
            for i in range(count)}


def test_a_large_fleet_is_drawn_as_histograms_of_fixed_size(tmp_path: Path) -> None:
    small = plot_clients(_fleet(12), tmp_path / "small.png", title="t", rounds=3)
    over = plot_clients(_fleet(MAX_NAMED_CLIENTS + 1), tmp_path / "over.png", title="t",
                        rounds=3)
    large = plot_clients(_fleet(1000), tmp_path / "large.png", title="t", rounds=3)
    small_w, small_h = _png_size(small)
    assert small_h > 0.35 * 12 * 100  # one named row per client
    # Past MAX_NAMED_CLIENTS two histograms, the same picture for 61 and 1,000 clients.
    assert _png_size(over) == _png_size(large)
    assert _png_size(large)[1] < 1000 and _png_size(large)[0] == small_w
