"""Damaged run files are refused in one line naming the file and what to do (exit 2), never a traceback and
never a silently wrong result.

Every case spoils one file of a copy of the session's real tiny run (tests/support/tiny_run.py) and runs the CLI on
it: `report`, `netadapt --resume`, `lut show` / `netadapt --lut`. Why each matters: pandas reads a truncated
last CSV row as a row of blanks, torch raises zip errors from a cut checkpoint, and Optuna skips a cut-off
last journal line without a word and then glues its next record onto it, after which the journal cannot be
replayed at all.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from mnv3_search.cli import cli
from mnv3_search.latency import InterleavedPolicy, LatencyTable, OnnxRuntimeBackend
from mnv3_search.netadapt.study import make_storage
from mnv3_search.prune.variants import calibration_companions

DO = "the run cannot go on from it: restore the file from a copy, or start the run again in another folder (--out)"
LUT_DO = "it was left untouched: fix or move it, or give another --lut path"
FAST = InterleavedPolicy(passes=2, runs_per_pass=1, warmup_runs=1, min_passes=1)
TINY_ARGS = ["--limit", "240", "--batch-size", "32", "--short-steps", "8", "--seed-epochs", "2", "--long-epochs", "1",
             "--resolution", "64", "--threads", "1", "--quiet"]


def copy_run(tiny_run: Path, tmp_path: Path, finished: bool = True) -> Path:
    """The session's tiny run copied under its own name (the study is named after the folder), its storage
    pointed at the copy's journal so nothing touches the shared run; `finished=False` drops run.json's result,
    so `--resume` goes on reading iterations.csv, the checkpoints and the study."""
    source = tiny_run
    copy = tmp_path / source.name
    shutil.copytree(source, copy)
    run = json.loads((copy / "run.json").read_text())
    run["storage"] = str((copy / "study.journal").resolve())
    if not finished:
        del run["result"]
    (copy / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    return copy


def one_error(args: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one `Error:` line and no traceback. Returns that line."""
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def cut_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def cut_last_row(path: Path) -> None:
    """Cut the last row of a CSV in the middle, as a full disk would."""
    text = path.read_text()
    start = text.rstrip("\n").rfind("\n") + 1
    path.write_text(text[: start + (len(text) - start) // 2])


def set_cell(path: Path, line: int, column: str, value: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    header = lines[0].rstrip("\n").split(",")
    cells = lines[line - 1].rstrip("\n").split(",")
    cells[header.index(column)] = value
    lines[line - 1] = ",".join(cells) + "\n"
    path.write_text("".join(lines))


def resume(copy: Path) -> list[str]:
    """The run's own command again (tests/support/tiny_run.py's settings), which resumes it."""
    return ["netadapt", "small", "--budget", "5.3M-macs", "--out", str(copy), *TINY_ARGS]


def report(copy: Path) -> list[str]:
    return ["report", str(copy), "--out", str(copy.parent / "plots")]


# (file, how it is spoiled, finished run?, command, what the line says after "<file>: ")
CASES: dict[str, tuple[str, Callable[[Path], None], bool, Callable[[Path], list[str]], str]] = {
    "run.json truncated, resume": ("run.json", cut_half, True, resume, "truncated run file (it stops mid-way)"),
    "run.json truncated, report": ("run.json", cut_half, True, report, "truncated run file (it stops mid-way)"),
    "run.json not a run file": ("run.json", lambda p: p.write_text('["config"]\n'), True, resume,
                                'not a NetAdapt run file (no "config" object)'),
    "run.json garbage": ("run.json", lambda p: p.write_bytes(b"\x89PNG\x00\xff"), True, report,
                         "damaged run file (not UTF-8 text)"),
    "iterations.csv last row truncated, resume": ("iterations.csv", cut_last_row, False, resume,
                                                  "truncated table (its last line, line 4, stops mid-way)"),
    "iterations.csv last row truncated, report": ("iterations.csv", cut_last_row, True, report,
                                                  "truncated table (its last line, line 4, stops mid-way)"),
    "iterations.csv garbage": ("iterations.csv", lambda p: p.write_text("<html>502 Bad Gateway</html>\n"), False,
                               resume, "not this run's table (its header is not iteration,proposal,group,...)"),
    "iterations.csv row cut at a comma": (
        "iterations.csv", lambda p: p.write_text(p.read_text().rstrip("\n").rsplit(",", 5)[0] + "\n"), False, resume,
        "damaged table (line 4 has 19 fields, not 24)"),
    "iterations.csv not a number": ("iterations.csv", lambda p: set_cell(p, 3, "macs", "5.3e6x"), False, resume,
                                    "damaged table (line 3: macs is '5.3e6x', not a number)"),
    "proposals.csv last row truncated": ("proposals.csv", cut_last_row, True, report,
                                         "truncated table (its last line, line 37, stops mid-way)"),
    "seed.pt truncated": ("seed.pt", cut_half, True, report, "truncated or damaged checkpoint ("),
    "iterations/002.pt truncated": ("iterations/002.pt", cut_half, False, resume, "truncated or damaged checkpoint ("),
    "iterations/002.pt missing": ("iterations/002.pt", lambda p: p.unlink(), False, resume,
                                  "missing checkpoint of this run"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_run_file_is_one_line_naming_it(tiny_run: Path, case: str, tmp_path: Path) -> None:
    name, spoil, finished, command, what = CASES[case]
    copy = copy_run(tiny_run, tmp_path, finished)
    target = copy / name
    spoil(target)
    before = target.read_bytes() if target.exists() else None
    line = one_error(command(copy))
    expected = f"Error: {target}: {what}"
    if what.endswith("("):  # torch's own reason follows, then what to do
        assert line.startswith(expected) and line.endswith(f"); {DO}"), line
    else:
        assert line == f"{expected}; {DO}"
    assert (target.read_bytes() if target.exists() else None) == before  # left as it was, for the user to see


def test_a_truncated_journal_line_is_refused_and_the_advice_repairs_it(tiny_run: Path, tmp_path: Path) -> None:
    """The real command in a real process: one error line on stderr; cutting the journal as it says makes the
    study load again with every complete record (a trial finished before the cut-off line is still there)."""
    copy = copy_run(tiny_run, tmp_path, finished=False)
    journal = copy / "study.journal"
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code": 5, "worker_id": "x", "trial_id": 3, "sta')
    done = subprocess.run([sys.executable, "-m", "mnv3_search", *resume(copy)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("Error: ")] == [
        f"Error: {journal}: the Optuna journal's last line is truncated or damaged (a write was cut off); keep the "
        f"lines before it with `truncate -s {len(whole)} {journal}` and run again (the cut-off step is redone)"]
    assert done.stderr.splitlines()[-1].startswith("Error: ")  # after the run's header line, nothing else
    subprocess.run(["truncate", "-s", str(len(whole)), str(journal)], check=True)
    assert journal.read_bytes() == whole
    make_storage(str(journal))  # replays without complaint


def test_a_garbage_last_journal_line_and_a_damaged_middle_line(tiny_run: Path, tmp_path: Path) -> None:
    copy = copy_run(tiny_run, tmp_path, finished=False)
    journal = copy / "study.journal"
    whole = journal.read_bytes()
    journal.write_bytes(whole + b"\x00\x00\x00\x00\n")  # a complete line that is not a record: Optuna skips it
    line = one_error(resume(copy))
    assert line.startswith(f"Error: {journal}: the Optuna journal's last line is truncated or damaged")
    assert f"`truncate -s {len(whole)} {journal}`" in line
    lines = whole.splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:5] + [b"{not json\n"] + lines[5:]))
    line = one_error(resume(copy))
    assert line.startswith(f"Error: {journal}: damaged Optuna journal (") and line.endswith(
        "); it cannot be replayed: restore it from a copy, or start the run again in another folder (--out)")


@pytest.fixture(scope="module")
def lut_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real calibrated table for Small at 32 px (as the run folder's lut.json), built once."""
    from mnv3_search import load_spec

    path = tmp_path_factory.mktemp("lut") / "lut.json"
    seed = replace(load_spec("small"), resolution=32)
    LatencyTable.open(path, OnnxRuntimeBackend(), 1, FAST).calibrate(seed, calibration_companions(seed, 1))
    return path


@pytest.mark.parametrize("spoil, what", [
    (cut_half, "is truncated (it stops mid-way), not a latency table"),
    (lambda p: p.write_text(json.dumps({"schema": "something-else", "entries": {}})),
     'is not a latency table (no "schema": "mnv3-search/latency-table")'),
    (lambda p: p.write_text(p.read_text().replace('"passes": 2', '"passes": "2"')),
     "has a malformed header (protocol passes is '2', not a positive integer)"),
])
@pytest.mark.parametrize("command", ["lut show", "netadapt --lut"])
def test_a_damaged_lut_json_is_one_line(tiny_run: Path, lut_file: Path, tmp_path: Path, spoil: Callable[[Path], None],
                                        what: str, command: str) -> None:
    copy = copy_run(tiny_run, tmp_path)
    target = copy / "lut.json"
    shutil.copy(lut_file, target)
    spoil(target)
    before = target.read_bytes()
    args = ["lut", "show", str(target)] if command == "lut show" else \
        ["netadapt", "small", "--budget", "90%", "--out", str(tmp_path / "new"), "--lut", str(target), *TINY_ARGS]
    assert one_error(args) == f"Error: {target}: {what}; {LUT_DO}"
    assert target.read_bytes() == before


def test_a_moved_run_resumes_on_its_own_journal_and_sweeps_cut_writes(tiny_run: Path, tmp_path: Path) -> None:
    """A run folder copied under another name still names the original's journal and study in run.json;
    resuming it must use its own journal and keep its study (not start an empty one named after the new
    folder), and delete the temporary files of atomic writes a kill cut short."""
    import optuna

    source = tiny_run
    moved = tmp_path / "renamed-run"
    shutil.copytree(source, moved)
    run = json.loads((moved / "run.json").read_text())
    assert run["storage"] == str((source / "study.journal").resolve())  # as a moved folder has it
    del run["result"]
    (moved / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    (moved / "final.yaml").unlink()
    leftovers = [moved / ".final.yaml.k1ll3d.tmp", moved / "iterations" / ".009.pt.k1ll3d.tmp",
                 moved / "trials" / ".00018.state.pt.k1ll3d.tmp"]
    (moved / "trials").mkdir(exist_ok=True)
    for path in leftovers:
        path.write_text("")
    original_journal = (source / "study.journal").read_bytes()
    result = CliRunner().invoke(cli, ["netadapt", "--resume", str(moved), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (source / "study.journal").read_bytes() == original_journal
    assert not any(path.exists() for path in leftovers)
    assert (moved / "final.yaml").is_file()
    studies = optuna.get_all_study_summaries(make_storage(str((moved / "study.journal").resolve())))
    assert [s.study_name for s in studies] == [run["study"]] and run["study"] == source.name
