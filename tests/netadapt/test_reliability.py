"""Reliability and security of scale-out runs, with real processes and real storages (no mocks).

- No secret leaves the user's hands: a PostgreSQL password (a real role that must authenticate) is found in
  no file of the run folder, no output, no study attribute and no worker's command line.
- A proposal that kills every process evaluating it (a real `os._exit`, through the documented test hook
  `MNV3_SEARCH_TEST_KILL_GROUP`) is given up after --max-attempts and the run finishes without it.
- Heartbeats are stamped on a timer, so a proposal slow between reports is not taken for a dead one.
- Processes racing to claim the same enqueued trials on a journal file, SQLite and PostgreSQL: each trial
  is evaluated exactly once by an independent record (each process appends what it evaluated to its own log).
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import optuna
import pandas as pd
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from mnv3_search.cli import cli
from mnv3_search.errors import UserError
from mnv3_search.netadapt.evaluate import KILL_EXIT_CODE, KILL_GROUP_ENV
from mnv3_search.netadapt.study import (ATTEMPT_ATTR, FAILURE_ATTR, HEARTBEAT_ATTR, ITERATION_ATTR, STORAGE_ENV,
                                        claim, claim_lock_path, create_study, heartbeat, load_study, make_storage,
                                        redact, redact_argv, requeue_stale, resolve_storage)
from support.postgres import running_postgres, skip_without_postgres
from support.tiny_run import MICRO_SPEC_PATH  # two blocks at 32 px: a run is a minute on 2 busy cores, not three

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "Zq8vLw3tRk5nPx"  # distinctive: any occurrence anywhere is a leak
TINY_ARGS = ["--limit", "240", "--batch-size", "32", "--short-steps", "4", "--rungs", "2", "--seed-epochs", "2",
             "--long-epochs", "1", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A real PostgreSQL server whose database belongs to a role that logs in with PASSWORD."""
    skip_without_postgres()
    for url in running_postgres(user=("runner", PASSWORD)):
        yield url


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in (STORAGE_ENV, KILL_GROUP_ENV)}
    base["PYTHONPATH"] = os.pathsep.join([str(REPO), base.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**base, **extra}


def netadapt_command(out: Path, budget: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mnv3_search", "netadapt", str(MICRO_SPEC_PATH), "--budget", budget, "--out",
            str(out), *TINY_ARGS, *extra]


def children_cmdlines(pid: int) -> dict[int, str]:
    """Command lines of the live child processes of `pid`, as any user of the machine can read them."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            if int(fields[1]) == pid:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return found


# -- 1. secrets -------------------------------------------------------------------------------------------

def test_redaction_of_urls_messages_and_command_lines() -> None:
    url = f"postgresql+psycopg2://runner:{PASSWORD}@127.0.0.1:1/x"
    assert redact(url) == "postgresql+psycopg2://runner:***@127.0.0.1:1/x"
    assert redact("postgresql://runner@host/db") == "postgresql://runner@host/db"
    assert redact("/tmp/run/study.journal") == "/tmp/run/study.journal"
    assert redact_argv(["mnv3-search", "--storage", url, f"--storage={url}", "--out", "a=b"]) == [
        "mnv3-search", "--storage", redact(url), f"--storage={redact(url)}", "--out", "a=b"]
    with pytest.raises(UserError) as caught:
        make_storage(url)  # nothing listens on port 1
    assert str(caught.value).startswith("storage 'postgresql+psycopg2://runner:***@127.0.0.1:1/x' cannot be opened")
    assert PASSWORD not in str(caught.value)


def test_resume_takes_the_password_from_the_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    full = f"postgresql://runner:{PASSWORD}@db.example/mnv3"
    recorded = redact(full)
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    with pytest.raises(UserError, match=r"^the run's storage postgresql://runner:\*\*\*@db.example/mnv3 needs its "
                                        r"password, which is never written to the run folder; set "
                                        r"MNV3_SEARCH_STORAGE to the full URL \(or pass --storage\)$"):
        resolve_storage(None, recorded)
    monkeypatch.setenv(STORAGE_ENV, f"postgresql://runner:{PASSWORD}@elsewhere/mnv3")  # another server
    with pytest.raises(UserError, match="needs its password"):
        resolve_storage(None, recorded)
    monkeypatch.setenv(STORAGE_ENV, full)
    assert resolve_storage(None, recorded) == full
    assert resolve_storage(None, "/r/study.journal") == "/r/study.journal"
    assert resolve_storage("sqlite:///other.db", recorded) == "sqlite:///other.db"


def test_storage_file_with_a_password_must_be_private(tmp_path: Path) -> None:
    secret = tmp_path / "storage.url"
    secret.write_text(f"postgresql+psycopg2://runner:{PASSWORD}@127.0.0.1:1/x\n")
    secret.chmod(0o644)
    result = CliRunner().invoke(cli, ["worker", "--storage-file", str(secret), "--study", "s"], env={STORAGE_ENV: ""})
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"Error: --storage-file {secret}: holds a password but other users can read "
                                     f"it; run chmod 600 {secret}")
    secret.chmod(0o600)
    result = CliRunner().invoke(cli, ["worker", "--storage-file", str(secret), "--study", "s"], env={STORAGE_ENV: ""})
    assert result.exit_code == 2 and "runner:***@127.0.0.1:1/x' cannot be opened" in result.output, result.output
    assert PASSWORD not in result.output
    result = CliRunner().invoke(cli, ["worker", "--study", "s"], env={STORAGE_ENV: ""})
    assert result.output.strip() == ("Error: no storage: pass --storage URL, --storage-file FILE or set "
                                     "$MNV3_SEARCH_STORAGE")


@pytest.mark.postgres
def test_no_password_in_files_output_attributes_or_worker_command_lines(pg_url: str, tmp_path: Path) -> None:
    out = tmp_path / "secret-run"
    log_out, log_err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    # the worst case: the user puts the URL on the master's own command line
    command = netadapt_command(out, "0.85M-macs", "--workers", "2", "--storage", pg_url)  # 3-4 iterations
    seen: dict[int, str] = {}
    with open(log_out, "wb") as o, open(log_err, "wb") as e:
        proc = subprocess.Popen(command, stdout=o, stderr=e, env=env())
        while proc.poll() is None:
            seen.update({pid: line for pid, line in children_cmdlines(proc.pid).items() if line})  # not zombies
            time.sleep(0.05)
    assert proc.returncode == 0, log_err.read_text()
    workers = [line for line in seen.values() if " -m mnv3_search.netadapt.worker " in line]
    assert len(workers) == 1, seen  # --workers 2: the master and one local worker process (the library's module)
    assert not any(" worker " in line for line in seen.values()), seen  # not the CLI's `worker` command
    assert all(PASSWORD not in line for line in seen.values()), seen
    for path in [log_out, log_err, *out.rglob("*")]:
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path
    run = json.loads((out / "run.json").read_text())
    assert run["storage"] == redact(pg_url) and ":***@127.0.0.1" in run["storage"]
    assert redact(pg_url) in run["command"]
    study = optuna.load_study(study_name=out.name, storage=make_storage(pg_url))
    attributes = [study.user_attrs, study._storage.get_study_system_attrs(study._study_id)] + [  # noqa: SLF001
        [t.user_attrs, t.system_attrs, t.params] for t in study.get_trials()]
    assert PASSWORD not in json.dumps(attributes, default=str)
    # the worker reached the database through its environment: it evaluated proposals too
    # (one proposals.csv row per proposal; its worker cell names every process that ran one of its rungs)
    cells = pd.read_csv(out / "proposals.csv")["worker"].dropna()
    assert len({name for cell in cells for name in str(cell).split()}) == 2
    # the same command again without the URL (resume) needs the password from the environment: run.json lacks it
    resume = netadapt_command(out, "0.85M-macs", "--workers", "2")
    again = subprocess.run(resume, capture_output=True, text=True, env=env(), timeout=300)
    assert again.returncode == 2 and PASSWORD not in again.stdout + again.stderr
    assert again.stderr.strip().endswith(f"set {STORAGE_ENV} to the full URL (or pass --storage)"), again.stderr
    again = subprocess.run(resume, capture_output=True, text=True, env=env(**{STORAGE_ENV: pg_url}), timeout=300)
    assert again.returncode == 0, again.stderr
    assert "budget met after" in again.stdout and PASSWORD not in again.stdout + again.stderr


# -- 2. a proposal that kills its workers ------------------------------------------------------------------

@pytest.mark.slow
def test_a_proposal_that_kills_its_workers_is_given_up(tmp_path: Path) -> None:
    """`exp2`'s evaluation kills whichever process runs it. The run is restarted as a user would (the same
    command) when the master itself was the victim; after 2 attempts the proposal is given up, with its
    reason, and the iteration is decided among the others."""
    out = tmp_path / "poison"
    codes = []
    for _ in range(3):  # at most 2 deaths: each kills a worker or the master
        done = subprocess.run(netadapt_command(out, "1.31M-macs", "--workers", "2"), capture_output=True,
                              text=True, env=env(**{KILL_GROUP_ENV: "exp2"}), timeout=600)
        codes.append(done.returncode)
        assert done.returncode in (0, KILL_EXIT_CODE), done.stderr
        if done.returncode == 0:
            break
    assert codes[-1] == 0 and codes.count(KILL_EXIT_CODE) <= 2, codes
    proposals = pd.read_csv(out / "proposals.csv")
    poison = proposals[proposals["group"] == "exp2"]
    # one proposals.csv row per proposal: its last attempt and that attempt's reason
    assert poison["state"].tolist() == ["FAIL"] and poison["attempt"].tolist() == [2]
    assert poison["failure"].iloc[0].startswith("worker ") and \
        poison["failure"].iloc[0].endswith(" died (attempt 2 of 2; given up)")
    # the study keeps every attempt, each with its reason
    run = json.loads((out / "run.json").read_text())
    tried = sorted((t for t in load_study(run["storage"], run["study"]).get_trials()
                    if {**t.system_attrs.get("fixed_params", {}), **t.params}.get("group") == "exp2"),
                   key=lambda t: t.number)
    assert [t.state.name for t in tried] == ["FAIL", "FAIL"]
    assert [t.user_attrs.get(ATTEMPT_ATTR, 1) for t in tried] == [1, 2]
    reasons = [t.user_attrs[FAILURE_ATTR] for t in tried]
    assert reasons[0].startswith("worker ") and reasons[0].endswith(" died (attempt 1 of 2; enqueued again)")
    assert reasons[1].startswith("worker ") and reasons[1].endswith(" died (attempt 2 of 2; given up)")
    others = proposals[proposals["group"] != "exp2"]
    assert set(others["state"]) <= {"COMPLETE", "PRUNED"} and others["failure"].isna().all()
    assert (others["attempt"] == 1).all() and not others.duplicated(["iteration", "group"]).any()
    iterations = pd.read_csv(out / "iterations.csv")
    assert len(iterations) == 2 and not iterations["proposal"].iloc[1].startswith("exp2=")
    assert iterations["proposals"].iloc[1] == len(others)  # the given-up proposal is not counted
    assert (out / "final.yaml").exists()


def test_given_up_after_max_attempts_then_never_enqueued_again(tmp_path: Path) -> None:
    from mnv3_search.netadapt.study import enqueue

    study = create_study(str(tmp_path / "s.journal"), "s")
    enqueue(study, 1, "exp2", 64, {"parent": "seed.pt"})
    for attempt in (1, 2, 3):
        trial = claim(study)
        assert trial is not None and trial.user_attrs.get(ATTEMPT_ATTR, 1) == attempt
        trial.set_user_attr(HEARTBEAT_ATTR, time.time() - 1000)
        assert requeue_stale(study, 1, stale_seconds=60, max_attempts=3) == 1
    assert claim(study) is None
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert trials[2].user_attrs[FAILURE_ATTR].endswith("silent for 1000 s (attempt 3 of 3; given up)")
    enqueue(study, 1, "exp2", 64, {"parent": "seed.pt"})  # a resumed master proposes it again: skipped
    assert len(study.get_trials()) == 3


# -- 3. heartbeats on a timer ----------------------------------------------------------------------------

@pytest.mark.slow
def test_heartbeat_timer_keeps_a_slow_proposal_alive_and_stops_with_it(tmp_path: Path) -> None:
    study = create_study(str(tmp_path / "hb.journal"), "hb")
    study.enqueue_trial({"group": "exp2", "channels": 64}, user_attrs={ITERATION_ATTR: 1})
    trial = claim(study)
    assert trial is not None
    with heartbeat(trial, every=0.2):  # a proposal with no report for 4 s, stale after 2 s
        for _ in range(20):
            time.sleep(0.2)
            assert requeue_stale(study, 1, stale_seconds=2.0) == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("heartbeat-trial-")]
    time.sleep(2.5)  # no more beats: now it is a dead worker's proposal
    assert requeue_stale(study, 1, stale_seconds=2.0) == 1
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]

    # a trial given up by the master while its worker still beats: the timer ends, the worker is not hurt
    again = claim(study)
    assert again is not None
    with heartbeat(again, every=0.05):
        study._storage.set_trial_state_values(again._trial_id, state=TrialState.FAIL)  # noqa: SLF001
        deadline = time.monotonic() + 30
        while [t for t in threading.enumerate() if t.name == f"heartbeat-trial-{again.number}"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)


# -- 4. claims raced by real processes on real storages ----------------------------------------------------

def racer(url: str, name: str, log: Path, ready: Path, go: Path) -> None:
    """One claiming process: opens its own connection, waits for the start signal, then claims and
    "evaluates" (logs, then tells) until nothing is left."""
    study = load_study(url, name)
    ready.touch()
    while not go.exists():
        time.sleep(0.001)
    with open(log, "a") as record:
        while True:
            trial = claim(study, claim_lock_path(url))
            if trial is None:
                break
            record.write(f"{trial.number}\n")
            record.flush()
            study.tell(trial, float(trial.number))  # a second claimer of the trial fails here: exit code 1


RACERS, TRIALS = 4, 40


def race(url: str, folder: Path) -> tuple[collections.Counter, list[int], list[optuna.trial.FrozenTrial]]:
    """RACERS real processes (forked from this one, which imported everything already: on 2 shared cores
    importing torch four times takes a minute) claim the same TRIALS enqueued trials at once; each
    process logs what it evaluated, an independent record of who evaluated what."""
    name = "race"
    study = create_study(url, name)
    for i in range(TRIALS):
        study.enqueue_trial({"i": i}, user_attrs={ITERATION_ATTR: 1})
    del study
    go = folder / "go"
    logs = [folder / f"racer{i}.log" for i in range(RACERS)]
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=racer, args=(url, name, log, log.with_suffix(".ready"), go)) for log in logs]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 300
    while not all(log.with_suffix(".ready").exists() for log in logs):  # all connected: they start together
        assert time.monotonic() < deadline and all(p.is_alive() for p in procs), [p.exitcode for p in procs]
        time.sleep(0.02)
    go.touch()
    for p in procs:
        p.join(timeout=600)
    record = collections.Counter(int(line) for log in logs if log.exists() for line in log.read_text().split())
    return record, [p.exitcode for p in procs], load_study(url, name).get_trials()


def check_race(record: collections.Counter, codes: list[int], trials: list[optuna.trial.FrozenTrial]) -> None:
    doubles = {n: c for n, c in record.items() if c > 1}
    assert not doubles, f"evaluated more than once: {doubles}"
    assert sorted(record) == [t.number for t in trials] == list(range(TRIALS))
    assert codes == [0] * RACERS
    assert all(t.state == TrialState.COMPLETE and t.value == t.number for t in trials)


def test_claim_race_on_a_journal_file(tmp_path: Path) -> None:
    check_race(*race(str(tmp_path / "race.journal"), tmp_path))


@pytest.mark.slow
def test_claim_race_on_sqlite(tmp_path: Path) -> None:
    check_race(*race(f"sqlite:///{tmp_path / 'race.db'}", tmp_path))


@pytest.mark.postgres
def test_claim_race_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    check_race(*race(pg_url, tmp_path))
