#!/usr/bin/env bash
# Checks DESIGN.md's layers (the contracts in pyproject.toml) with import-linter.
# Its graph builder walks real folders, and an editable install maps runtime/ and operator/
# to fedkube.* only through an import hook, so we lint a copy laid out as installed.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/fedkube"
touch "$tree/fedkube/__init__.py"
for package in runtime operator; do
  cp -r "$package" "$tree/fedkube/$package"
done
find "$tree" -name __pycache__ -prune -exec rm -rf {} +
# The project's own venv when none is active (scripts/setup.sh makes it).
lint=$(command -v lint-imports || echo .venv/bin/lint-imports)
PYTHONSAFEPATH=1 PYTHONPATH="$tree" "$lint" --config pyproject.toml
