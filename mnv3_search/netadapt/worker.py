"""Joining a NetAdapt run as a worker: what `mnv3-search worker` and each extra process of `--workers N` do.

A worker needs only the run's storage URL and study name: the master records everything else in the study
(its RunConfig, run folder, artifact store and proposal groups), so a worker on another machine cannot
disagree with the run it joins; checkpoints reach it through the artifact store (artifacts.py), so it needs
no shared disk. It claims enqueued proposals, fine-tunes and scores them, and leaves when the run is finished (or,
for a local worker, when the process that started it is gone). Latency is never measured here.

`python -m mnv3_search.netadapt.worker` is the entry point of local workers: the library starts its own
module, not its command line. The storage URL reaches it in $MNV3_SEARCH_STORAGE only, since any user of
the machine reads command lines with `ps` and the URL may hold a password.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..errors import UserError
from ..fileio import disk_full
from ..latency import torch_threads
from .artifacts import RunArtifacts, open_store, worker_location
from .attrs import ARTIFACTS_ATTR, CONFIG_ATTR, GROUPS_ATTR, RUN_DIR_ATTR, STATUS_ATTR
from .config import RunConfig
from .evaluate import Evaluator, work
from .runfolder import RunFolder
from .study import (STORAGE_ENV, StorageLost, StorageUnreachable, as_storage_lost, claim_lock_path, load_study,
                    process_gone)

JOIN_WAIT_SECONDS = 600.0  # how long a worker waits for a master that has not yet written its seed
WORKER_MODULE = "mnv3_search.netadapt.worker"  # what local workers run (`python -m`)
STOP_WAIT_SECONDS = 30.0  # a local worker leaves within a poll of the run finishing; then it is killed


def join_run(storage: str, study_name: str, run_dir: Optional[str | Path] = None, *,
             artifacts: Optional[str] = None, parent_pid: Optional[int] = None, threads: int = 1,
             log: Callable[[str], None] = lambda _: None, note: Optional[Callable[[str], None]] = None,
             wait_seconds: float = JOIN_WAIT_SECONDS) -> int:
    """Evaluate the run's claimed proposals until it is finished; returns how many were evaluated.

    Waits up to `wait_seconds` for the master to start the run (it records its groups once its seed
    exists). `run_dir`: the run folder as mounted here (default: the path the run recorded, when it is there
    and no `artifacts` is given). Without a run folder the worker needs none: checkpoints come from and go to
    the run's artifact store, the one the run recorded or `artifacts` (the store as reached from here).
    `parent_pid`: leave when that process is gone, even unreaped, so a local worker never outlives
    (and holds the pipes of) the netadapt that started it. `log` gets one line per event worth telling, `note`
    (default: `log`) the line saying a trial's unreadable files made it train a proposal again."""
    study = load_study(storage, study_name)
    deadline = time.monotonic() + wait_seconds
    while GROUPS_ATTR not in study.user_attrs:  # the master writes these once its seed exists
        if time.monotonic() > deadline:
            raise UserError(f"study {study_name!r} has not started a NetAdapt run; start `mnv3-search netadapt` first")
        time.sleep(1)
    attrs = study.user_attrs
    config = RunConfig.from_json(attrs[CONFIG_ATTR], f"study {study_name}")
    recorded_dir = attrs.get(RUN_DIR_ATTR)
    location = worker_location(artifacts, attrs.get(ARTIFACTS_ATTR), recorded_dir, run_dir)
    if run_dir is None and artifacts is None and recorded_dir and \
            (location is None or RunFolder(recorded_dir).seed_checkpoint.exists()):
        # the run folder is here at its recorded path (this machine, or shared): used directly, as is the
        # only way for a run of an older mnv3-search (no artifact store)
        run_dir = recorded_dir
    folder = RunFolder(run_dir) if run_dir is not None else None
    if folder is not None and not folder.seed_checkpoint.exists():
        raise UserError(f"{folder.path}: no seed.pt here; "
                        "pass --run-dir with the run folder as mounted on this machine")
    store = RunArtifacts(location, open_store(location)) if location is not None else None
    names, max_channels = attrs[GROUPS_ATTR]
    with torch_threads(threads):
        evaluator = Evaluator(folder, config, list(names), int(max_channels), artifacts=store,
                              note=log if note is None else note)

        def should_stop() -> bool:
            if parent_pid is not None and (os.getppid() != parent_pid or process_gone(parent_pid)):
                return True  # the master died (even unreaped): an orphan would hold its caller's pipes open
            return study.user_attrs.get(STATUS_ATTR) == "finished"

        log(f"worker joined study {study_name!r}; " + (f"run folder {folder.path}" if folder is not None else
                                                      f"artifact store {location} (no run folder)"))
        try:
            done = work(study, evaluator, should_stop, claim_lock_path(storage),
                        on_trial=lambda state: log(f"proposal {state.name.lower()}"))
        except Exception as exc:  # the server restarted: its claimed trial is failed and enqueued again by the run
            lost = as_storage_lost(exc, storage, then="start the worker again to rejoin the run") or disk_full(exc)
            if lost is None:
                raise
            raise lost from None
    log(f"worker done: {done} proposals evaluated")
    return done


def start_local_workers(storage: str, study_name: str, run_dir: Path, count: int) -> list[subprocess.Popen[bytes]]:
    """`--workers N`: start `count` (N - 1) worker processes beside this one, watching this process. The
    storage URL goes in their environment, never on their command line (which any user sees with `ps`)."""
    env = {**os.environ, STORAGE_ENV: storage}
    command = [sys.executable, "-m", WORKER_MODULE, "--study", study_name, "--run-dir", str(run_dir.resolve()),
               "--parent-pid", str(os.getpid()), "--quiet"]
    return [subprocess.Popen(command, stdin=subprocess.DEVNULL, env=env) for _ in range(count)]


def stop_local_workers(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """Wait for local workers to leave (they do once the run is marked finished); kill any that hang."""
    for proc in processes:
        try:
            proc.wait(timeout=STOP_WAIT_SECONDS)
        except Exception:
            proc.kill()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """A local worker (`python -m mnv3_search.netadapt.worker`); the storage URL comes from $MNV3_SEARCH_STORAGE.
    Bad input is one line on stderr and exit status 2, as with the `mnv3-search` command."""
    parser = argparse.ArgumentParser(prog=f"python -m {WORKER_MODULE}", description=main.__doc__)
    parser.add_argument("--study", required=True, help="The run's study name.")
    parser.add_argument("--run-dir", help="The run folder as mounted here (default: the one the run recorded).")
    parser.add_argument("--parent-pid", type=int, help="Exit when this process is gone.")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads (default 1).")
    parser.add_argument("--quiet", action="store_true", help="Print nothing but errors.")
    args = parser.parse_args(argv)
    from ..train import DEVICE_ENV, resolve_device

    try:
        storage = os.environ.get(STORAGE_ENV)
        if not storage:
            raise UserError(f"no storage: set ${STORAGE_ENV} to the run's storage URL")
        # the device of the netadapt that started this worker (its environment), else auto, as `mnv3-search worker`
        device = os.environ.get(DEVICE_ENV) or "auto"
        resolve_device(device)
        os.environ[DEVICE_ENV] = device
        def say(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        join_run(storage, args.study, args.run_dir, parent_pid=args.parent_pid, threads=args.threads,
                 log=(lambda _: None) if args.quiet else say, note=say)
    except (StorageLost, StorageUnreachable) as exc:  # the server went away mid-run: a local worker's netadapt
        # loses it too (it had it open when it started this worker) and says so in its one line
        if args.parent_pid is None:
            print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
