#!/usr/bin/env bash
# Creates .venv with everything fedkube needs. torch goes first and pinned to the 2.13
# series: letting pip pick a torch version can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.*"
python -m pip install --quiet -e ".[test]"
