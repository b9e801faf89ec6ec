#!/usr/bin/env bash
# The README's test command: install, then lint the layering, then run the default suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The top-level folder `operator/` would shadow Python's own module whenever the working
# directory is on sys.path (python -m ...): Python 3.11's safe-path mode keeps it off.
export PYTHONSAFEPATH=1
./scripts/setup.sh
. .venv/bin/activate
python scripts/get-helm.py >/dev/null
ruff check --force-exclude --quiet .
./scripts/lint-imports.sh
python -m pytest -q "$@"
