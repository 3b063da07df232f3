"""The run's Optuna study: one trial per rung of each proposal, enqueued by the master, claimed by workers.

Proposals are enqueued as WAITING trials with fixed params (group, channels); the master decides which
proposals go on to the next rung (successive halving, see loop.py), so no Optuna pruner is involved.
A worker claims one by moving it WAITING -> RUNNING in the storage, which the storage does atomically (Optuna's own mechanism for
enqueued trials), so no proposal is evaluated twice. A claimed trial stamps a heartbeat at every report;
the master fails a RUNNING trial whose heartbeat went stale and enqueues it again, so a dead worker's
proposal is retried, never lost. Any Optuna storage URL works: SQLite (default), PostgreSQL, MySQL, or a
journal file (`*.journal`).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..errors import UserError

CONFIG_ATTR = "netadapt_config"
RUN_DIR_ATTR = "run_dir"
STATUS_ATTR = "status"  # running | finished
GROUPS_ATTR = "groups"  # [group names, widest channel count] of the seed: the trials' param space
HEARTBEAT_ATTR = "heartbeat"
ITERATION_ATTR = "iteration"
WORKER_ATTR = "worker"
RUNG_ATTR = "rung"  # successive-halving rung of a proposal's trial (0: from the parent)
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL; a path ending in .journal is a journal file (several processes safe)."""
    try:
        if url.endswith(".journal"):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url))
        engine: dict[str, Any] = {}
        if url.startswith("sqlite"):
            engine = {"connect_args": {"timeout": 60}}
        else:
            engine = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}} if url.startswith(
                "postgresql") else {}
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as exc:  # SQLAlchemy raises many types for bad URLs and unreachable servers
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"storage {url!r} cannot be opened ({reason[:200]}); check the URL, that the server is "
                        f"running and that the database exists") from None


def create_study(storage_url: str, name: str) -> optuna.Study:
    """Create the run's study (or load it when resuming): accuracy is maximised."""
    storage = make_storage(storage_url)
    return optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)


def load_study(storage_url: str, name: str) -> optuna.Study:
    storage = make_storage(storage_url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise UserError(f"no study named {name!r} in {storage_url}; studies there: {', '.join(names) or 'none'}") \
            from None


def iteration_trials(study: optuna.Study, iteration: int,
                     states: Optional[Sequence[TrialState]] = None) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=states)
            if t.user_attrs.get(ITERATION_ATTR) == iteration]


def trial_group(t: FrozenTrial) -> Optional[str]:
    """The proposal group of a trial, also while it is still WAITING (params fixed, not yet suggested)."""
    return t.params.get("group", t.system_attrs.get("fixed_params", {}).get("group"))


def enqueue(study: optuna.Study, iteration: int, group: str, channels: int, attrs: dict[str, Any],
            rung: int = 0, trials: Optional[Sequence[FrozenTrial]] = None) -> None:
    """One rung of one proposal as a WAITING trial with fixed params; skipped if this iteration already has
    it (not failed), so a resumed master reuses what was enqueued or finished before. `trials`: the
    iteration's trials when the caller already has them (one storage read for many proposals)."""
    for t in (iteration_trials(study, iteration) if trials is None else trials):
        if trial_group(t) == group and t.user_attrs.get(RUNG_ATTR, 0) == rung and t.state != TrialState.FAIL:
            return
    study.enqueue_trial({"group": group, "channels": channels},
                        user_attrs={**attrs, ITERATION_ATTR: iteration, RUNG_ATTR: rung})


def claim_lock_path(storage_url: str) -> Optional[Path]:
    """SQLite has no SELECT ... FOR UPDATE: two processes can both move one WAITING trial to RUNNING.
    Claims on a SQLite file are therefore serialised by a lock file beside it (one machine only, as
    SQLite itself). Journal files and server databases claim atomically on their own."""
    prefix = "sqlite:///"
    if not storage_url.startswith(prefix):
        return None
    return Path(storage_url[len(prefix):] + ".claim.lock")


@contextmanager
def _locked(path: Optional[Path]) -> Iterator[None]:
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def claim(study: optuna.Study, lock: Optional[Path] = None) -> Optional[optuna.Trial]:
    """Take the oldest WAITING trial for this process, or None; no two processes get the same trial."""
    storage = study._storage  # noqa: SLF001 - Optuna's own claim path for enqueued trials uses it too
    with _locked(lock):
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):  # noqa: SLF001
                trial = optuna.Trial(study, frozen._trial_id)  # noqa: SLF001
                break
        else:
            return None
    trial.set_user_attr(HEARTBEAT_ATTR, time.time())
    trial.set_user_attr(WORKER_ATTR, worker_name())
    return trial


def worker_name() -> str:
    """host:pid of this process, so a resumed master can tell its own dead processes' trials."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_local_worker(name: Optional[str]) -> bool:
    """A worker of this machine (host:pid) whose process is gone, e.g. a master killed before a resume."""
    host, _, pid = (name or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def requeue_stale(study: optuna.Study, iteration: int, stale_seconds: float) -> int:
    """Fail RUNNING trials of `iteration` whose worker is gone (its heartbeat older than `stale_seconds`, or
    a local process that no longer exists) and enqueue them again."""
    now = time.time()
    count = 0
    for t in iteration_trials(study, iteration, states=(TrialState.RUNNING,)):
        beat = t.user_attrs.get(HEARTBEAT_ATTR, t.datetime_start.timestamp() if t.datetime_start else now)
        if now - beat <= stale_seconds and not _dead_local_worker(t.user_attrs.get(WORKER_ATTR)):
            continue
        if study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):  # noqa: SLF001
            attrs = {k: v for k, v in t.user_attrs.items() if k not in (HEARTBEAT_ATTR, ITERATION_ATTR, WORKER_ATTR)}
            fixed = t.system_attrs.get("fixed_params", t.params)
            study.enqueue_trial(dict(fixed), user_attrs={ITERATION_ATTR: iteration, **attrs, "retry_of": t.number})
            count += 1
    return count


def set_status(study: optuna.Study, status: str) -> None:
    study.set_user_attr(STATUS_ATTR, status)
