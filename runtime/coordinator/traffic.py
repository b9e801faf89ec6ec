"""A round's traffic for its record: bytes up and down in this round, and the upload as
a fraction of the raw float32 updates it stands for (what compression bought)."""

from __future__ import annotations

from collections.abc import Sequence

from .events import RoundRecord
from .round import Round


def traffic(opened: Round, history: Sequence[RoundRecord], bytes_down: int,
            model_bytes: int) -> dict[str, int | float | None]:
    """`bytes_down` is the job's total so far; the round's share is what was sent since
    the previous closed round (a retried round's downloads count toward the next)."""
    previous = history[-1].bytes_down if history else 0
    raw = len(opened.accepted) * model_bytes
    return {
        "round_bytes_up": opened.bytes_up,
        "round_bytes_down": max(0, bytes_down - previous),
        "compression_ratio": round(opened.bytes_up / raw, 6) if raw else None,
    }
