#!/usr/bin/env bash
# The test command (README, .ci/run): architecture, lint, types, then the test suite.
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin
echo "check: import-linter (one-way layers, no cycles)"
$PY/lint-imports --no-cache
echo "check: ruff"
$PY/ruff check --no-cache .
$PY/ruff format --check --no-cache .
echo "check: mypy"
$PY/mypy --no-incremental
echo "check: pytest"
$PY/python -m pytest -q "$@"
