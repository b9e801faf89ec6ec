"""Regenerate the gRPC stubs: `python -m fedkube.runtime.proto.generate`.

Generated code lives only in this folder. The import inside the generated *_grpc file is
rewritten to a relative one so the stubs work under the `fedkube.runtime.proto` package.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = PROTO_DIR / "fedkube.proto"
GENERATED = ("fedkube_pb2.py", "fedkube_pb2.pyi", "fedkube_pb2_grpc.py")


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc on fedkube.proto into out_dir; returns the files written."""
    from grpc_tools import protoc  # only needed by developers, not at run time

    out_dir.mkdir(parents=True, exist_ok=True)
    code = protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_FILE),
    ])
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    grpc_file = out_dir / "fedkube_pb2_grpc.py"
    text = grpc_file.read_text()
    grpc_file.write_text(re.sub(r"^import fedkube_pb2 as", "from . import fedkube_pb2 as",
                                text, flags=re.MULTILINE))
    return [out_dir / name for name in GENERATED]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(path)
