"""The artifact store on S3, for real: moto's S3 server (tests/support/s3server.py) reached over HTTP by boto3,
credentials and endpoint in the processes' environment as a user gives them.

- A leader and a worker on "two machines" share only a PostgreSQL database and a bucket: the worker runs the
  command of the cluster recipes (deploy/), in its own folder, in a mount namespace where the leader's folder is
  an empty tmpfs (it cannot read the run folder even by accident). Its first process is killed between its upload
  and the trial's pointers (the test hook MNV3_SEARCH_TEST_KILL_AFTER_UPLOAD), and started again as systemd or
  Kubernetes would; the run ends with the one-process run's choices and network, and the bucket empty.
- A killed upload leaves no pointer, and its orphan is swept: a parent by the resumed leader, a trial's with its
  iteration's clean-up, a running trial's never (its worker may be uploading it now).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

import optuna
import pandas as pd
import pytest
import torch
import yaml
from optuna.artifacts import get_all_artifact_meta
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from support.dashboard import dashboard_trials, running_dashboard
from mnv3_search.model.weights import read_checkpoint
from mnv3_search.netadapt.artifacts import (KILL_AFTER_UPLOAD_ENV, KILL_EXIT_CODE, RunArtifacts, open_store,
                                           recorded_artifacts)
from mnv3_search.netadapt.attrs import (ARTIFACTS_ATTR, CHECKPOINT_ATTR, FAILURE_ATTR, GROUP_PARAM, ITERATION_ATTR,
                                        RUNG_ATTR, STATE_ATTR, WORKER_ATTR)
from mnv3_search.netadapt.evaluate import KILL_GROUP_ENV
from mnv3_search.netadapt.study import STORAGE_ENV, create_study, make_storage, storage_of, trial_storage_id
from support.s3server import S3Server
from support.tiny_run import MICRO_ARGS, MICRO_BUDGET, MICRO_SPEC_PATH

REPO = Path(__file__).resolve().parents[2]
KUBERNETES_JOB = REPO / "deploy" / "kubernetes" / "worker-job.yaml"
SYSTEMD_UNIT = REPO / "deploy" / "systemd" / "mnv3-search-worker@.service"
STUDY = "run"  # the leader's run folder name, so its study's


# -- the cluster recipes' worker command, as each system expands it ---------------------------------------------

def kubernetes_container() -> dict[str, Any]:
    jobs = [doc for doc in yaml.safe_load_all(KUBERNETES_JOB.read_text()) if doc and doc.get("kind") == "Job"]
    assert len(jobs) == 1, KUBERNETES_JOB
    containers = jobs[0]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, containers
    return dict(containers[0])


def kubernetes_worker_command(env: dict[str, str]) -> list[str]:
    """The Job's container command and args, each $(NAME) replaced as Kubernetes does: by the value of a
    variable the container declares (here taken from `env`, as the test provides it)."""
    container = kubernetes_container()
    declared = {entry["name"] for entry in container.get("env", [])}

    def value(match: re.Match[str]) -> str:
        assert match[1] in declared, f"{KUBERNETES_JOB}: $({match[1]}) is not in the container's env"
        return env[match[1]]

    return [re.sub(r"\$\((\w+)\)", value, str(word)) for word in [*container["command"], *container.get("args", [])]]


def systemd_worker_command(env: dict[str, str]) -> list[str]:
    """The unit's ExecStart, split and its ${NAME}s replaced as systemd does (one word each)."""
    lines = [line for line in SYSTEMD_UNIT.read_text().splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, lines
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m[1]], word) for word in shlex.split(lines[0][len("ExecStart="):])]


def test_the_systemd_unit_and_the_kubernetes_job_run_one_command() -> None:
    env = {"CREDENTIALS_DIRECTORY": "/run/credentials/x", "MNV3_STUDY": "small-70pct-seed0"}
    k8s, systemd = kubernetes_worker_command(env), systemd_worker_command(env)
    assert Path(systemd[0]).name == k8s[0] == "mnv3-search" and systemd[1:] == k8s[1:]
    assert k8s[1] == "worker" and "/run/credentials/x/storage-url" in k8s and "small-70pct-seed0" in k8s
    # the storage URL file is where each system puts it: systemd's credential, Kubernetes' mounted secret
    assert "LoadCredential=storage-url:/etc/mnv3-search/storage-url" in SYSTEMD_UNIT.read_text().splitlines()
    container = kubernetes_container()
    folder = next(e["value"] for e in container["env"] if e["name"] == "CREDENTIALS_DIRECTORY")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == folder)
    job = next(d for d in yaml.safe_load_all(KUBERNETES_JOB.read_text()) if d and d.get("kind") == "Job")
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert "secret" in volume, volume
    # exit 2 (bad input) is not retried, exit 4 (the database went away) is
    assert "RestartPreventExitStatus=2" in SYSTEMD_UNIT.read_text().splitlines()
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert [(r["action"], r["onExitCodes"]["values"]) for r in rules] == [("FailJob", [2])]


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
    result = CliRunner().invoke(cli, ["netadapt", str(MICRO_SPEC_PATH), "--budget", MICRO_BUDGET, "--out",
                                      str(tmp_path / "run"), *MICRO_ARGS, "--artifacts", "s3://bucket/runs"])
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("spec:")]
    assert result.exit_code == 2 and lines == ["Error: --artifacts s3://bucket/runs needs the boto3 package here "
                                               "(pip install boto3); or give a folder"], result.output
    assert not (tmp_path / "run").exists()


# -- a leader and a worker that share only PostgreSQL and a bucket ----------------------------------------------

def hidden(folder: Path) -> list[str]:
    """A command prefix that runs its command where `folder` is an empty tmpfs (a mount namespace of its own):
    another machine, as far as that folder goes. As root here (and in CI); elsewhere in a user namespace."""
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--mount", "--propagation", "private", "--", "sh", "-c",
            'mount -t tmpfs tmpfs "$0" && exec "$@"', str(folder)]


def can_hide() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*hidden(REPO / "deploy"), "test", "!", "-e", str(KUBERNETES_JOB)], capture_output=True)
    return probe.returncode == 0


def wait_for_study(url: str, leader: subprocess.Popen[str], log: Path) -> None:
    """Workers start once the leader has created the study (the recipes say: after `netadapt` started)."""
    deadline = time.monotonic() + 300
    while STUDY not in [s.study_name for s in optuna.get_all_study_summaries(make_storage(url))]:
        assert leader.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the leader made no study in 300 s"
        time.sleep(0.5)


def left(folder: Path) -> list[str]:
    """What a process left in `folder`: files, and folders of ours (empty ones of torch's are not counted)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.name.startswith("mnv3-"))


def start(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[str]:
    with log.open("w") as err:
        return subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, text=True)


def test_a_leader_and_a_worker_share_only_postgresql_and_a_bucket(micro_run: Path, postgres_url: str, s3: S3Server,
                                                                  tmp_path: Path) -> None:
    if not can_hide():
        pytest.skip("no mount namespaces here (unshare --mount): the worker would see the leader's folder")
    bucket = s3.bucket("leader-and-worker")
    store = f"s3://{bucket}/run1"
    leader_dir, worker_dir = tmp_path / "leader", tmp_path / "worker"
    out, credentials = leader_dir / STUDY, worker_dir / "credentials"
    tmp = {name: worker_dir / f"tmp-{name}" for name in ("killed", "again")}  # each start its own, as PrivateTmp=
    for folder in (leader_dir, credentials, *tmp.values()):
        folder.mkdir(parents=True)
    base = {k: v for k, v in os.environ.items() if k not in (STORAGE_ENV, KILL_GROUP_ENV, KILL_AFTER_UPLOAD_ENV)}
    base["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", "")])  # the venv's commands
    procs: list[subprocess.Popen[str]] = []
    url = postgres_url
    (credentials / "storage-url").write_text(url + "\n")
    (credentials / "storage-url").chmod(0o600)
    recipe = {"CREDENTIALS_DIRECTORY": str(credentials), "MNV3_STUDY": STUDY}
    worker = [*hidden(leader_dir), *kubernetes_worker_command(recipe)]  # the recipes' command (checked above)
    worker_env = {**base, **s3.env(), **recipe}
    logs = {name: tmp_path / f"{name}.log" for name in ("leader", "killed", "again")}
    leader = start([sys.executable, "-m", "mnv3_search", "netadapt", str(MICRO_SPEC_PATH), "--budget",
                    MICRO_BUDGET, "--out", str(out), *MICRO_ARGS, "--storage", url, "--artifacts", store],
                   {**base, **s3.env()}, leader_dir, logs["leader"])
    procs.append(leader)
    try:
        wait_for_study(url, leader, logs["leader"])
        config = tmp_path / "dashboard.toml"  # the storage URL off the command line, as docs/cluster.md says
        config.write_text(f'[optuna_dashboard]\nstorage = "{url}"\n')
        with running_dashboard("--from-config", str(config)) as dashboard:  # watching the run
            # the first worker dies between its first upload and the trial's pointers; started again, as
            # systemd or Kubernetes would, it works until the run is finished
            killed = start(worker, {**worker_env, "TMPDIR": str(tmp["killed"]), KILL_AFTER_UPLOAD_ENV: "1"},
                           worker_dir, logs["killed"])
            procs.append(killed)
            killed.wait(timeout=600)
            again = start(worker, {**worker_env, "TMPDIR": str(tmp["again"])}, worker_dir, logs["again"])
            procs.append(again)
            again.wait(timeout=600)
            leader.wait(timeout=600)
            shown = dashboard_trials(dashboard, STUDY)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    leader_err, killed_err, again_err = (logs[name].read_text() for name in ("leader", "killed", "again"))
    assert leader.returncode == 0, leader_err
    assert killed.returncode == KILL_EXIT_CODE, killed_err
    assert again.returncode == 0, again_err
    for err in (killed_err, again_err):  # neither saw the run folder: checkpoints came from the bucket
        assert f"worker joined study '{STUDY}'; artifact store {store} (no run folder)" in " ".join(err.split())
    study = optuna.load_study(study_name=STUDY, storage=make_storage(url))
    trials, recorded_store = study.get_trials(), study.user_attrs[ARTIFACTS_ATTR]
    assert recorded_store == store
    # the killed worker's trial: failed as its process died, its two uploads recorded, no pointer to them
    name = f"{socket.gethostname()}:{killed.pid}"
    lost = [t for t in trials if t.user_attrs.get(WORKER_ATTR) == name]
    assert [t.state for t in lost] == [TrialState.FAIL] and CHECKPOINT_ATTR not in lost[0].user_attrs, lost
    assert str(lost[0].user_attrs[FAILURE_ATTR]).startswith(f"worker {name} died")
    assert len(recorded_artifacts(lost[0].system_attrs)) == 2
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    by = Counter(str(t.user_attrs[WORKER_ATTR]) for t in complete)
    assert set(by) <= {f"{socket.gethostname()}:{p.pid}" for p in (leader, again)}, by
    rungs = Counter((t.user_attrs[ITERATION_ATTR], t.params[GROUP_PARAM], t.user_attrs[RUNG_ATTR]) for t in complete)
    assert max(rungs.values()) == 1  # no proposal rung evaluated twice to completion
    assert [(t["number"], t["state"]) for t in shown] == [(t.number, t.state.name.capitalize()) for t in trials]
    # nothing left in the bucket: the trials' files, the killed upload's orphans, the parents
    assert s3.keys(bucket) == []
    # the worker's downloads and uploads are gone (torch leaves an empty torchinductor_<user>/), but for the
    # staging folder of the upload its killed process was making (the kill skips all clean-up, as a SIGKILL;
    # systemd's PrivateTmp= and a pod's own file system drop it with the process)
    assert left(tmp["again"]) == [] and len(left(tmp["killed"])) == 3, left(tmp["killed"])
    staged = tmp["killed"] / left(tmp["killed"])[0]
    assert staged.name.startswith("mnv3-trial-") and sorted(p.name for p in staged.iterdir()) == \
        [f"{lost[0].number:05d}.pt", f"{lost[0].number:05d}.state.pt"]
    reference = micro_run
    mine, one = pd.read_csv(out / "iterations.csv"), pd.read_csv(reference / "iterations.csv")
    assert mine["proposal"].tolist() == one["proposal"].tolist()
    assert mine["holdout_accuracy"].tolist() == one["holdout_accuracy"].tolist()
    assert (out / "final.yaml").read_text() == (reference / "final.yaml").read_text()
    weights, expected = read_checkpoint(out / "final.pt")[1], read_checkpoint(reference / "final.pt")[1]
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
