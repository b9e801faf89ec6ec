"""Fixtures for every suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Processes


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


def _accelerator_present() -> bool:
    import torch

    return torch.cuda.is_available() or torch.backends.mps.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run where CUDA or MPS is present and say why they did not
    elsewhere (torch is imported only when such a test was collected)."""
    marked = [item for item in items if item.get_closest_marker("gpu") is not None]
    if marked and not _accelerator_present():
        skip = pytest.mark.skip(reason="no CUDA/MPS device")
        for item in marked:
            item.add_marker(skip)
