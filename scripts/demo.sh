#!/usr/bin/env bash
# The README's first command: install, then run the demo job on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
export PYTHONSAFEPATH=1
fedkube run examples/digits-fedavg.yaml --output runs/digits-fedavg "$@"
