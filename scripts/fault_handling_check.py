"""Fault-handling check: remove each fault's handling from a copy of the repository and see its test fail.

Why: tests/netadapt/test_faults.py says that each fault of issue 27's item 4 is handled (a damaged trial training state
or chosen checkpoint is trained again from its parent; a full disk while writing a checkpoint, an artifact store
that stops answering or answers HTTP 500: one line, exit 4, a run the same command finishes). A test that still
passes with its handling removed proves nothing. So for each handler this script copies the checkout (without
.git, .venv, results and __pycache__) into a temporary folder, removes exactly that handler there with one exact
string replacement (refused loudly when the string is not in the file exactly once, so the check cannot go
stale), runs the fault's test in the copy (`python -m pytest` from the copy: the copy's mnv3_search is the one
imported, by the tests and by the processes they start) and expects it to FAIL. The same tests run once on an
unmodified copy, where they must pass.

Usage: python scripts/fault_handling_check.py [--tests-dir tests/netadapt] [--only NAME,NAME]
Prints one row per handler; exits 1 when a mutated test passes or an unmodified one fails. ~12 min on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".git", ".venv", "results", "__pycache__", ".pytest_cache", ".mypy_cache",
                                 ".ruff_cache", "*.egg-info")

# the tests, by short name: node ids inside --tests-dir (a move of test_faults.py is a change here only)
TESTS = {
    "state": "test_faults.py::test_a_damaged_trial_state_is_trained_again_from_its_parent",
    "chosen": "test_faults.py::test_a_damaged_chosen_checkpoint_is_trained_again",
    "enospc-seed": "test_faults.py::test_a_full_disk_is_one_line_and_the_same_command_finishes[seed-<lambda>]",
    "enospc-proposal": "test_faults.py::test_a_full_disk_is_one_line_and_the_same_command_finishes"
                       "[proposal-<lambda>]",
    "enospc-final": "test_faults.py::test_a_full_disk_is_one_line_and_the_same_command_finishes[final-<lambda>]",
    "store-down": "test_faults.py::test_a_store_that_stops_answering_is_one_line_and_resumable",
    "store-500": "test_faults.py::test_a_store_answering_500_is_one_line",
}


@dataclass(frozen=True)
class Mutation:
    name: str
    fault: str
    what: str  # the mutation in a few words
    file: str
    old: str  # must occur exactly once in `file`
    new: str
    test: str  # a key of TESTS


def uncaught(name: str, fault: str, what: str, file: str, caught: str, after: str, test: str) -> Mutation:
    """`except CAUGHT as exc:AFTER` made to catch nothing (`except ()`): the handler below it is gone."""
    return Mutation(name, fault, what, file, f"except {caught} as exc:{after}", f"except () as exc:{after}", test)


RETRAIN_NOTE = "\n                damage.append(str(exc))"
STORE_NOTE = "\n                    damage.append(f\"trial {number}'s copy in the artifact store"
CHOSEN_NOTE = "\n            self.session.emit(\"recovered\", note=f\"{exc}; re-training the chosen proposal"
LOAD_TORCH = "  # torch raises many types for truncated or corrupt files"
EXIT_4 = "    exit_code = 4  # docs/reliability.md: exit codes (resumable)\n"
EVALUATE, WEIGHTS, FILEIO = "mnv3_search/netadapt/evaluate.py", "mnv3_search/model/weights.py", "mnv3_search/fileio.py"
ARTIFACTS, ERRORS = "mnv3_search/netadapt/artifacts.py", "mnv3_search/errors.py"

MUTATIONS = [
    uncaught("state-local", "damaged trial state", "run folder's CheckpointError not caught", EVALUATE,
             "CheckpointError", RETRAIN_NOTE, "state"),
    uncaught("state-store", "damaged trial state", "store copy's CheckpointError not caught", EVALUATE,
             "CheckpointError", STORE_NOTE, "state"),
    uncaught("state-load", "damaged trial state", "load_torch: torch errors not CheckpointError", WEIGHTS,
             "Exception", LOAD_TORCH, "state"),
    uncaught("chosen-retrain", "damaged chosen checkpoint", "_trial_checkpoint: no re-training",
             "mnv3_search/netadapt/iterative.py", "CheckpointError", CHOSEN_NOTE, "chosen"),
    uncaught("chosen-load", "damaged chosen checkpoint", "load_torch: torch errors not CheckpointError", WEIGHTS,
             "Exception", LOAD_TORCH, "chosen"),
    *[Mutation(f"{key}-map", f"ENOSPC, {key[7:]} checkpoint", "atomic_path: ENOSPC not DiskFull(file)", FILEIO,
               "        full = disk_full(exc, target)\n", "        full = None\n", key)
      for key in ("enospc-seed", "enospc-proposal", "enospc-final")],
    Mutation("enospc-tmp", "ENOSPC, seed checkpoint", "atomic_path: temp file left", FILEIO,
             "        if tmp is not None and tmp.exists():\n            tmp.unlink()\n", "        pass\n",
             "enospc-seed"),
    Mutation("enospc-requeue", "ENOSPC, proposal checkpoint", "failed trial not enqueued again", EVALUATE,
             "            if isinstance(exc, RunInterrupted) or disk_full(exc) is not None:",
             "            if False:", "enospc-proposal"),
    Mutation("enospc-exit", "ENOSPC, seed checkpoint", "RunInterrupted exits 2, not 4", ERRORS, EXIT_4, "",
             "enospc-seed"),
    Mutation("store-down-map", "S3 store stops answering", "BotoCoreError not StoreFailed", ARTIFACTS,
             "errors += [BotoCoreError, ClientError]", "errors += [ClientError]", "store-down"),
    Mutation("store-500-map", "S3 store answers 500", "ClientError not StoreFailed", ARTIFACTS,
             "errors += [BotoCoreError, ClientError]", "errors += [BotoCoreError]", "store-500"),
    Mutation("store-500-exit", "S3 store answers 500", "RunInterrupted exits 2, not 4", ERRORS, EXIT_4, "",
             "store-500"),
    uncaught("store-500-cli", "S3 store answers 500", "CLI: UserError not one line", "mnv3_search/cli/main.py",
             "UserError", "\n            click.ClickException", "store-500"),
]


@dataclass
class Outcome:
    passed: bool
    seconds: float
    why: str  # pytest's first FAILED/ERROR line, or its last line


def copy_repo(into: Path) -> Path:
    root = into / "repo"
    shutil.copytree(REPO, root, symlinks=True, ignore=IGNORED)
    found = subprocess.run([sys.executable, "-c", "import mnv3_search; print(mnv3_search.__file__)"], cwd=root,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"the copy imports mnv3_search from {found}, not from {root}: the check would test nothing")
    return root


def apply(root: Path, mutation: Mutation) -> None:
    """The one replacement, refused loudly when `old` is not in the file exactly once or the result won't compile."""
    path = root / mutation.file
    text = path.read_text()
    if text.count(mutation.old) != 1:
        raise SystemExit(f"{mutation.name}: {mutation.file} holds {mutation.old!r} {text.count(mutation.old)} times, "
                         f"not once: the handler moved or changed; update this script's MUTATIONS")
    text = text.replace(mutation.old, mutation.new)
    compile(text, str(path), "exec")
    path.write_text(text)


def run_test(root: Path, node: str) -> Outcome:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", node], cwd=root,
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "1000"})  # summary uncut
    lines = done.stdout.splitlines()
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    why = (failed or lines[-1:] or done.stderr.splitlines()[-1:] or [""])[0]
    return Outcome(done.returncode == 0, time.monotonic() - start, why.replace(node, "").strip(" -")[:150])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests-dir", default="tests/netadapt",
                        help="the folder holding test_faults.py (default: tests/netadapt)")
    parser.add_argument("--only", help="comma-separated mutation names (default: all)")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only.split(",")]
    unknown = set(args.only.split(",") if args.only else []) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"--only: no mutation named {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="fault-check-") as folder:
        for mutation in chosen:  # every replacement checked on a pristine copy before anything runs
            apply(copy_repo(Path(folder) / mutation.name), mutation)
        pristine = copy_repo(Path(folder) / "unmodified")
        nodes = {key: f"{args.tests_dir}/{TESTS[key]}" for key in dict.fromkeys(m.test for m in chosen)}
        clean: dict[str, Outcome] = {}
        for key, node in nodes.items():
            clean[key] = run_test(pristine, node)
            print(f"unmodified {key}: {'pass' if clean[key].passed else 'FAIL'} in {clean[key].seconds:.0f} s "
                  f"{'' if clean[key].passed else clean[key].why}", flush=True)
        rows: list[tuple[Mutation, Outcome]] = []
        for mutation in chosen:
            mutated = run_test(Path(folder) / mutation.name / "repo", nodes[mutation.test])
            rows.append((mutation, mutated))
            print(f"{mutation.name}: {'pass (NOT caught)' if mutated.passed else 'fail'} in {mutated.seconds:.0f} s",
                  flush=True)
    head = ("fault", "mutation", "test node", "unmutated", "mutated", "seconds")
    table = [head] + [(m.fault, m.what, TESTS[m.test].split("::")[1], "pass" if clean[m.test].passed else "FAIL",
                       "PASS" if o.passed else "fail", f"{o.seconds:.0f}") for m, o in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    print()
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if i:  # why the mutated run failed: the handler's absence, not something else
            print(f"    {rows[i - 1][1].why}")
    missed = [m.name for m, o in rows if o.passed]
    broken = [key for key, o in clean.items() if not o.passed]
    print(f"\nmutated tests that still pass: {missed or 'none'}; unmodified tests that fail: {broken or 'none'}")
    return 1 if missed or broken else 0


if __name__ == "__main__":
    sys.exit(main())
