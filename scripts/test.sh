#!/usr/bin/env bash
# Set up ./.venv (scripts/setup.sh), lint, type-check and run the whole test suite.
# The suite runs in two passes: every test but the `timing` ones on all cores (pytest-xdist; each test trains
# with one torch thread), then the `timing` ones alone, so no other test's load sits beside a measurement
# they decide on (MNV3_TEST_WORKERS=N sets the first pass's workers; default: one per core). Arguments go to
# one plain pytest run instead (e.g. `bash scripts/test.sh tests/test_lut.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check mnv3_search tests benchmarks  # lint: pyproject.toml [tool.ruff]
.venv/bin/mypy mnv3_search  # types: pyproject.toml [tool.mypy]
if [ $# -gt 0 ]; then
    exec .venv/bin/python -m pytest -q "$@"
fi
status=0
.venv/bin/python -m pytest -q -n "${MNV3_TEST_WORKERS:-auto}" -m "not timing" || status=$?
.venv/bin/python -m pytest -q -m timing || status=$?
exit "$status"
