"""The generated gRPC stubs are what fedkube.proto says (regenerate with
`python -P -m fedkube.runtime.proto.generate`), and they work under every protobuf that
pyproject.toml allows, so fedkube installs beside stacks that pin protobuf (Flower: <7)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fedkube.runtime.proto import generate

#: The generator pinned in pyproject.toml's test extra; its gencode (protobuf 5.26.1) has
#: no runtime version check, which later generators add and which refuses older runtimes.
GENERATOR = "1.64.3"


def test_generated_stubs_are_not_stale(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    for path in fresh:
        committed = generate.PROTO_DIR / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed.name} is stale: run `python -P -m fedkube.runtime.proto.generate`")


def test_the_stubs_come_from_the_pinned_generator() -> None:
    from importlib.metadata import version

    assert version("grpcio-tools") == GENERATOR, (
        "install the grpcio-tools that pyproject.toml pins before regenerating")
    grpc_stub = (generate.PROTO_DIR / "fedkube_pb2_grpc.py").read_text()
    assert f"GRPC_GENERATED_VERSION = '{GENERATOR}'" in grpc_stub
    assert "ValidateProtobufRuntimeVersion" not in (
        generate.PROTO_DIR / "fedkube_pb2.py").read_text()


_ROUND_TRIP = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import google.protobuf
    assert google.protobuf.__file__.startswith(sys.argv[1]), google.protobuf.__file__
    from fedkube.runtime.proto import fedkube_pb2 as pb, fedkube_pb2_grpc
    chunk = pb.UpdateChunk(tensor=pb.TensorChunk(name="w", shape=[2], data=b"12345678"))
    back = pb.UpdateChunk.FromString(chunk.SerializeToString())
    assert back.WhichOneof("part") == "tensor" and back.tensor.data == b"12345678"
    assert fedkube_pb2_grpc.CoordinatorStub is not None
    print(google.protobuf.__version__)
""")


@pytest.mark.slow  # installs protobuf from PyPI
@pytest.mark.parametrize("requirement", ["protobuf==5.26.1", "protobuf>=7,<8"],
                         ids=["oldest", "newest-major"])
def test_stubs_import_and_round_trip_under_each_end_of_the_protobuf_range(
        requirement: str, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), requirement], check=True, timeout=300)
    result = subprocess.run([sys.executable, "-P", "-c", _ROUND_TRIP, str(target)],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    print(requirement, "->", result.stdout.strip())
