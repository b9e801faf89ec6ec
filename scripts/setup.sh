#!/usr/bin/env bash
# Creates .venv with everything fedkube needs. torch goes first and pinned to the 2.13
# series: letting pip pick a torch version can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
# The top-level folder `operator/` would shadow Python's own module whenever the working
# directory is on sys.path (python -m ...): Python 3.11's safe-path mode keeps it off.
export PYTHONSAFEPATH=1
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.*"
python -m pip install --quiet -e ".[test]"
