"""Checkpoints that travel through Optuna's artifact store, so a worker needs no access to the run folder.

The leader uploads each iteration's parent network (the seed first) and records its artifact id in a study
user attribute (`artifact:<path in the run folder>`); every worker uploads the fine-tuned weights and
training state of each trial it finishes and records their ids in the trial's user attributes. The next
rung and the leader download what they need into a private temporary folder. A worker on another machine
therefore needs only the storage URL and the study name: the study records where the store is
(attrs.ARTIFACTS_ATTR: a folder, or `s3://bucket/prefix`, `gs://bucket/prefix`; never a credential, which
boto3 or the GCS client read from their usual environment).

The default store is the folder `artifacts/` in the run folder (a FileSystemArtifactStore); a worker that
sees it under another path (another mount) or uses another copy passes `--artifacts`. A process that has
the run folder still reads the run folder's own files first (same machine: no copy). A folder store on the
file's own file system gets a hard link, not a copy: a local run writes each checkpoint's bytes once, so its
peak disk use does not double (and a link appears whole or not at all).

No object outlives the run. Each upload is recorded (Optuna's own `artifacts:<id>` system attr of the study
or trial, the record optuna-dashboard lists) *before* its bytes are written, and pointed to (the user
attrs above) after. A process killed between the two leaves a recorded object that nothing points to:
a trial's is removed with the trial's other files once its iteration chose (or on resume, for the
iterations finished before the kill), a parent's by the leader's sweep when it starts or resumes and at the
end of the run. The store is never listed, so a store shared by several runs (or a bucket's other objects)
is safe: only what this run recorded is ever removed.
"""

from __future__ import annotations

import errno
import importlib
import json
import mimetypes
import os
import tempfile
import uuid
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Protocol

import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.exceptions import UpdateFinishedTrialError

from ..errors import StoreFailed, UserError
from ..fileio import disk_full
from .attrs import ARTIFACT_RECORD_PREFIX, CHECKPOINT_ATTR, PARENT_PREFIX, STATE_ATTR
from .study import storage_of, study_storage_id, trial_storage_id

DEFAULT_FOLDER = "artifacts"  # the default store's folder inside the run folder

# Test hook: a process that uploads a trial's files with this set dies (os._exit, as a SIGKILL would land)
# after the bytes are in the store and before the trial points to them, so the sweep of such orphans is
# tested with a real process death (tests/netadapt/test_s3.py). Never set outside tests.
KILL_AFTER_UPLOAD_ENV = "MNV3_SEARCH_TEST_KILL_AFTER_UPLOAD"
# Test hook: a process that downloads a checkpoint from the store with this set dies (os._exit) once the bytes
# are in its private temporary folder, before it uses them (scripts/kill_matrix.py's store-download point).
KILL_IN_DOWNLOAD_ENV = "MNV3_SEARCH_TEST_KILL_IN_DOWNLOAD"
KILL_EXIT_CODE = 86  # how a test hook's process exits (evaluate.KILL_GROUP_ENV's too)


class ArtifactStore(Protocol):
    """Optuna's artifact store protocol (optuna.artifacts._protocol is private)."""

    def open_reader(self, artifact_id: str) -> BinaryIO: ...

    def write(self, artifact_id: str, content_body: BinaryIO) -> None: ...

    def remove(self, artifact_id: str) -> None: ...


class PrefixedStore:
    """A bucket store whose objects live under `prefix/` (Optuna's bucket stores write at the bucket's root)."""

    def __init__(self, store: ArtifactStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix.strip("/")

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self.store.open_reader(f"{self.prefix}/{artifact_id}")

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.store.write(f"{self.prefix}/{artifact_id}", content_body)

    def remove(self, artifact_id: str) -> None:
        self.store.remove(f"{self.prefix}/{artifact_id}")


# scheme: (module, its pip package, Optuna's store class); credentials come from the client's own environment
BUCKETS = {"s3://": ("boto3", "boto3", "Boto3ArtifactStore"),
           "gs://": ("google.cloud.storage", "google-cloud-storage", "GCSArtifactStore")}


def default_location(run_dir: str | os.PathLike) -> str:
    return str((Path(run_dir) / DEFAULT_FOLDER).resolve())


def open_store(location: str, *, create: bool = False) -> ArtifactStore:
    """The store a location names: `s3://bucket[/prefix]` (boto3), `gs://bucket[/prefix]` (google-cloud-storage)
    or a folder (made when `create`, else it must exist). Refused in one line: a missing client library, an
    unknown scheme, a folder that is not there or cannot be made."""
    for scheme, (module, package, store_class) in BUCKETS.items():
        if location.startswith(scheme):
            bucket, _, prefix = location[len(scheme):].partition("/")
            if not bucket:
                raise UserError(f"--artifacts {location}: no bucket; write {scheme}BUCKET or {scheme}BUCKET/PREFIX")
            try:
                importlib.import_module(module)
            except ImportError:
                raise UserError(f"--artifacts {location} needs the {package} package here (pip install {package}); "
                                f"or give a folder") from None
            store: ArtifactStore = getattr(optuna.artifacts, store_class)(bucket)
            return PrefixedStore(store, prefix) if prefix.strip("/") else store
    if "://" in location:
        raise UserError(f"--artifacts {location}: unknown store; give a folder, s3://BUCKET/PREFIX or "
                        f"gs://BUCKET/PREFIX")
    path = Path(location)
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--artifacts {location}: cannot make the folder ({exc.strerror or exc})") from None
    elif not path.is_dir():
        raise UserError(f"artifact store {location}: no such folder here; pass --artifacts with the store as "
                        f"mounted on this machine")
    return FolderStore(path)


# why os.link may refuse where a copy works: another device, links not supported or not permitted there
LINK_REFUSED = {errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


class FolderStore(FileSystemArtifactStore):
    """Optuna's folder store (objects at FOLDER/ARTIFACT_ID), which can also take a file by hard link."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.folder = folder

    def put_file(self, artifact_id: str, path: Path) -> None:
        """Store the file `path` as `artifact_id`: a hard link where the folder shares its file system (one
        copy of the bytes on disk), else a copy (another device, or a file system without links)."""
        target = self.folder / artifact_id
        try:
            os.link(path, target)
        except OSError as exc:
            if exc.errno not in LINK_REFUSED:
                raise
            with open(path, "rb") as handle:
                self.write(artifact_id, handle)


def worker_location(given: Optional[str], recorded: Optional[str], recorded_run_dir: Optional[str],
                    run_dir: Optional[str | os.PathLike]) -> Optional[str]:
    """Where a worker finds the store: --artifacts, else the run's default store under --run-dir when the
    run uses its default one (the run folder mounted at another path), else the location the run recorded."""
    if given:
        return given
    if recorded and run_dir and recorded_run_dir and recorded == default_location(recorded_run_dir):
        return default_location(run_dir)
    return recorded


class RunArtifacts:
    """The run's checkpoints in one artifact store: the leader publishes parents, workers publish trials."""

    def __init__(self, location: str, store: ArtifactStore) -> None:
        self.location = location
        self.store = store
        self._swept = False  # whether this process (the leader) swept the study's orphaned parents yet

    @contextmanager
    def _answering(self, what: str) -> Iterator[None]:
        """The store's own errors as one resumable line (StoreFailed, exit 4): an S3 5xx or a refused
        connection, a folder that cannot be written; a full disk as DiskFull. A missing object is the
        caller's to handle (ArtifactNotFound, or the GCS client's NotFound)."""
        try:
            yield
        except not_found_errors():
            raise
        except store_errors() as exc:
            full = disk_full(exc)
            if full is not None:
                raise full from None
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreFailed(f"artifact store {self.location} failed {what} ({reason[:200]}); check the store (its "
                              f"service, permissions, credentials) and run the same command again") from None

    def _present(self, artifact_id: str) -> bool:
        try:
            with self._answering(f"reading artifact {artifact_id}"):
                self.store.open_reader(artifact_id).close()
        except ArtifactNotFound:
            return False
        return True

    def _upload(self, owner: optuna.Study | optuna.Trial, path: Path) -> str:
        """Optuna's upload_artifact with its two writes the other way round: the record first (the same
        `artifacts:<id>` system attr, so get_all_artifact_meta and optuna-dashboard list it), then the bytes.
        A process killed in between leaves a record of nothing (removing it is a no-op), never an object
        without a record; a trial finished meanwhile (failed by the run) refuses the record, so nothing is
        written."""
        artifact_id = str(uuid.uuid4())
        mimetype, encoding = mimetypes.guess_type(path.name)
        record = json.dumps({"artifact_id": artifact_id, "filename": path.name,
                             "mimetype": mimetype or "application/octet-stream", "encoding": encoding})
        key = ARTIFACT_RECORD_PREFIX + artifact_id
        if isinstance(owner, optuna.Trial):
            owner.storage.set_trial_system_attr(trial_storage_id(owner), key, record)
        else:
            storage_of(owner).set_study_system_attr(study_storage_id(owner), key, record)
        with self._answering(f"uploading {path.name} (artifact {artifact_id})"):
            if isinstance(self.store, FolderStore):
                self.store.put_file(artifact_id, path)
            else:
                with open(path, "rb") as handle:
                    self.store.write(artifact_id, handle)
        return artifact_id

    # -- the leader ---------------------------------------------------------------------------------------

    def publish_parent(self, study: optuna.Study, relative: str, path: Path) -> str:
        """Upload the parent network `relative` (seed.pt, iterations/NNN.pt) unless the store holds it already
        (a resumed run), record its id, and remove the earlier parents' copies (no worker needs them now).
        The first call in a process (the leader starting or resuming) also sweeps the parents a killed leader
        uploaded without recording their ids."""
        attrs = study.user_attrs
        artifact_id = attrs.get(PARENT_PREFIX + relative)
        if not (artifact_id and self._present(str(artifact_id))):
            artifact_id = self._upload(study, path)
            study.set_user_attr(PARENT_PREFIX + relative, artifact_id)  # only once the bytes are all there
        self.retire_parents(study, keep=relative, attrs=attrs)
        if not self._swept:
            self.sweep_parents(study, keep=str(artifact_id))
            self._swept = True
        return str(artifact_id)

    def retire_parents(self, study: optuna.Study, keep: Optional[str] = None,
                       attrs: Optional[dict[str, Any]] = None) -> None:
        """Remove every parent network's copy but `keep`'s from the store (once the run is done: all of them,
        with any a killed leader left without a pointer)."""
        for key, old in (study.user_attrs if attrs is None else attrs).items():
            if key.startswith(PARENT_PREFIX) and key != PARENT_PREFIX + str(keep) and old:
                self._remove(str(old))
                study.set_user_attr(key, None)
        if keep is None:
            self.sweep_parents(study)

    def sweep_parents(self, study: optuna.Study, keep: Optional[str] = None) -> int:
        """Remove every object recorded on the study (the parents' uploads) but the artifact `keep`: those no
        longer pointed to and those whose pointer was never written (a leader killed between the upload and
        the pointer). Only the leader uploads parents, so none is in flight. Retired ones are removed again
        (a no-op): a pointer, once retired, no longer says which object it named. Returns how many."""
        recorded = recorded_artifacts(storage_of(study).get_study_system_attrs(study_storage_id(study)))
        gone = [artifact_id for artifact_id in recorded if artifact_id != keep]
        for artifact_id in gone:
            self._remove(artifact_id)
        return len(gone)

    def remove_trial(self, trial: optuna.trial.FrozenTrial) -> None:
        """Delete a finished iteration's trial checkpoints from the store (as from the run folder), and for a
        finished trial whatever else it recorded: the upload of a worker killed before the trial pointed to
        it. A trial still running may be uploading now: only what it points to goes."""
        doomed = {str(trial.user_attrs[key]) for key in (CHECKPOINT_ATTR, STATE_ATTR) if trial.user_attrs.get(key)}
        if trial.state.is_finished():
            doomed.update(recorded_artifacts(trial.system_attrs))
        for artifact_id in sorted(doomed):
            self._remove(artifact_id)

    def _remove(self, artifact_id: str) -> None:
        try:
            with self._answering(f"removing artifact {artifact_id}"):
                self.store.remove(artifact_id)
        except not_found_errors():
            pass

    # -- workers -----------------------------------------------------------------------------------------

    def publish_trial(self, trial: optuna.Trial, checkpoint: Path, state: Path) -> None:
        """Upload a finished trial's weights and training state; their ids go in the trial's user attrs
        only once both are stored, so a worker killed mid-upload leaves no reference to a partial file
        (its objects are recorded on the trial: remove_trial sweeps them). When the run failed the trial
        meanwhile (its heartbeat went stale), what was uploaded is removed here: nothing will point to it."""
        ids: dict[str, str] = {}
        try:
            for key, path in ((CHECKPOINT_ATTR, checkpoint), (STATE_ATTR, state)):
                ids[key] = self._upload(trial, path)
            if os.environ.get(KILL_AFTER_UPLOAD_ENV):
                os._exit(KILL_EXIT_CODE)
            for key, artifact_id in ids.items():
                trial.set_user_attr(key, artifact_id)
        except UpdateFinishedTrialError:
            for artifact_id in ids.values():
                self._remove(artifact_id)
            raise

    @contextmanager
    def parent(self, study: optuna.Study, relative: str) -> Iterator[Path]:
        """The parent network `relative`, downloaded into a private temporary folder for the block."""
        artifact_id = study.user_attrs.get(PARENT_PREFIX + relative)
        if not artifact_id:
            raise UserError(f"study {study.study_name!r} has no artifact of its parent network {relative}; was the "
                            f"run started by an older mnv3-search? Pass --run-dir with the run folder as mounted here")
        with self._download(str(artifact_id), Path(relative).name, f"the parent network {relative}") as path:
            yield path

    @contextmanager
    def trial_files(self, study: optuna.Study, number: int) -> Iterator[tuple[Path, Path]]:
        """Trial `number`'s checkpoint and training state, downloaded for the block."""
        storage = storage_of(study)
        attrs: dict[str, Any] = storage.get_trial_user_attrs(
            storage.get_trial_id_from_study_id_trial_number(study_storage_id(study), number))
        if not (attrs.get(CHECKPOINT_ATTR) and attrs.get(STATE_ATTR)):
            raise UserError(f"trial {number} of study {study.study_name!r} has no checkpoint in the artifact store "
                            f"{self.location} nor in a run folder here")
        with self._download(str(attrs[CHECKPOINT_ATTR]), f"{number:05d}.pt", f"trial {number}'s checkpoint") as a, \
                self._download(str(attrs[STATE_ATTR]), f"{number:05d}.state.pt", f"trial {number}'s state") as b:
            yield a, b

    @contextmanager
    def _download(self, artifact_id: str, name: str, what: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="mnv3-artifact-") as folder:
            path = Path(folder) / name
            try:
                with self._answering(f"downloading {what} (artifact {artifact_id})"):
                    download_artifact(artifact_store=self.store, file_path=str(path), artifact_id=artifact_id)
            except ArtifactNotFound:
                raise UserError(f"{what} (artifact {artifact_id}) is not in the artifact store {self.location}; "
                                f"is --artifacts the run's store?") from None
            if os.environ.get(KILL_IN_DOWNLOAD_ENV):
                os._exit(KILL_EXIT_CODE)
            yield path


def recorded_artifacts(system_attrs: dict[str, Any]) -> list[str]:
    """The artifact ids Optuna's records (`artifacts:<id>` system attrs) name, in key order."""
    return [key[len(ARTIFACT_RECORD_PREFIX):] for key, value in sorted(system_attrs.items())
            if key.startswith(ARTIFACT_RECORD_PREFIX) and value]


@lru_cache(maxsize=None)
def store_errors() -> tuple[type[BaseException], ...]:
    """What a store raises when it fails rather than misses: an OSError (a folder store; boto3's refused
    connection is one too, wrapped), botocore's errors (an S3 5xx, a timeout) and the GCS client's."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped,import-not-found,unused-ignore]
        errors += [BotoCoreError, ClientError]
    except ImportError:
        pass
    try:
        from google.api_core.exceptions import GoogleAPIError  # type: ignore[import-not-found,import-untyped,unused-ignore]
        errors.append(GoogleAPIError)
    except ImportError:
        pass
    return tuple(errors)


@lru_cache(maxsize=None)
def not_found_errors() -> tuple[type[BaseException], ...]:
    """What removing an object that is not there raises: Optuna's ArtifactNotFound (a folder), or the GCS
    client's NotFound (Optuna's GCSArtifactStore passes it on); S3 deletes a missing key without a word."""
    try:
        from google.api_core.exceptions import NotFound  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return (ArtifactNotFound,)
    return (ArtifactNotFound, NotFound)


@contextmanager
def staging() -> Iterator[Path]:
    """A private temporary folder for a trial's files on their way to the store (a worker without the run
    folder)."""
    with tempfile.TemporaryDirectory(prefix="mnv3-trial-") as folder:
        yield Path(folder)
