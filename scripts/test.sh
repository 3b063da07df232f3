#!/usr/bin/env bash
# Set up ./.venv (scripts/setup.sh), lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check mnv3_search tests benchmarks  # lint: pyproject.toml [tool.ruff]
.venv/bin/mypy mnv3_search  # types: pyproject.toml [tool.mypy]
exec .venv/bin/python -m pytest -q "$@"
