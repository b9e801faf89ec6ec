"""The generated gRPC stubs are what fedkube.proto says (regenerate with
`python -P -m fedkube.runtime.proto.generate`)."""

from __future__ import annotations

from pathlib import Path

from fedkube.runtime.proto import generate


def test_generated_stubs_are_not_stale(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    for path in fresh:
        committed = generate.PROTO_DIR / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed.name} is stale: run `python -P -m fedkube.runtime.proto.generate`")
