#!/usr/bin/env bash
# Create ./.venv if needed and install mnv3-search (editable) with its test extra.
# torch==2.13.0 goes first: on these machines it is a CPU build on local disk; a bare `torch`
# would pull gigabytes of CUDA. The project's range (torch>=2.2) is then already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
