#!/usr/bin/env bash
# The README's first command: install, then run the demo job on this machine.
# Arguments go to `fedkube run`: a second demo refuses the finished runs/digits-fedavg;
# `./scripts/demo.sh --fresh` starts it over.
set -euo pipefail
cd "$(dirname "$0")/.."
# The top-level folder `operator/` would shadow Python's own module whenever the working
# directory is on sys.path (python -m ...): Python 3.11's safe-path mode keeps it off.
export PYTHONSAFEPATH=1
./scripts/setup.sh
. .venv/bin/activate
fedkube run examples/digits-fedavg.yaml --output runs/digits-fedavg "$@"
