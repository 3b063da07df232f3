#!/usr/bin/env bash
# Build the wheel, install it into a fresh venv with every dependency at its declared floor, and run the
# CLI from outside the checkout: proves the wheel holds every subpackage and data file, and that the
# floors in pyproject.toml are versions that work. Leaves nothing behind (a temp dir, removed on exit).
# Usage: bash scripts/wheel_check.sh        (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/mnv3-wheel-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
step() { echo "wheel check [$((SECONDS - start))s]: $*"; }

step "fresh venv in $tmp"
"$python" -m venv "$tmp/venv"
# pip's chatter goes to a log shown only on failure; --no-compile skips byte-compiling torch (minutes here)
pip() { "$tmp/venv/bin/python" -m pip --disable-pip-version-check "$@" --no-compile >>"$tmp/pip.log" 2>&1 ||
    { tail -n 40 "$tmp/pip.log" >&2; echo "wheel check: pip $1 failed" >&2; exit 1; }; }
# torch first: torch==2.13.0 is a CPU build on local disk here; a bare `torch` would pull CUDA builds.
pip install "torch==2.13.0"

step "building the wheel from a clean copy of the working tree (no stale build/ can hide a missing file)"
"$tmp/venv/bin/python" - "$repo" "$tmp/src" <<'PY'
import shutil, sys
skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "results", "__pycache__", ".pytest_cache")
shutil.copytree(sys.argv[1], sys.argv[2], symlinks=True, ignore=skip)
PY
"$tmp/venv/bin/python" -m pip --disable-pip-version-check wheel --quiet --no-deps --wheel-dir "$tmp/dist" "$tmp/src" \
    >>"$tmp/pip.log" 2>&1 || { tail -n 40 "$tmp/pip.log" >&2; exit 1; }
wheel=$(ls "$tmp"/dist/mnv3_search-*.whl)

step "installing $(basename "$wheel") with every dependency pinned to its floor"
"$tmp/venv/bin/python" - "$repo/pyproject.toml" >"$tmp/floors.txt" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
for dep in deps:
    # a floor, and at most an upper bound beside it (optuna<6: study.py mirrors that major version's internals)
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([^,;\s]+)(?:,\s*<[^,;\s]+)?", dep.strip())
    if not m:
        sys.exit(f"pyproject.toml: dependency {dep!r} has no plain >= floor (an upper bound beside it is allowed)")
    print(f"{m[1]}=={m[2]}")
PY
pip install --constraint "$tmp/floors.txt" "$wheel"

step "running the installed CLI from $tmp/work (outside the checkout)"
mkdir "$tmp/work"
cd "$tmp/work"
unset PYTHONPATH
export MNV3_SEARCH_LUT_DIR="$tmp/lut"
bin="$tmp/venv/bin"
where=$("$bin/python" -c "import mnv3_search, os; print(os.path.dirname(mnv3_search.__file__))")
case "$where" in
    "$tmp/venv/"*) ;;
    *) echo "wheel check: mnv3_search was imported from $where, not from the fresh venv" >&2; exit 1 ;;
esac
run() { echo "+ mnv3-search $*"; "$bin/mnv3-search" "$@" >"$tmp/out.txt" 2>&1 || { cat "$tmp/out.txt"; exit 1; }; }
run --help
# every subcommand's --help, in one process (each would import torch afresh: minutes on a busy host)
"$bin/python" - >"$tmp/help.txt" 2>&1 <<'PY' || { cat "$tmp/help.txt"; echo "wheel check: a subcommand's --help failed" >&2; exit 1; }
import click
from click.testing import CliRunner
from mnv3_search.cli.main import cli

ctx = click.Context(cli)
def walk(cmd, path):
    yield path
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):  # imports each lazily loaded command module from the wheel
            yield from walk(cmd.get_command(ctx, name), path + [name])
paths = [p for p in walk(cli, []) if p]
for path in paths:
    result = CliRunner().invoke(cli, [*path, "--help"])
    print("+ mnv3-search", " ".join(path), "--help")
    if result.exit_code != 0 or "Usage:" not in result.output:
        raise SystemExit(f"{' '.join(path)} --help failed: {result.output}{result.exception!r}")
assert len(paths) >= 12, paths
print(f"{len(paths)} subcommands")
PY
cat "$tmp/help.txt"
step "profile and a tiny netadapt"
run profile large --no-latency
run profile small --resolution 64 --json  # latency with ONNX Runtime, from the installed wheel
# a tiny NetAdapt run on the bundled digits data; a MACs budget keeps it to seconds: latency budgets
# are covered by the test suite
run netadapt small --budget 5.3M-macs --resolution 64 --limit 120 --batch-size 16 --short-steps 4 --rungs 2 \
    --seed-epochs 1 --long-epochs 1 --out "$tmp/work/run" --quiet
tail -n 1 "$tmp/out.txt"
for f in run.json final.yaml final.pt final.onnx iterations.csv; do
    [ -s "$tmp/work/run/$f" ] || { echo "wheel check: netadapt wrote no $f" >&2; exit 1; }
done
step "ok: --help of every subcommand, profile and a tiny netadapt ran from the installed wheel"
