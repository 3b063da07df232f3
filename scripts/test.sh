#!/usr/bin/env bash
# Set up ./.venv (scripts/setup.sh) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check mnv3_search tests benchmarks  # lint: pyproject.toml [tool.ruff]
exec .venv/bin/python -m pytest -q "$@"
