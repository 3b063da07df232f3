#!/usr/bin/env bash
# Set up ./.venv (scripts/setup.sh), lint, type-check and run the whole test suite.
# The suite runs in two passes: every test but the `timing` ones on all cores (pytest-xdist; each test trains
# with one torch thread), then the `timing` ones alone, so no other test's load sits beside a measurement
# they decide on (MNV3_TEST_WORKERS=N sets the first pass's workers; default: one per core). The type check
# runs beside the first pass (its output follows that pass's) and ends before the second. Arguments go to one
# plain pytest run instead, after the lint and the type check (e.g. `bash scripts/test.sh tests/latency/test_lut.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check mnv3_search tests benchmarks  # lint: pyproject.toml [tool.ruff]
if [ $# -gt 0 ]; then
    .venv/bin/mypy mnv3_search  # types: pyproject.toml [tool.mypy]
    exec .venv/bin/python -m pytest -q "$@"
fi
mypy_log=$(mktemp "${TMPDIR:-/tmp}/mnv3-mypy-log.XXXXXX")
trap 'rm -f "$mypy_log"' EXIT
.venv/bin/mypy mnv3_search >"$mypy_log" 2>&1 &  # types: pyproject.toml [tool.mypy]
mypy_pid=$!
status=0
.venv/bin/python -m pytest -q -n "${MNV3_TEST_WORKERS:-auto}" -m "not timing" || status=$?
mypy_status=0
wait "$mypy_pid" || mypy_status=$?
cat "$mypy_log"
if [ "$mypy_status" -ne 0 ]; then
    echo "scripts/test.sh: mypy failed (exit $mypy_status)" >&2
    status=1
fi
.venv/bin/python -m pytest -q -m timing || status=$?
exit "$status"
