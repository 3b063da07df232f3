"""A PostgreSQL restart in the middle of a run (issue 11): the run survives it, or stops in one line and resumes.

The real throwaway server of tests/support/postgres.py is stopped (fast: every connection is cut) and started again on
the same port while a two-process micro run (tests/support/tiny_run.py's micro network and settings) is evaluating
proposals. Either the leader and its worker reconnect and the run completes, or it exits with one line naming
the storage and the same command resumes it; either way it ends with the network of the uninterrupted run, and
no proposal rung is evaluated twice to completion.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna

from mnv3_search.netadapt.study import (CLAIM_SECONDS, FAILURE_ATTR, HEARTBEAT_ATTR, ITERATION_ATTR, StorageLost,
                                       _pop_waiting_trial_id, as_storage_lost, create_study, make_storage,
                                       requeue_stale, storage_of, trial_storage_id)
from support.postgres import PostgresServer
from support.tiny_run import MICRO_ARGS, MICRO_BUDGET, MICRO_SPEC_PATH

DOWN_SECONDS = 2.0


def _complete_trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = make_storage(url)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        return [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    except KeyError:  # the leader has not created the study yet
        return []
    finally:
        storage.engine.dispose()  # type: ignore[attr-defined]  # no idle connection of ours across the restart


def test_a_postgresql_restart_mid_run_loses_nothing(micro_run: Path, postgres_server: PostgresServer,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "pgrestart"
    server = postgres_server
    # micro_run's run as a command, in two processes (~42 s of CPU; the tiny run's took ~58 s)
    command = [sys.executable, "-m", "mnv3_search", "netadapt", str(MICRO_SPEC_PATH), "--budget", MICRO_BUDGET,
               "--out", str(out), *MICRO_ARGS, "--workers", "2", "--storage", server.url]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not _complete_trials(server.url, out.name):  # restart once proposals are being evaluated
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no trial finished"
            time.sleep(0.3)
        server.restart(down_seconds=DOWN_SECONDS)
        stderr = proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in stderr, stderr
    if proc.returncode != 0:  # stopped in one line: the same command resumes it
        lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("spec:")]
        assert len(lines) == 1 and lines[0].startswith(
            f"Error: storage {server.url} lost its connection") and "run the same command again" in lines[0], stderr
        again = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    complete = _complete_trials(server.url, out.name)
    rungs = Counter((t.user_attrs["iteration"], t.params["group"], t.user_attrs["rung"]) for t in complete)
    assert rungs and max(rungs.values()) == 1, [key for key, n in rungs.items() if n > 1]
    assert (out / "final.yaml").read_text() == (micro_run / "final.yaml").read_text()


def test_a_claim_its_worker_never_stamped_is_enqueued_again(tmp_path: Path) -> None:
    """The server went away between a claim (WAITING -> RUNNING) and the claimer's stamp: the trial has no
    worker to wait for, so a resumed run enqueues it again after CLAIM_SECONDS, not after --stale-after."""
    study = create_study(f"sqlite:///{tmp_path / 's.db'}", "s")
    study.enqueue_trial({"group": "exp2", "channels": 64}, user_attrs={ITERATION_ATTR: 1})
    assert _pop_waiting_trial_id(study) is not None  # claimed, and then the claimer lost the storage
    assert requeue_stale(study, 1, stale_seconds=300) == 0  # a claim in progress: its stamp comes at once
    claimed = study.get_trials()[0]  # as if the claim were older: no worker stamp, time passed
    storage_of(study).set_trial_user_attr(trial_storage_id(claimed), HEARTBEAT_ATTR, time.time() - CLAIM_SECONDS - 1)
    assert requeue_stale(study, 1, stale_seconds=300) == 1
    first, again = study.get_trials()
    assert first.state == optuna.trial.TrialState.FAIL and again.state == optuna.trial.TrialState.WAITING
    assert first.user_attrs[FAILURE_ATTR] == "its claimer never stamped it (attempt 1 of 2; enqueued again)"


def test_a_lost_connection_is_one_line_without_the_password() -> None:
    from sqlalchemy.exc import OperationalError

    url = "postgresql+psycopg2://runner:s3cret@127.0.0.1:1/mnv3"
    cause = OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly (s3cret)"))
    try:
        try:
            raise cause
        except OperationalError as exc:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from exc
    except optuna.exceptions.StorageInternalError as exc:
        lost = as_storage_lost(exc, url)
    assert isinstance(lost, StorageLost) and lost.exit_code == 4
    assert str(lost) == ("storage postgresql+psycopg2://runner:***@127.0.0.1:1/mnv3 lost its connection (server "
                         "closed the connection unexpectedly (***)); run the same command again to resume")
    assert as_storage_lost(cause, "sqlite:///x.db") is None  # a file has no server to lose
    assert as_storage_lost(ValueError("bug"), url) is None
