"""The artifact store on S3, for real: moto's S3 server (tests/s3server.py) reached over HTTP by boto3, credentials
and endpoint in the processes' environment as a user gives them.

- A killed upload leaves no pointer, and its orphan is swept: a parent by the resumed leader, a trial's with its
  iteration's clean-up, a running trial's never (its worker may be uploading it now).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, BinaryIO

import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from mnv3_search.netadapt.artifacts import CHECKPOINT_ATTR, STATE_ATTR, RunArtifacts, open_store
from mnv3_search.netadapt.study import create_study, storage_of, trial_storage_id
from s3server import S3Server
from tiny_run import MICRO_ARGS, MICRO_BUDGET, micro_spec_path

STUDY = "run"


# -- a killed upload's orphan ------------------------------------------------------------------------------------

class FailedWhileWriting:
    """The bucket as seen by a worker whose trial the run fails (its heartbeat stale) while the bytes travel."""

    def __init__(self, store: Any, trial: optuna.Trial) -> None:
        self.store, self.trial = store, trial

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self.store.open_reader(artifact_id)  # type: ignore[no-any-return]

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.store.write(artifact_id, content_body)
        storage_of(self.trial.study).set_trial_state_values(trial_storage_id(self.trial), state=TrialState.FAIL)

    def remove(self, artifact_id: str) -> None:
        self.store.remove(artifact_id)


def test_a_killed_upload_leaves_no_pointer_and_is_swept(s3: S3Server, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3.bucket("sweep")
    location = f"s3://{bucket}/run1"
    files = {name: tmp_path / name for name in ("seed.pt", "001.pt", "trial.pt", "trial.state.pt")}
    for name, path in files.items():
        path.write_bytes(name.encode() * 1000)
    study = create_study(str(tmp_path / "study.journal"), STUDY)

    def objects() -> list[str]:  # the whole bucket, every key under the run's prefix
        keys = s3.keys(bucket)
        assert all(key.startswith("run1/") for key in keys), keys
        return sorted(key.removeprefix("run1/") for key in keys)

    # the first leader publishes the seed, then dies uploading iteration 1's network: bytes in, no pointer
    first = RunArtifacts(location, open_store(location))
    seed = first.publish_parent(study, "seed.pt", files["seed.pt"])
    lost_parent = first._upload(study, files["001.pt"])
    assert "artifact:iterations/001.pt" not in study.user_attrs
    # workers: one died between its uploads and its pointers (failed by the run since), one finished, one is
    # still uploading
    died, done, busy = study.ask(), study.ask(), study.ask()
    lost_trial = [first._upload(died, files["trial.pt"]), first._upload(died, files["trial.state.pt"])]
    first.publish_trial(done, files["trial.pt"], files["trial.state.pt"])
    in_flight = first._upload(busy, files["trial.pt"])
    study.tell(done, 0.5)
    storage_of(study).set_trial_state_values(trial_storage_id(died), state=TrialState.FAIL)
    frozen = {t.number: t for t in study.get_trials()}
    assert CHECKPOINT_ATTR not in frozen[died.number].user_attrs  # no pointer to the lost files
    pointed = [frozen[done.number].user_attrs[key] for key in (CHECKPOINT_ATTR, STATE_ATTR)]
    # Optuna's record of each upload, written before its bytes: what optuna-dashboard lists, and the sweep reads
    assert {m.artifact_id for m in get_all_artifact_meta(frozen[died.number], storage=storage_of(study))} == \
        set(lost_trial)
    assert objects() == sorted([seed, lost_parent, *lost_trial, *pointed, in_flight])

    # the resumed leader uploads iteration 1's network again, retires the seed and sweeps the lost copy
    leader = RunArtifacts(location, open_store(location))
    parent = leader.publish_parent(study, "iterations/001.pt", files["001.pt"])
    assert parent != lost_parent and objects() == sorted([parent, *lost_trial, *pointed, in_flight])
    # the iteration's clean-up: a finished trial's files go, pointed to or not; the running trial's stays
    for t in study.get_trials():
        leader.remove_trial(t)
    assert objects() == sorted([parent, in_flight])
    # killed again, uploading iteration 2's network; resumed with only the final fine-tune left, so no parent
    # is published: the end of the run removes every parent, the lost one too
    lost_again = leader._upload(study, files["001.pt"])
    assert objects() == sorted([parent, lost_again, in_flight])
    RunArtifacts(location, open_store(location)).retire_parents(study)
    assert objects() == [in_flight]

    # a worker whose trial the run fails while its checkpoint is on the wire: the checkpoint is removed, the
    # training state never written (the failed trial refuses its record), and the worker hears why
    late = study.ask()
    racing = RunArtifacts(location, FailedWhileWriting(open_store(location), late))
    with pytest.raises(UpdateFinishedTrialError):
        racing.publish_trial(late, files["trial.pt"], files["trial.state.pt"])
    assert objects() == [in_flight]


def test_a_bucket_store_without_its_client_library_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """boto3 is an extra ([s3]): `--artifacts s3://...` without it is refused before anything is written."""
    from click.testing import CliRunner

    from mnv3_search.cli import cli

    monkeypatch.setitem(sys.modules, "boto3", None)  # `import boto3` now fails, as where it is not installed
    result = CliRunner().invoke(cli, ["netadapt", str(micro_spec_path()), "--budget", MICRO_BUDGET, "--out",
                                      str(tmp_path / "run"), *MICRO_ARGS, "--artifacts", "s3://bucket/runs"])
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("spec:")]
    assert result.exit_code == 2 and lines == ["Error: --artifacts s3://bucket/runs needs the boto3 package here "
                                               "(pip install boto3); or give a folder"], result.output
    assert not (tmp_path / "run").exists()
