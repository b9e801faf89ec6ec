#!/usr/bin/env bash
# The README's test command: install, then lint the layering, then run the default suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
# A top-level folder is named `operator`; never let the working directory shadow the stdlib.
export PYTHONSAFEPATH=1
python scripts/get-helm.py >/dev/null
ruff check --force-exclude --quiet .
./scripts/lint-imports.sh
python -m pytest -q "$@"
