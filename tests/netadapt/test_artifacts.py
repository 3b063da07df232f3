"""Workers without a shared disk: checkpoints travel through Optuna's artifact store (netadapt/artifacts.py).

A worker on "another machine" is a real `mnv3-search worker` process in its own empty folder, given only the
storage URL, the study name and the artifact store as it reaches it; a Python audit hook in that process
records every file operation under the run folder, so a worker that read or wrote the run folder fails the
test instead of passing by the luck of a shared disk.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
from click.testing import CliRunner

from mnv3_search.cli import cli
from mnv3_search.netadapt.attrs import ARTIFACTS_ATTR, CHECKPOINT_ATTR, STATE_ATTR
from mnv3_search.netadapt.study import make_storage
from support.tiny_run import MICRO_ARGS, MICRO_BUDGET, MICRO_SPEC_PATH

REPO = Path(__file__).resolve().parents[2]
# `python -c AUDITED FORBIDDEN LOG mnv3-search-args...`: the real CLI, with every file operation on a path
# under FORBIDDEN (the run folder) appended to LOG
AUDITED = r"""
import os, sys
forbidden, log = os.path.realpath(sys.argv[1]), sys.argv[2]
EVENTS = {"open", "os.listdir", "os.scandir", "os.mkdir", "os.remove", "os.rename", "os.rmdir", "shutil.rmtree"}
def hook(event, args):
    if event in EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        if path == forbidden or path.startswith(forbidden + os.sep):
            with open(log, "a") as handle:
                handle.write(f"{event} {path}\n")
sys.addaudithook(hook)
sys.argv = ["mnv3-search", *sys.argv[3:]]
from mnv3_search.cli.main import main
main()
"""


def netadapt_command(out: Path, *extra: str) -> list[str]:
    """micro_run's run as a command (the same settings, so the same choices and network)."""
    return [sys.executable, "-m", "mnv3_search", "netadapt", str(MICRO_SPEC_PATH), "--budget", MICRO_BUDGET,
            "--out", str(out), *MICRO_ARGS, *extra]


def one_error_line(result, exit_code: int = 2) -> str:
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("spec:")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_a_worker_without_the_run_folder_completes_proposals_on_postgresql(micro_run: Path, postgres_url: str,
                                                                          tmp_path: Path) -> None:
    """The run keeps its artifact store outside its folder; the worker runs in an empty folder of its own, reaches
    the store through another path (a mount) and never touches the run folder; it evaluates proposals, the run
    makes the one-process run's choices and network, and no checkpoint is left in the store."""
    out, store, mount, alone = tmp_path / "run", tmp_path / "store", tmp_path / "mnt", tmp_path / "worker"
    private, opened = alone / "tmp", tmp_path / "run-folder-operations.log"
    private.mkdir(parents=True)
    mount.symlink_to(store, target_is_directory=True)
    url = postgres_url
    log = tmp_path / "master.log"
    master = subprocess.Popen(netadapt_command(out, "--storage", url, "--artifacts", str(store)),
                              stdout=subprocess.DEVNULL, stderr=log.open("w"))
    worker = None
    try:
        deadline = time.monotonic() + 300
        while "run" not in [s.study_name for s in optuna.get_all_study_summaries(make_storage(url))]:
            assert master.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(private)}
        worker = subprocess.Popen([sys.executable, "-c", AUDITED, str(out), str(opened), "worker", "--storage", url,
                                   "--study", "run", "--artifacts", str(mount), "--quiet"], cwd=alone, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, worker_err = worker.communicate(timeout=600)
        assert master.wait(timeout=600) == 0, log.read_text()
    finally:
        for proc in (master, worker):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
    assert worker is not None and worker.returncode == 0, worker_err
    assert not opened.exists(), opened.read_text()  # the worker never touched the run folder
    study = optuna.load_study(study_name="run", storage=make_storage(url))
    assert study.user_attrs[ARTIFACTS_ATTR] == str(store)
    complete = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    by_worker = pd.Series([t.user_attrs["worker"] for t in complete]).value_counts()
    assert set(by_worker.index) == {f"{socket.gethostname()}:{master.pid}", f"{socket.gethostname()}:{worker.pid}"}
    assert by_worker.sum() == len(complete) and by_worker.min() >= 1, by_worker  # both evaluated proposals
    assert all(t.user_attrs[CHECKPOINT_ATTR] and t.user_attrs[STATE_ATTR] for t in complete)
    # the store is emptied as the run goes (trials once their iteration chose, parents once superseded)
    assert sorted(p.name for p in store.iterdir()) == []
    # the worker's downloads and uploads are gone (torch leaves an empty torchinductor_<user>/ there)
    assert [p.name for p in alone.rglob("*") if p.is_file() or p.name.startswith("mnv3-")] == []
    assert not (out / "artifacts").exists() and not any((out / "trials").iterdir())
    reference = micro_run
    mine, one = pd.read_csv(out / "iterations.csv"), pd.read_csv(reference / "iterations.csv")
    assert mine["proposal"].tolist() == one["proposal"].tolist()
    assert mine["holdout_accuracy"].tolist() == one["holdout_accuracy"].tolist()
    assert (out / "final.yaml").read_text() == (reference / "final.yaml").read_text()
    # a resumed run keeps its store: another --artifacts is refused in one line, before anything is written
    line = one_error_line(CliRunner().invoke(cli, ["netadapt", "--resume", str(out), "--quiet", "--artifacts",
                                                   str(tmp_path / "other")]))
    assert line == f"Error: {out}: --artifacts {tmp_path / 'other'} differs from this run's artifact store " \
                   f"{store} (run.json); leave --artifacts out to go on with it"
    assert not (tmp_path / "other").exists()
    # without --artifacts a worker uses the store the run recorded (here beside the run folder, which it would
    # use directly); a store it cannot reach is one line
    store.rename(tmp_path / "elsewhere")
    line = one_error_line(CliRunner().invoke(cli, ["worker", "--storage", url, "--study", "run"]))
    assert line == f"Error: artifact store {store}: no such folder here; pass --artifacts with the store as " \
                   f"mounted on this machine"


def publish_one_trial(folder: Path) -> tuple[Path, Path, Path]:
    """A trial's two files in a run folder published to the run's default store: (checkpoint, state, store)."""
    from mnv3_search.netadapt.artifacts import RunArtifacts, default_location, open_store

    (folder / "trials").mkdir(parents=True)
    checkpoint, state = folder / "trials" / "00000.pt", folder / "trials" / "00000.state.pt"
    checkpoint.write_bytes(os.urandom(4096))
    state.write_bytes(os.urandom(1024))
    location = default_location(folder)
    trial = optuna.create_study(storage=make_storage(str(folder / "study.journal"))).ask()
    RunArtifacts(location, open_store(location, create=True)).publish_trial(trial, checkpoint, state)
    store = Path(location)
    assert (store / trial.user_attrs[CHECKPOINT_ATTR]).read_bytes() == checkpoint.read_bytes()
    assert (store / trial.user_attrs[STATE_ATTR]).read_bytes() == state.read_bytes()
    return checkpoint, state, store


def test_a_local_run_writes_a_trials_bytes_once(tmp_path: Path) -> None:
    """The default store (artifacts/ in the run folder) holds a trial's files as hard links to the run folder's:
    one copy of the bytes on disk, so a local run's peak disk use does not double."""
    checkpoint, state, store = publish_one_trial(tmp_path / "run")
    stored = {p.stat().st_ino for p in store.iterdir()}
    assert stored == {checkpoint.stat().st_ino, state.stat().st_ino}
    assert checkpoint.stat().st_nlink == state.stat().st_nlink == 2


def test_a_store_on_another_file_system_gets_a_copy(tmp_path: Path, monkeypatch) -> None:
    """Where the store's folder cannot link the file (another device: EXDEV), the bytes are copied."""
    import errno

    from mnv3_search.netadapt import artifacts

    def across_devices(source: object, target: object) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(artifacts.os, "link", across_devices)
    checkpoint, state, store = publish_one_trial(tmp_path / "run")
    assert {p.stat().st_nlink for p in store.iterdir()} == {1}
    assert checkpoint.stat().st_nlink == state.stat().st_nlink == 1
