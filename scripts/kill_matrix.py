"""Kill matrix: SIGKILL a real tiny NetAdapt run at points spread over a whole run, then run it again.

Why: the README promises that running the same command again after any kill resumes the run and ends with
the network an uninterrupted run gives, evaluating no proposal twice to completion. One test
(tests/netadapt/test_netadapt.py) proves it for one point; this script checks it at every phase of a run.

For each point the same command (`python -m mnv3_search netadapt ...`, tiny settings on digits) is started as
a real subprocess in its own process group; the script polls the run folder and, when the files say the run
has reached the point, SIGKILLs the whole group. The one point inside a proposal's evaluation uses the
library's existing test hook (MNV3_SEARCH_TEST_KILL_GROUP: the process evaluating that group's proposal dies
with os._exit, as under the OOM killer). Then the same command runs again to completion and is compared with
an uninterrupted reference run: final spec, final weights, and from the study how many proposal rungs were
evaluated twice to completion.

Three commands: A (a MACs budget: exact counts, so the result must be bit-identical to the reference) carries
the points from seed training to the final export, and the artifact store's upload and download (the default
store, artifacts/ in the run folder; two more test hooks: MNV3_SEARCH_TEST_KILL_AFTER_UPLOAD dies between a
trial's upload and its pointers, MNV3_SEARCH_TEST_KILL_IN_DOWNLOAD inside a download); B (a latency budget with
its own table in the run folder, `--lut RUN/lut.json`) carries the latency-table build and calibration; K is B
with `--method knapsack`, whose rounds are each timed beside the seed. B's and K's final networks depend on
timing (each run measures its own table), so their "identical" column says whether timing happened to agree;
a control (the command run twice, no kill) shows how much. K's runs start from a copy of its reference run's
table (built once, ~3 min on 2 shared cores), so its points cost the rounds, not the table build.

Usage: PYTHONPATH=. python scripts/kill_matrix.py [--work results/kill-matrix] [--csv results/kill-matrix.csv]
       [--only NAME,NAME]
Prints the table and writes it as CSV. Takes ~15-25 minutes on 2 shared cores.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mnv3_search.netadapt.artifacts import KILL_AFTER_UPLOAD_ENV, KILL_IN_DOWNLOAD_ENV  # noqa: E402
from mnv3_search.netadapt.evaluate import KILL_EXIT_CODE, KILL_GROUP_ENV  # noqa: E402

HOOKS = (KILL_GROUP_ENV, KILL_AFTER_UPLOAD_ENV, KILL_IN_DOWNLOAD_ENV)

TINY = ["--data", "digits", "--limit", "240", "--batch-size", "32", "--short-steps", "8", "--seed-epochs", "2",
        "--long-epochs", "3", "--resolution", "64", "--threads", "1", "--quiet"]
BUDGET_A = "5.3M-macs"  # 2 iterations from Small's 5.50M MACs at 64 px
BUDGET_B = "96%"  # 2 iterations of the netadapt schedule (2.5 % of the seed each)
POLL_SECONDS = 0.002  # fast: some windows (checkpoint written, CSV row not yet) last tens of milliseconds
TIMEOUT_SECONDS = 900


def command(out: Path, kind: str) -> list[str]:
    budget = BUDGET_A if kind == "A" else BUDGET_B
    extra = [] if kind == "A" else ["--lut", str(out / "lut.json")]
    extra += ["--method", "knapsack"] if kind == "K" else []
    return [sys.executable, "-m", "mnv3_search", "netadapt", "small", "--budget", budget, "--out", str(out),
            *TINY, *extra]


def environment(work: Path, hooks: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in HOOKS}
    env["MNV3_SEARCH_LUT_DIR"] = str(work / "lut-dir")  # never the user's own table
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(hooks or {})
    return env


# --- reading a run folder (cheap, so it can be polled every few milliseconds) ---------------------------------

def csv_rows(path: Path) -> int:
    """Data rows of a CSV written atomically (0 when absent)."""
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except OSError:
        return 0


def trial_checkpoints(folder: Path) -> int:
    """Finished rung trials of the current iteration (trials/NNNNN.pt, removed once the iteration is done)."""
    try:
        return sum(1 for p in (folder / "trials").iterdir() if p.name.endswith(".pt") and not
                   p.name.endswith(".state.pt") and not p.name.startswith("."))
    except OSError:
        return 0


def tmp_files(folder: Path, name: str) -> bool:
    """An atomic write of `name` in progress (its temporary file beside it)."""
    try:
        return any(p.name.startswith(f".{name}.") and p.name.endswith(".tmp") for p in folder.iterdir())
    except OSError:
        return False


def stored_objects(folder: Path) -> int:
    """Objects in the run's default artifact store (artifacts/)."""
    try:
        return sum(1 for _ in (folder / "artifacts").iterdir())
    except OSError:
        return 0


def run_result(folder: Path) -> bool:
    try:
        return "result" in json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        return False


def lut_state(folder: Path) -> tuple[int, int]:
    """(entries, calibrations) of the run's table, (-1, -1) while it does not exist."""
    try:
        data = json.loads((folder / "lut.json").read_text())
    except (OSError, ValueError):
        return -1, -1
    return len(data.get("entries", {})), len(data.get("calibrations", {}))


def snapshot(folder: Path) -> str:
    """What the run folder held right after the kill: the evidence of where it landed."""
    parts = []
    for name in ("seed.pt", "final.yaml", "final.pt", "final.onnx"):
        parts.append(f"{name}={'yes' if (folder / name).exists() else 'no'}")
    iterations = sorted(p.name for p in (folder / "iterations").glob("[0-9]*.pt")) if (folder / "iterations").exists() \
        else []
    parts.append(f"iterations/={'+'.join(iterations) or '-'}")
    parts.append(f"iterations.csv rows={csv_rows(folder / 'iterations.csv')}")
    parts.append(f"trials/*.pt={trial_checkpoints(folder)}")
    if (folder / "artifacts").exists():
        parts.append(f"artifacts/={stored_objects(folder)}")
    leftovers = [p.name for p in folder.rglob(".*.tmp")]
    if leftovers:
        parts.append(f"tmp={'+'.join(sorted(leftovers))}")
    parts.append(f"run.json result={'yes' if run_result(folder) else 'no'}")
    if (folder / "lut.json").exists():
        entries, cals = lut_state(folder)
        parts.append(f"lut.json entries={entries} calibrations={cals}")
    elif (folder / "study.journal").exists() and not (folder / "seed.pt").exists():
        parts.append("study.journal=yes")
    return "; ".join(parts)


# --- the study -----------------------------------------------------------------------------------------------

@dataclass
class StudyCounts:
    complete: int = 0
    failed: int = 0
    twice: int = 0  # (iteration, group, rung) evaluated to completion more than once
    steps: int = 0


def study_counts(folder: Path) -> StudyCounts:
    import optuna

    from mnv3_search.netadapt.study import make_storage

    journal = folder / "study.journal"
    if not journal.exists():
        return StudyCounts()
    study = optuna.load_study(study_name=folder.resolve().name, storage=make_storage(str(journal.resolve())))
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    keys = collections.Counter((t.user_attrs.get("iteration"), t.params.get("group"), t.user_attrs.get("rung"))
                               for t in complete)
    return StudyCounts(len(complete), sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
                       sum(n - 1 for n in keys.values()), sum(int(t.user_attrs.get("steps", 0)) for t in complete))


def same_final(folder: Path, reference: Path) -> tuple[str, str]:
    """(spec identical, weights identical) as yes/no."""
    import torch

    from mnv3_search.model.weights import read_checkpoint
    from mnv3_search.spec.yaml_io import load_spec

    if not (folder / "final.yaml").exists():
        return "no (no final.yaml)", "no"
    spec = "yes" if load_spec(folder / "final.yaml") == load_spec(reference / "final.yaml") else "no"
    mine, theirs = read_checkpoint(folder / "final.pt")[1], read_checkpoint(reference / "final.pt")[1]
    weights = "yes" if mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine) else "no"
    return spec, weights


# --- kill points ---------------------------------------------------------------------------------------------

@dataclass
class Reference:
    folder: Path
    rows: int  # iterations.csv rows at the end (seed + iterations)
    proposals: dict[int, list[str]]  # iteration -> its proposal groups
    counts: StudyCounts
    seconds: float


Trigger = Callable[[Path, Reference], bool]


@dataclass
class Point:
    name: str
    kind: str  # "A" or "B"
    intended: str
    trigger: Optional[Trigger] = None  # poll until True, then (after `delay`) SIGKILL the process group
    delay: float = 0.0
    hook: Optional[Callable[[Reference], dict[str, str]]] = None  # test hooks' environment instead of polling
    poll: float = POLL_SECONDS
    stateful: Optional[Callable[[], Trigger]] = None  # a fresh trigger per run, for triggers that keep state
    kill: bool = True  # False: a control, the command run once uninterrupted
    # after the kill, change the folder and run the command once more with these hooks (it must die in them)
    then: Optional[Callable[[Path], str]] = None
    then_hook: Optional[dict[str, str]] = None


def _it2_rung0_mid() -> Trigger:
    """Iteration 1's trial checkpoints are removed once its row is written; half of iteration 2's first rung
    is then as many new ones (counting before the removal would land between the row and the cleanup)."""
    cleaned = False

    def trigger(f: Path, r: Reference) -> bool:
        nonlocal cleaned
        if csv_rows(f / "iterations.csv") != 2:
            return False
        cleaned = cleaned or trial_checkpoints(f) == 0
        return cleaned and trial_checkpoints(f) >= len(r.proposals[2]) // 2

    return trigger


def _it2_parent_upload() -> Trigger:
    """Iteration 2's parent (iterations/001.pt) on its way into the store: after iteration 1's row and the
    clean-up of its trials' objects, the first object the store gains."""
    fewest: Optional[int] = None

    def trigger(f: Path, r: Reference) -> bool:
        nonlocal fewest
        if csv_rows(f / "iterations.csv") != 2 or trial_checkpoints(f) != 0:
            return False
        now = stored_objects(f)
        fewest = now if fewest is None else min(fewest, now)
        return now > fewest

    return trigger


def _middle_group(ref: Reference) -> dict[str, str]:
    groups = sorted(ref.proposals[1])  # rung 0 is enqueued in this order and claimed oldest first
    return {KILL_GROUP_ENV: groups[len(groups) // 2]}


def _lose_local_trials(folder: Path) -> str:
    """The run folder's copies of the finished trials gone (as on a worker without the folder): the next
    rung downloads them from the store."""
    gone = [p for p in (folder / "trials").glob("*.pt") if not p.name.startswith(".")]
    for path in gone:
        path.unlink()
    return f"removed {len(gone)} trials/*.pt so the next rung downloads them"


def _it1_rung1(f: Path, r: Reference) -> bool:
    return csv_rows(f / "iterations.csv") == 1 and trial_checkpoints(f) >= len(r.proposals[1]) + 1


def _round(n: int) -> Trigger:
    """Knapsack round n's checkpoint written (its row may not be yet)."""
    return lambda f, r: (f / "iterations" / f"{n:03d}.pt").exists()


POINTS = [
    Point("seed-training", "A", "training the seed (no seed.pt yet)",
          lambda f, r: (f / "study.journal").exists() and not (f / "seed.pt").exists(), delay=1.0),
    Point("seed-write", "A", "while seed.pt is being written (its temporary file exists)",
          lambda f, r: tmp_files(f, "seed.pt")),
    Point("it1-rung0-mid", "A", "iteration 1, first rung half done: inside a proposal's evaluation (test hook)",
          hook=_middle_group),
    Point("it1-rung1-mid", "A", "iteration 1, second rung: one of its trials finished", _it1_rung1),
    Point("it1-checkpoint-write", "A", "iterations/001.pt being written (temporary file), no CSV row yet",
          lambda f, r: tmp_files(f / "iterations", "001.pt")),
    Point("it1-checkpoint-before-row", "A", "iterations/001.pt written, its iterations.csv row not yet",
          lambda f, r: (f / "iterations" / "001.pt").exists() and csv_rows(f / "iterations.csv") == 1),
    Point("it1-row-before-cleanup", "A", "iteration 1's CSV row written, its trial checkpoints not removed yet",
          lambda f, r: csv_rows(f / "iterations.csv") == 2 and trial_checkpoints(f) > len(r.proposals[2])),
    Point("it2-rung0-mid", "A", "iteration 2, first rung half done", trigger=None, stateful=lambda: _it2_rung0_mid()),
    Point("long-fine-tune", "A", "the long fine-tune (last row written, trials cleaned, no final.yaml)",
          lambda f, r: csv_rows(f / "iterations.csv") == r.rows and trial_checkpoints(f) == 0
          and (f / "iterations" / f"{r.rows - 1:03d}.pt").exists() and not (f / "final.yaml").exists()
          and not tmp_files(f / "iterations", f"{r.rows - 1:03d}.pt"), delay=1.0),
    Point("final-export", "A", "final.yaml written, final.onnx not yet (checkpoint/ONNX export)",
          lambda f, r: (f / "final.yaml").exists() and not (f / "final.onnx").exists()),
    Point("before-result", "A", "final.onnx written, run.json's result not yet",
          lambda f, r: (f / "final.onnx").exists() and not run_result(f)),
    Point("store-upload-trial", "A", "between the first trial's upload into the store and its pointers (test hook)",
          hook=lambda r: {KILL_AFTER_UPLOAD_ENV: "1"}),
    Point("store-upload-parent", "A", "iteration 2's parent being uploaded into the store (a new object appears)",
          trigger=None, stateful=lambda: _it2_parent_upload()),
    Point("store-download", "A", "iteration 1's second rung, then (its trials' run-folder copies removed) inside "
          "the first download of a trial's files from the store (test hook)", _it1_rung1, then=_lose_local_trials,
          then_hook={KILL_IN_DOWNLOAD_ENV: "1"}),
    Point("control-B", "B", "no kill: a second uninterrupted run of command B (how much timing alone moves B)",
          kill=False),
    Point("lut-build", "B", "building the run's latency table (lut.json not saved yet)",
          lambda f, r: (f / "run.json").exists() and not (f / "lut.json").exists(), delay=3.0, poll=0.05),
    Point("lut-calibration", "B", "calibrating: lut.json holds entries but no calibration yet",
          lambda f, r: (f / "lut.json").exists() and lut_state(f)[0] > 0 and lut_state(f)[1] == 0, poll=0.05),
    Point("control-K", "K", "no kill: a second uninterrupted run of command K (knapsack)", kill=False),
    # the table is calibrated from the start (a copy of the reference's): the seed saved marks the scoring
    Point("knapsack-scoring", "K", "the seed trained, scoring channels or pricing widths (no round yet)",
          lambda f, r: (f / "seed.pt").exists() and not (f / "iterations").exists(), poll=0.05),
    Point("knapsack-round-1", "K", "round 1's shape saved (iterations/001.pt), timed beside the seed next", _round(1)),
    Point("knapsack-round-2", "K", "round 2's shape saved (iterations/002.pt)", _round(2)),
    Point("knapsack-final", "K", "final.yaml written, final.onnx not yet",
          lambda f, r: (f / "final.yaml").exists() and not (f / "final.onnx").exists()),
]


@dataclass
class Row:
    point: str
    command: str
    intended: str
    killed_at: str
    kill_seconds: float
    killed_exit: str
    rerun_exit: int
    rerun_seconds: float
    spec_identical: str
    weights_identical: str
    evaluated_twice: int
    trials_complete: str
    failed_trials: int
    notes: str


def run_reference(work: Path, kind: str) -> Reference:
    folder = work / f"reference-{kind}"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.monotonic()
    done = subprocess.run(command(folder, kind), env=environment(work), capture_output=True, text=True,
                          timeout=TIMEOUT_SECONDS)
    if done.returncode != 0:
        raise SystemExit(f"reference run {kind} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    proposals: dict[int, list[str]] = collections.defaultdict(list)
    if (folder / "proposals.csv").exists():  # the knapsack (command K) has no proposals
        with open(folder / "proposals.csv") as handle:
            for row in csv.DictReader(handle):
                proposals[int(row["iteration"])].append(row["group"])
    return Reference(folder, csv_rows(folder / "iterations.csv"), dict(proposals), study_counts(folder),
                     time.monotonic() - start)


def kill_and_rerun(work: Path, point: Point, ref: Reference) -> Row:
    folder = work / point.name
    shutil.rmtree(folder, ignore_errors=True)
    cmd = command(folder, point.kind)
    if point.kind == "K":  # the reference's table: the rounds are what is killed, not the table build
        folder.mkdir(parents=True)
        shutil.copy(ref.folder / "lut.json", folder / "lut.json")
    hook = point.hook(ref) if point.hook else None
    log = open(work / f"{point.name}.killed.log", "w")
    named = " ".join(f"{k.removeprefix('MNV3_SEARCH_TEST_')}={v}" for k, v in (hook or {}).items())
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=environment(work, hook), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True) if point.kill else None
    killed_exit = ""
    if proc is None:  # a control: the command runs once, below
        killed_exit, evidence = "-", "not killed (control)"
    elif hook:
        proc.wait(timeout=TIMEOUT_SECONDS)
        killed_exit = f"{proc.returncode} (hook {named})"
        if proc.returncode != KILL_EXIT_CODE:
            killed_exit += " MISSED"
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # any child left behind
        except ProcessLookupError:
            pass
        evidence = f"hook {named} killed it; complete trials {study_counts(folder).complete}; " + snapshot(folder)
    else:
        trigger = point.stateful() if point.stateful else point.trigger
        assert trigger is not None
        landed = False
        while time.monotonic() - start < TIMEOUT_SECONDS:
            if trigger(folder, ref):
                landed = True
                break
            if proc.poll() is not None:
                break
            time.sleep(point.poll)
        if landed and point.delay:
            time.sleep(point.delay)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        killed_exit = str(proc.returncode) + ("" if landed else " (trigger never seen: MISSED)")
        evidence = snapshot(folder)
        if (folder / "study.journal").exists():
            evidence += f"; complete trials {study_counts(folder).complete}"
    if point.then is not None and point.then_hook is not None:  # a second kill, in another place, by a hook
        evidence += f"; then {point.then(folder)}"
        proc = subprocess.Popen(cmd, env=environment(work, point.then_hook), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        proc.wait(timeout=TIMEOUT_SECONDS)
        killed_exit += f"; then {proc.returncode} (hook " + " ".join(point.then_hook) + ")"
        if proc.returncode != KILL_EXIT_CODE:
            killed_exit += " MISSED"
        evidence += "; after the hook: " + snapshot(folder)
    kill_seconds = time.monotonic() - start
    log.close()

    start = time.monotonic()
    done = subprocess.run(cmd, env=environment(work), capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    rerun_seconds = time.monotonic() - start
    (work / f"{point.name}.rerun.log").write_text(done.stdout + done.stderr)
    counts = study_counts(folder)
    spec, weights = same_final(folder, ref.folder) if done.returncode == 0 else ("no (rerun failed)", "no")
    notes = []
    leftovers = sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp"))
    if leftovers:
        notes.append(f"temporary files left: {' '.join(leftovers)}")
    if trial_checkpoints(folder):
        notes.append(f"{trial_checkpoints(folder)} trial checkpoints left in trials/")
    if csv_rows(folder / "proposals.csv") != csv_rows(ref.folder / "proposals.csv"):
        notes.append(f"proposals.csv rows {csv_rows(folder / 'proposals.csv')} vs reference "
                     f"{csv_rows(ref.folder / 'proposals.csv')}")
    if counts.steps != ref.counts.steps:
        notes.append(f"steps {counts.steps} vs reference {ref.counts.steps}")
    if done.returncode != 0:
        notes.append(done.stderr.strip().splitlines()[-1][:200] if done.stderr.strip() else "no stderr")
    if point.kind != "A":
        notes.append("latency budget: each run measures its own table, so the final network may differ by timing")
    return Row(point.name, point.kind, point.intended, evidence, round(kill_seconds, 1), killed_exit,
               done.returncode, round(rerun_seconds, 1), spec, weights, counts.twice,
               f"{counts.complete} (reference {ref.counts.complete})", counts.failed, "; ".join(notes))


def print_table(rows: list[Row]) -> None:
    header = ["point", "cmd", "killed at (evidence)", "killed rc", "rerun rc", "spec =", "weights =", "twice",
              "complete trials", "notes"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(x) for x in (r.point, r.command, r.killed_at, r.killed_exit, r.rerun_exit,
                                                  r.spec_identical, r.weights_identical, r.evaluated_twice,
                                                  r.trials_complete, r.notes or "")) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "results" / "kill-matrix")
    parser.add_argument("--csv", type=Path, default=REPO / "results" / "kill-matrix.csv")
    parser.add_argument("--only", default="", help="comma-separated point names (default: all)")
    args = parser.parse_args()
    by_name = {p.name: p for p in POINTS}
    wanted = [by_name[name] for name in args.only.split(",")] if args.only else POINTS  # in the order given
    args.work.mkdir(parents=True, exist_ok=True)
    references: dict[str, Reference] = {}
    rows: list[Row] = []
    for kind in dict.fromkeys(p.kind for p in wanted):
        references[kind] = run_reference(args.work, kind)
        print(f"reference {kind}: {references[kind].rows - 1} iterations, {references[kind].counts.complete} "
              f"complete trials, {references[kind].seconds:.0f} s", flush=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    for point in wanted:
        row = kill_and_rerun(args.work, point, references[point.kind])
        rows.append(row)
        print(f"{row.point}: killed {row.killed_exit} at [{row.killed_at}] -> rerun {row.rerun_exit}, spec "
              f"{row.spec_identical}, weights {row.weights_identical}, twice {row.evaluated_twice}", flush=True)
        with open(args.csv, "w", newline="") as handle:  # after every point: a long matrix cut short keeps its rows
            writer = csv.DictWriter(handle, fieldnames=list(Row.__dataclass_fields__))
            writer.writeheader()
            for r in rows:
                writer.writerow(r.__dict__)
    print_table(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
