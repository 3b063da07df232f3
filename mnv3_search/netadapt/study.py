"""The run's Optuna study: one trial per rung of each proposal, enqueued by the master, claimed by workers.

Proposals are enqueued as WAITING trials with fixed params (group, channels); the master decides which
proposals go on to the next rung (successive halving, see halving.py), so no Optuna pruner is involved.
A worker claims one by moving it WAITING -> RUNNING in the storage, which the storage does atomically
(Optuna's own mechanism for enqueued trials), so no proposal is evaluated twice. A claimed trial stamps a
heartbeat at every report; the master fails a RUNNING trial whose heartbeat went stale and enqueues it
again, so a dead worker's proposal is retried, never lost — at most `max_attempts` times: a proposal that
kills every process that evaluates it is then marked failed with its reason, and its iteration goes on with
the others.
Any Optuna storage URL works: SQLite (default), PostgreSQL, MySQL, or a journal file (`*.journal`).
Optuna's own heartbeat (`heartbeat_interval`, `RetryFailedTrialCallback`) is not used: it runs only inside
`study.optimize`, which these enqueued, master-decided trials never go through, it cannot tell a dead local
worker by its pid at once, and it retries without limit unless told and without the reason a proposal failed.

Storage URLs may hold a password. It is never written (run.json, CSVs, study attributes, messages): every
URL that leaves this module for a file or a message goes through `redact`, and local workers receive the
URL in their environment (`STORAGE_ENV`), never on their command line where `ps` shows it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from ..errors import UserError
from .attrs import (ATTEMPT_ATTR, CHANNELS_PARAM, FAILURE_ATTR, FIXED_PARAMS_ATTR, GIVEN_UP_ATTR, GROUP_PARAM,
                    HEARTBEAT_ATTR, ITERATION_ATTR, RETRY_OF_ATTR, RUNG_ATTR, STATUS_ATTR, WORKER_ATTR)

STORAGE_ENV = "MNV3_SEARCH_STORAGE"  # how a storage URL (password included) reaches workers and commands
HEARTBEAT_SECONDS = 2.0  # a claimed trial's heartbeat is stamped this often while it is evaluated
CLAIM_SECONDS = 10.0  # claim() stamps a trial with its worker at once; one unstamped this long lost its claimer
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _not_a_lost_connection(record: logging.LogRecord) -> bool:
    """Optuna's RDB storage warns, with the whole SQL statement over many lines, when a read fails and it
    retries another way; on a lost connection the retry fails too and the run says so in one line
    (StorageLost), or it succeeds and there is nothing to say."""
    message = record.getMessage()
    return not (message.startswith("Caught an error from sqlalchemy") and "OperationalError" in message)


logging.getLogger("optuna.storages._rdb.storage").addFilter(_not_a_lost_connection)


def redact(url: Optional[str]) -> Optional[str]:
    """The URL with its password shown as ***, for files and messages; a journal path is returned as is."""
    if not url or url.endswith(".journal"):
        return url
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # not a database URL: nothing to hide
        return url
    return parsed.render_as_string(hide_password=True) if parsed.password is not None else url


def _password(url: str) -> Optional[str]:
    if url.endswith(".journal"):
        return None
    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password
    except Exception:
        return None
    return str(password) if password else None


def redact_argv(argv: Sequence[str]) -> list[str]:
    """A command line fit for run.json: each storage URL in it (`URL` or `--opt=URL`) redacted."""
    out = []
    for arg in argv:
        option, eq, value = arg.partition("=")
        if eq and option.startswith("-"):
            out.append(f"{option}={redact(value)}")
        else:
            out.append(redact(arg) or arg)
    return out


def is_redacted(url: Optional[str]) -> bool:
    """A URL read back from run.json whose password was hidden: it cannot open the storage by itself."""
    return bool(url) and redact(url) == url and _password(url or "") == "***"


def resolve_storage(given: Optional[str], recorded: Optional[str]) -> Optional[str]:
    """The storage URL to resume a run with: the one given, else the one run.json recorded. That one is kept
    without its password, which then comes from the environment (STORAGE_ENV, the same URL in full)."""
    if given or not is_redacted(recorded):
        return given or recorded
    full = os.environ.get(STORAGE_ENV)
    if full and redact(full) == recorded:
        return full
    raise UserError(f"the run's storage {recorded} needs its password, which is never written to the run folder; "
                    f"set {STORAGE_ENV} to the full URL (or pass --storage)")


class StorageUnreachable(UserError):
    """The storage URL names a database server that cannot be reached (or a URL that is not one)."""


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL; a path ending in .journal is a journal file (several processes safe)."""
    if url.endswith(".journal"):
        return _journal_storage(Path(url))
    try:
        engine: dict[str, Any] = {}
        if url.startswith("sqlite"):
            engine = {"connect_args": {"timeout": 60}}
        else:
            engine = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}} if url.startswith(
                "postgresql") else {}
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as exc:  # SQLAlchemy raises many types for bad URLs and unreachable servers
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        password = _password(url)
        if password:
            reason = reason.replace(password, "***")
        raise StorageUnreachable(f"storage {redact(url)!r} cannot be opened ({reason[:200]}); check the URL, that the "
                                 f"server is running and that the database exists") from None


class StorageLost(UserError):
    """The storage server went away in the middle of a run (restarted, network cut): the run stops in one line,
    and running the same command again resumes it (every finished rung trial is reused)."""

    exit_code = 4  # docs/reliability.md: exit codes


def lost_connection(exc: BaseException) -> Optional[str]:
    """The first line of the database's own message when `exc` (or what caused it: Optuna wraps SQLAlchemy's
    errors) is a lost or refused connection to a database server, else None."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    seen: Optional[BaseException] = exc
    while seen is not None:
        if isinstance(seen, OperationalError) or (isinstance(seen, DBAPIError) and seen.connection_invalidated):
            text = str(getattr(seen, "orig", None) or seen).strip()
            return text.splitlines()[0] if text else type(seen).__name__
        seen = seen.__cause__ or seen.__context__  # also SQLAlchemy's PendingRollbackError raised after it
    return None


def as_storage_lost(exc: BaseException, url: Optional[str],
                    then: str = "run the same command again to resume") -> Optional[StorageLost]:
    """`exc` as one line (StorageLost) saying `then` when it is a lost connection to the database server at
    `url`, else None. SQLite files and journals have no server to lose: their errors are not changed."""
    if not url or url.startswith("sqlite") or url.endswith(".journal"):
        return None
    reason = lost_connection(exc)
    if reason is None:
        return None
    password = _password(url)
    if password:
        reason = reason.replace(password, "***")
    return StorageLost(f"storage {redact(url)} lost its connection ({reason[:200]}); {then}")


def _journal_storage(path: Path) -> optuna.storages.JournalStorage:
    """A journal file's storage, refusing a damaged journal in one line. Optuna itself skips a truncated last
    line without a word, and the next append glues its record onto the fragment, after which the journal
    cannot be replayed at all: so a truncated last line is refused with the command that cuts it off."""
    from optuna.storages.journal import JournalFileBackend

    size = _truncated_journal(path)
    if size is not None:
        raise UserError(f"{path}: the Optuna journal's last line is truncated or damaged (a write was cut off); "
                        f"keep the lines before it with `truncate -s {size} {path}` and run again (the cut-off step "
                        f"is redone)")
    try:
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: damaged Optuna journal ({reason[:160]}); it cannot be replayed: restore it from a "
                        f"copy, or start the run again in another folder (--out)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot open the Optuna journal ({exc.strerror or exc}); check the path and its "
                        f"permissions") from None


def _truncated_journal(path: Path, settle_seconds: float = 0.2) -> Optional[int]:
    """The size to cut a journal back to when its last line is cut off (no newline, or not JSON), else None.
    Checked twice, apart, so another process's append in flight is not taken for damage."""
    for attempt in range(2):
        try:
            with open(path, "rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(0, size - 65536))
                tail = handle.read()
        except OSError:
            return None  # missing or unreadable: Optuna creates it or says why
        if not tail:
            return None
        body = tail if not tail.endswith(b"\n") else tail[:-1]
        cut = body.rfind(b"\n") + 1
        if cut == 0 and size > len(tail):
            return None  # a last line longer than the tail read: leave it to Optuna
        try:
            json.loads(body[cut:])
            if tail.endswith(b"\n"):
                return None
        except ValueError:
            pass
        if attempt == 1:
            return size - len(tail) + cut
        time.sleep(settle_seconds)
    return None


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
        raise UserError(f"no study named {name!r} in {redact(storage_url)}; "
                        f"studies there: {', '.join(names) or 'none'}") from None


def iteration_trials(study: optuna.Study, iteration: int,
                     states: Optional[Sequence[TrialState]] = None) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=states)
            if t.user_attrs.get(ITERATION_ATTR) == iteration]


def trial_group(t: FrozenTrial) -> Optional[str]:
    """The proposal group of a trial, also while it is still WAITING (params fixed, not yet suggested)."""
    return t.params.get(GROUP_PARAM, t.system_attrs.get(FIXED_PARAMS_ATTR, {}).get(GROUP_PARAM))


def enqueue(study: optuna.Study, iteration: int, group: str, channels: Optional[int], attrs: dict[str, Any],
            rung: int = 0, trials: Optional[Sequence[FrozenTrial]] = None) -> None:
    """One rung of one proposal as a WAITING trial with fixed params (no channels for a proposal of several
    cuts, whose `attrs` carry them); skipped if this iteration already has it (not failed, or given up after
    its last attempt, so a resumed run does not retry a proposal that kills its workers), so a resumed master
    reuses what was enqueued or finished before. `trials`: the iteration's trials when the caller already has
    them (one storage read for many proposals)."""
    for t in (iteration_trials(study, iteration) if trials is None else trials):
        if trial_group(t) == group and t.user_attrs.get(RUNG_ATTR, 0) == rung and \
                (t.state != TrialState.FAIL or t.user_attrs.get(GIVEN_UP_ATTR)):
            return
    params: dict[str, Any] = {GROUP_PARAM: group}
    if channels is not None:
        params[CHANNELS_PARAM] = channels
    study.enqueue_trial(params,
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


# Optuna's storage API is public, but a Study's handle to its storage and the storage's ids of a study and a
# trial (not trial.number) are not. This module is the only one that reaches Optuna's private names (these
# three, the claim's mirror below and the RDB logger's name); tests/netadapt/test_optuna_door.py holds it to that and
# to the Optuna major version pinned in pyproject.toml.
def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage `study` reads and writes (claims and failures go to it directly, past the Study API)."""
    return study._storage  # noqa: SLF001 - Optuna 5 has no public accessor for it


def study_storage_id(study: optuna.Study) -> int:
    """The storage's id of `study`, which storage calls take instead of its name."""
    return study._study_id  # noqa: SLF001 - Optuna 5 has no public accessor for it


def trial_storage_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of `trial` (not trial.number), which storage calls take."""
    return trial._trial_id  # noqa: SLF001 - Optuna 5 has no public accessor for it


def _pop_waiting_trial_id(study: optuna.Study) -> Optional[int]:
    """Optuna's own `Study._pop_waiting_trial_id` (optuna 5.0), mirrored because it is private: move the
    oldest WAITING trial to RUNNING. `set_trial_state_values` returns False when another process moved it
    first, and raises UpdateFinishedTrialError when another process already finished it (a master that
    failed it); both mean "not ours, try the next one"."""
    storage = storage_of(study)
    for frozen in storage.get_all_trials(study_storage_id(study), deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if not storage.set_trial_state_values(trial_storage_id(frozen), state=TrialState.RUNNING):
                continue
        except UpdateFinishedTrialError:
            continue
        return trial_storage_id(frozen)
    return None


def claim(study: optuna.Study, lock: Optional[Path] = None) -> Optional[optuna.Trial]:
    """Take the oldest WAITING trial for this process, or None; no two processes get the same trial."""
    while True:
        with _locked(lock):
            trial_id = _pop_waiting_trial_id(study)
        if trial_id is None:
            return None
        trial = optuna.Trial(study, trial_id)
        try:
            trial.set_user_attr(HEARTBEAT_ATTR, time.time())
            trial.set_user_attr(WORKER_ATTR, worker_name())
        except UpdateFinishedTrialError:  # failed by a master between the claim and the first stamp
            continue
        return trial


@contextmanager
def heartbeat(trial: optuna.Trial, every: float = HEARTBEAT_SECONDS) -> Iterator[None]:
    """Stamp the trial's heartbeat every `every` seconds from a daemon thread while the block runs, so a
    proposal slow between two reports is never taken for a dead worker's. Stops when the block ends, or
    when the trial was finished elsewhere (a master gave it up); a storage hiccup skips one beat."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            try:
                trial.set_user_attr(HEARTBEAT_ATTR, time.time())
            except UpdateFinishedTrialError:
                return
            except Exception:  # noqa: BLE001 - a lost connection must not kill the evaluation; next beat retries
                continue

    thread = threading.Thread(target=beat, name=f"heartbeat-trial-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def worker_name() -> str:
    """host:pid of this process, so a resumed master can tell its own dead processes' trials."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_gone(pid: int) -> bool:
    """This machine's process `pid` has exited: no such process, or a zombie (exited, not yet reaped by
    its parent: a local worker the master has not waited for, or a master whose caller has not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


def _dead_local_worker(name: Optional[str]) -> bool:
    """A worker of this machine (host:pid) whose process is gone, e.g. a master killed before a resume."""
    host, _, pid = (name or "").rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and process_gone(int(pid))


def requeue_stale(study: optuna.Study, iteration: int, stale_seconds: float, max_attempts: int = 2) -> int:
    """Fail RUNNING trials of `iteration` whose worker is gone (its heartbeat older than `stale_seconds`, a
    local process that no longer exists, or a claim its worker never stamped: the storage went away between
    the two), each with its reason, and enqueue them again, unless that was
    their `max_attempts`-th attempt: then the proposal is given up, so one that kills every worker that
    evaluates it cannot stall the run. Returns how many trials were failed."""
    now = time.time()
    storage = storage_of(study)
    count = 0
    for t in iteration_trials(study, iteration, states=(TrialState.RUNNING,)):
        beat = t.user_attrs.get(HEARTBEAT_ATTR, t.datetime_start.timestamp() if t.datetime_start else now)
        who = t.user_attrs.get(WORKER_ATTR)
        dead = _dead_local_worker(who)
        unclaimed = who is None and now - beat > CLAIM_SECONDS  # its claimer lost the storage before stamping it
        if now - beat <= stale_seconds and not dead and not unclaimed:
            continue
        attempt = int(t.user_attrs.get(ATTEMPT_ATTR, 1))
        give_up = attempt >= max_attempts
        why = "its claimer never stamped it" if unclaimed else \
            f"worker {who} " + ("died" if dead else f"silent for {now - beat:.0f} s")
        try:
            storage.set_trial_user_attr(trial_storage_id(t), FAILURE_ATTR, f"{why} (attempt {attempt} of "
                                        f"{max_attempts}" + ("; given up)" if give_up else "; enqueued again)"))
            if give_up:
                storage.set_trial_user_attr(trial_storage_id(t), GIVEN_UP_ATTR, True)
            if not storage.set_trial_state_values(trial_storage_id(t), state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # its worker finished it meanwhile, or another process failed it
            continue
        count += 1
        if not give_up:
            attrs = {k: v for k, v in t.user_attrs.items()
                     if k not in (HEARTBEAT_ATTR, ITERATION_ATTR, WORKER_ATTR, ATTEMPT_ATTR, FAILURE_ATTR)}
            fixed = t.system_attrs.get(FIXED_PARAMS_ATTR, t.params)
            study.enqueue_trial(dict(fixed), user_attrs={ITERATION_ATTR: iteration, **attrs, RETRY_OF_ATTR: t.number,
                                                         ATTEMPT_ATTR: attempt + 1})
    return count


def set_status(study: optuna.Study, status: str) -> None:
    study.set_user_attr(STATUS_ATTR, status)
