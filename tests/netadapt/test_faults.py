"""Faults a long run meets, each one line and a run that the same command finishes (docs/reliability.md):

- a trial's training state or checkpoint damaged (trials/NNNNN.state.pt, trials/NNNNN.pt): the proposal is
  trained again from its parent to where the damaged rung had left it, said in one line; training is
  deterministic, so the run ends with the uninterrupted run's network and no proposal rung evaluated twice;
- a full disk (ENOSPC) while writing the seed's, a proposal's or the final checkpoint: one line naming the file,
  exit 4, no half-written file left; the same command afterwards finishes with the same network;
- an artifact store that stops answering (moto's S3 server stopped mid-run: connection refused) or answers
  with a server error: one line, exit 4, never a traceback; the same command afterwards finishes.

Each run is the micro network (tests/support/tiny_run.py) compared with its uninterrupted reference.
"""

from __future__ import annotations

import collections
import errno
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

import optuna
import pytest
import torch
from click.testing import CliRunner

from mnv3_search.cli import cli
from mnv3_search.model.weights import read_checkpoint
from mnv3_search.netadapt.evaluate import KILL_EXIT_CODE, KILL_GROUP_ENV
from mnv3_search.netadapt.study import make_storage
from support.postgres import free_port
from support.s3server import S3Server, _listening, moto_server_command
from support.tiny_run import MICRO_ARGS, MICRO_BUDGET, MICRO_SPEC_PATH

ENV = {k: v for k, v in os.environ.items() if not k.startswith("MNV3_SEARCH_TEST_")}


def command(out: Path, *extra: str) -> list[str]:
    return ["netadapt", str(MICRO_SPEC_PATH), "--budget", MICRO_BUDGET, "--out", str(out), *MICRO_ARGS, *extra]


def run_process(out: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mnv3_search", *command(out, *extra)], env=env, capture_output=True,
                          text=True, timeout=600)


def errors_of(output: str) -> list[str]:
    assert "Traceback" not in output, output
    return [line for line in output.splitlines() if line.startswith("Error: ")]


def study_of(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name=folder.name, storage=make_storage(str((folder / "study.journal").resolve())))


def twice(folder: Path) -> int:
    """Proposal rungs the study holds more than one finished trial of."""
    study = study_of(folder)
    done = collections.Counter((t.user_attrs.get("iteration"), t.params.get("group"), t.user_attrs.get("rung"))
                               for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE)
    return sum(n - 1 for n in done.values())


def assert_as_reference(micro_run: Path, folder: Path) -> None:
    """The uninterrupted run's final network, bit for bit, with nothing evaluated twice and nothing left over."""
    reference = micro_run
    assert (folder / "final.yaml").read_text() == (reference / "final.yaml").read_text()
    mine, theirs = read_checkpoint(folder / "final.pt")[1], read_checkpoint(reference / "final.pt")[1]
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert twice(folder) == 0
    assert not list(folder.rglob(".*.tmp"))


def spoil_store(out: Path, damage: Callable[[Path], None]) -> None:
    """Damage the store's objects in place, all but the parent networks': a local run's store holds hard links to
    the run folder's files (one copy on disk), and a damaged parent ends the run, which is another fault."""
    parents = [p for p in (out / "seed.pt", *(out / "iterations").glob("*.pt")) if p.exists()]
    for stored in (out / "artifacts").iterdir():
        if not any(stored.samefile(parent) for parent in parents):
            damage(stored)


# -- a damaged trial training state or checkpoint -------------------------------------------------------------

def test_a_damaged_trial_state_is_trained_again_from_its_parent(micro_run: Path, tmp_path: Path) -> None:
    """Killed inside iteration 1's last rung-0 proposal (every other rung-0 trial saved); every rung-0 training
    state is then truncated and one checkpoint garbled. The same command says so once per proposal it trains
    again and ends with the reference network."""
    groups = sorted({line.split(",")[2] for line in (micro_run / "proposals.csv").read_text().splitlines()[1:]
                     if line.split(",")[1] == "1"})
    out = tmp_path / "run"
    killed = run_process(out, {**ENV, KILL_GROUP_ENV: groups[-1]})
    assert killed.returncode == KILL_EXIT_CODE, killed.stderr
    states = sorted((out / "trials").glob("*.state.pt"))
    checkpoints = sorted(p for p in (out / "trials").glob("*.pt") if not p.name.endswith(".state.pt"))
    assert len(states) == len(checkpoints) == len(groups) - 1
    for path in states:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    checkpoints[0].write_bytes(b"\x00garbage" * 100)
    spoil_store(out, lambda stored: stored.write_bytes(b""))  # the store's copies too: nothing readable is left

    result = CliRunner().invoke(cli, command(out))
    assert result.exit_code == 0, (result.output, result.exception)
    notes = [line for line in result.output.splitlines() if "re-training proposal" in line]
    assert notes and all(re.match(rf"{out}/trials/\d{{5}}\.(state\.)?pt: (truncated or damaged|not a) .*; trial \d+'s "
                                  rf"copy in the artifact store .*; re-training proposal \S+=\d+ of iteration 1 from "
                                  rf"its parent network to step \d+ instead \(the same weights; nothing else is "
                                  rf"evaluated again\)$", line) for line in notes), notes
    assert len(notes) <= len(groups) - 1
    assert_as_reference(micro_run, out)


def test_a_damaged_chosen_checkpoint_is_trained_again(micro_run: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The winner's trial checkpoint, read to become iterations/001.pt, damaged just before it is read."""
    from mnv3_search.netadapt import iterative

    original = iterative._Loop._trial_checkpoint
    damaged: list[Path] = []

    def spoil_first(self: Any, chosen: optuna.trial.FrozenTrial) -> Any:
        if not damaged:
            path = self.session.folder.trial_checkpoint(chosen.number)
            path.write_bytes(path.read_bytes()[:100])
            spoil_store(self.session.folder.path, lambda stored: stored.write_bytes(stored.read_bytes()[:100]))
            damaged.append(self.session.folder.trial_checkpoint(chosen.number))
        return original(self, chosen)

    monkeypatch.setattr(iterative._Loop, "_trial_checkpoint", spoil_first)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, command(out))
    assert result.exit_code == 0, (result.output, result.exception)
    notes = [line for line in result.output.splitlines() if "re-training the chosen proposal" in line]
    assert len(notes) == 1 and notes[0].startswith(f"{damaged[0]}: truncated or damaged checkpoint ("), notes
    assert_as_reference(micro_run, out)


# -- a full disk ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, writing", [
    ("seed", lambda n: n == "seed.pt"),
    ("proposal", lambda n: n.endswith(".state.pt")),
    ("final", lambda n: n == "final.pt"),
])
def test_a_full_disk_is_one_line_and_the_same_command_finishes(micro_run: Path, name: str,
                                                               writing: Callable[[str], bool], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from the first write of that checkpoint (as the device fills up mid-file): exit 4, one line naming
    the file, no temporary file left; with space again the same command ends with the reference network."""
    import mnv3_search.fileio as fileio

    failed: list[Path] = []
    real = getattr(fileio, "write_file", None)

    def full(path: Path, data: bytes) -> None:
        target = path.name[1:].rsplit(".", 2)[0]  # .NAME.xxxxxxxx.tmp -> NAME
        if not failed and writing(target):
            failed.append(path.parent / target)
            path.write_bytes(data[: len(data) // 3])  # part of it reached the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        assert real is not None
        real(path, data)

    monkeypatch.setattr(fileio, "write_file", full, raising=False)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, command(out))
    assert result.exit_code == 4, (result.output, result.exception)
    assert errors_of(result.output) == [f"Error: no space left on device writing {failed[0]}: free space and run the "
                                        f"same command again"]
    assert not failed[0].exists() and not list(out.rglob(".*.tmp"))
    if name == "proposal":  # its rung waits again as the same attempt (evaluate.enqueue_again): a worker's full disk
        # must not drop the proposal from an iteration its leader goes on with, nor count toward giving it up
        trials = study_of(out).get_trials(deepcopy=False)
        lost, = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
        again = [t for t in trials if t.state == optuna.trial.TrialState.WAITING and t.user_attrs.get("retry_of") ==
                 lost.number and t.user_attrs.get("attempt", 1) == lost.user_attrs.get("attempt", 1)]
        assert len(again) == 1, [(t.number, t.state, t.user_attrs) for t in trials]

    monkeypatch.setattr(fileio, "write_file", real)
    again = CliRunner().invoke(cli, command(out))
    assert again.exit_code == 0, (again.output, again.exception)
    assert_as_reference(micro_run, out)


# -- an artifact store that fails ---------------------------------------------------------------------------

def start_moto(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([*moto_server_command(), "-H", "127.0.0.1", "-p", str(port)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not _listening(port):
        assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
        time.sleep(0.1)
    return proc


def test_a_store_that_stops_answering_is_one_line_and_resumable(micro_run: Path, tmp_path: Path) -> None:
    """moto's S3 server stopped once three proposals are saved: the next upload's connection is refused. The
    server comes back empty (a new process), as a store restored elsewhere would: the resumed run uploads its
    parent again and finishes with the reference network, leaving the bucket empty."""
    port = free_port()
    server = S3Server(f"http://127.0.0.1:{port}")
    env = {**ENV, **server.env(), "AWS_MAX_ATTEMPTS": "2"}
    out = tmp_path / "run"
    moto = start_moto(port)
    try:
        server.bucket("runs")
        args = [sys.executable, "-m", "mnv3_search", *command(out, "--artifacts", "s3://runs/run1")]
        leader = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while len(list((out / "trials").glob("*.state.pt"))) < 3 if (out / "trials").exists() else True:
            assert leader.poll() is None and time.monotonic() < deadline, leader.communicate()
            time.sleep(0.05)
        moto.terminate()
        moto.wait()
        stdout, stderr = leader.communicate(timeout=300)
        assert leader.returncode == 4, stderr
        line, = errors_of(stderr)
        assert re.match(r"Error: artifact store s3://runs/run1 failed (uploading|reading|removing|downloading) .*\(.*"
                        r"\); check the store \(its service, permissions, credentials\) and run the same command "
                        r"again$", line), line
        moto = start_moto(port)
        server.bucket("runs")
        again = run_process(out, env, "--artifacts", "s3://runs/run1")
        assert again.returncode == 0, again.stderr
        assert_as_reference(micro_run, out)
        assert server.keys("runs") == []
    finally:
        moto.terminate()
        moto.wait()


class ServerErrors:
    """A store whose every call answers as an S3 endpoint in trouble does: HTTP 500 InternalError."""

    def _fail(self, operation: str) -> None:
        from botocore.exceptions import ClientError

        raise ClientError({"Error": {"Code": "InternalError", "Message": "We encountered an internal error."},
                           "ResponseMetadata": {"HTTPStatusCode": 500}}, operation)

    def open_reader(self, artifact_id: str) -> BinaryIO:
        self._fail("GetObject")
        return io.BytesIO()

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self._fail("PutObject")

    def remove(self, artifact_id: str) -> None:
        self._fail("DeleteObject")


@pytest.mark.slow
def test_a_store_answering_500_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 answering 500 to every request (moto cannot be made to): exit 4 and one line, before any proposal."""
    from mnv3_search.netadapt import session

    monkeypatch.setattr(session, "open_store", lambda location, create=False: ServerErrors())
    result = CliRunner().invoke(cli, command(tmp_path / "run"))
    assert result.exit_code == 4, (result.output, result.exception)
    line, = errors_of(result.output)
    store = tmp_path / "run" / "artifacts"
    assert line.startswith(f"Error: artifact store {store} failed uploading seed.pt (artifact ") and \
        "An error occurred (InternalError) when calling the PutObject operation" in line, line
