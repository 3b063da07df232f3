"""A run session: everything a shape search works with, built once and complete before the search starts.

`RunPlan` is the run as asked, checked before anything is written (settings parsed, data and seed shape
loaded). `start_folder` creates or resumes its run folder (run.json: refusing other settings, resolving the
storage the run recorded). `RunSession.start` then opens the study, trains or loads the seed and writes the
seed's row, so a `ShapeSearch` gets one object whose every part is there: folder, study, pricing (the latency
table), dataset, seed network and metrics, the budget's seed figure and target.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, Optional, Protocol

import optuna
import torch

from ..budget import Budget, Schedule, parse_budget, parse_schedule
from ..data import Dataset
from ..errors import UserError
from ..latency import make_backend
from ..latency import LatencyTable, open_for_run, table_record
from ..prune.variants import calibration_companions
from ..model.build import build_model
from ..model.counts import spec_macs, spec_params
from ..model.weights import read_state_dict, transfer_state_dict
from ..spec.arch import ArchSpec
from ..spec.spaces import resolve_spec_path
from ..spec.yaml_io import load_spec
from ..train import holdout_metrics, to_memory_format, train_epochs
from .artifacts import RunArtifacts, default_location, open_store
from .config import RunConfig
from .confirm import Confirmer
from .evaluate import load_run_dataset
from .events import Event
from .pricing import BudgetCheck, Pricing
from .runfolder import IterationRecord, RunFolder, RunResult
from .selection import tolerance
from .study import create_study, redact, redact_argv, resolve_storage


def default_run_name(config: RunConfig, spec: ArchSpec) -> str:
    """The same command gives the same folder, so running it again resumes."""
    budget = "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in config.budget.replace("%", "pct"))
    return f"{spec.name}-{budget}-seed{config.seed}"


def versions() -> dict[str, str]:
    import onnxruntime

    return {"python": platform.python_version(), "torch": torch.__version__, "optuna": optuna.__version__,
            "onnxruntime": onnxruntime.__version__}


@dataclass(frozen=True)
class RunPlan:
    """A run as asked: its settings parsed, its data and seed shape loaded, its folder named; nothing written."""

    config: RunConfig
    budget: Budget
    schedule: Schedule
    spec_file: Path
    seed_spec: ArchSpec
    dataset: Dataset
    folder: RunFolder
    storage_url: Optional[str]  # as given; a resumed run may go on with the one run.json recorded
    artifacts: Optional[str]  # --artifacts as given, a folder made absolute
    command: list[str]  # run.json keeps it: never a password

    @classmethod
    def make(cls, config: RunConfig, out: Optional[str] = None, storage: Optional[str] = None, workers: int = 1,
             artifacts: Optional[str] = None, command: Optional[list[str]] = None) -> "RunPlan":
        """Every check that needs no run folder, in the order a user meets them."""
        budget = parse_budget(config.budget)
        schedule = parse_schedule(config.schedule)
        path = resolve_spec_path(config.spec_path)
        base = load_spec(path)
        dataset = load_run_dataset(config)
        seed_spec = base.with_overrides(resolution=config.resolution,
                                        num_classes=config.num_classes or dataset.num_classes,
                                        where=f"{path} with the given options").scaled()
        if config.weights:
            transfer_state_dict(read_state_dict(config.weights), build_model(seed_spec), config.weights,
                                f"{path} (with {seed_spec.num_classes} classes)")
        folder = RunFolder(out or Path("results") / default_run_name(config, seed_spec))
        # --artifacts: where checkpoints travel to and from workers (artifacts.py); default artifacts/ in the run
        # folder. A bucket is checked now (its client library), a folder made when the run folder is
        if artifacts and "://" in artifacts:
            open_store(artifacts)
        if config.method == "knapsack":
            given = [f"--workers {workers}"] * (workers > 1) + ["--storage"] * bool(storage) + \
                ["--artifacts"] * bool(artifacts)
            if given:
                raise UserError(f"--method knapsack scores every channel once in this process and keeps no Optuna "
                                f"study: {' and '.join(given)} has nothing to do; leave it out")
        given_artifacts = artifacts if not artifacts or "://" in artifacts else str(Path(artifacts).resolve())
        return cls(config, budget, schedule, path, seed_spec, dataset, folder, storage, given_artifacts,
                   redact_argv(command or sys.argv))


class StartedFolder(NamedTuple):
    """What creating or resuming the run folder decided: the storage and study to use (None for a knapsack
    run, which keeps no study), and the artifact store."""

    storage_url: Optional[str]
    study_name: str
    artifacts: Optional[RunArtifacts]


def start_folder(plan: RunPlan, emit: Event) -> StartedFolder:
    """Create the run folder and its run.json, or resume the run it holds: the same settings (but RESUMABLE
    ones), the storage, study and artifact store it recorded."""
    config, folder = plan.config, plan.folder
    folder.prepare()
    previous = folder.read_run_json()
    storage_url = plan.storage_url
    study_name = folder.path.resolve().name  # the folder's name when the run starts; run.json keeps it
    if previous is not None:
        old = RunConfig.from_json(previous.get("config", {}), str(folder.run_json))
        diffs = config.differences(old)
        if diffs:
            raise UserError(f"{folder.path}: holds a run with other settings ({'; '.join(diffs[:3])}); "
                            f"use another --out or the same options to resume it")
        if old.as_json() != config.as_json():  # a changed RESUMABLE limit: run.json records the new one
            folder.write_run_json({**previous, "config": config.as_json()})
        recorded = previous.get("storage")
        if recorded and recorded.endswith(os.sep + "study.journal") and recorded != folder.default_storage_url:
            recorded = folder.default_storage_url  # a moved or copied folder: its own journal, not the old one's
        storage_url = resolve_storage(storage_url, recorded)
        study_name = str(previous.get("study") or study_name)  # a renamed folder keeps its study
        recorded = previous.get("artifacts") or default_location(folder.path)  # None: the run's default
        if plan.artifacts and plan.artifacts != recorded:
            raise UserError(f"{folder.path}: --artifacts {plan.artifacts} differs from this run's artifact "
                            f"store {recorded} (run.json); leave --artifacts out to go on with it")
        folder.sweep_temporary_files()
        emit("resume", run_dir=str(folder.path))
    artifacts = None
    if config.iterative:  # a knapsack run keeps no study and moves no checkpoints
        storage_url = storage_url or folder.default_storage_url
        location = (previous or {}).get("artifacts") or plan.artifacts or default_location(folder.path)
        artifacts = RunArtifacts(location, open_store(location, create=True))
    if previous is None:
        backend = make_backend(config.backend, config.threads, config.precision)
        folder.write_run_json({
            "command": plan.command, "config": config.as_json(), "spec_file": str(plan.spec_file),
            "storage": redact(storage_url), "study": study_name if config.iterative else None,
            "artifacts": plan.artifacts, "versions": versions(),
            "holdout_images": len(plan.dataset.holdout), "train_images": len(plan.dataset.train),
            "device": backend.fingerprint(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
    return StartedFolder(storage_url, study_name, artifacts)


def finished_result(folder: RunFolder, emit: Event) -> Optional[RunResult]:
    """The result of the finished run the folder holds (nothing is trained again), else None."""
    finished = folder.read_result()
    if finished is None or not folder.final_yaml.exists():
        return None
    emit("already_finished", run_dir=str(folder.path))
    return replace(finished, run_dir=folder.path, already_finished=True, final_spec=load_spec(folder.final_yaml))


def open_table(plan: RunPlan, emit: Event) -> LatencyTable:
    """The machine's table (or --lut), shared with other runs; run.json records which, and its hash."""
    backend = make_backend(plan.config.backend, plan.config.threads, plan.config.precision)  # an INT8 run: INT8 table
    table = open_for_run(plan.config.lut, backend, plan.seed_spec, calibration_companions(plan.seed_spec),
                         lambda: emit("calibrating"))
    saved = plan.folder.read_run_json() or {}
    saved["latency_table"] = table_record(table)
    plan.folder.write_run_json(saved)
    return table


def seed_network(plan: RunPlan, emit: Event) -> tuple[dict[str, torch.Tensor], tuple[float, float]]:
    """The seed's weights (given, or trained on the data once and saved) and its holdout accuracy and loss."""
    config, spec, seed_checkpoint = plan.config, plan.seed_spec, plan.folder.seed_checkpoint
    if seed_checkpoint.exists():
        _, state = RunFolder.load(seed_checkpoint)
    else:
        torch.manual_seed(config.seed)
        model = build_model(spec)
        if config.weights:
            state, note = transfer_state_dict(read_state_dict(config.weights), model, config.weights,
                                              str(plan.spec_file))
            model.load_state_dict(state, strict=True)
            if note:
                emit("transfer", note=note)
        else:
            emit("seed_training", epochs=config.seed_epochs)
            to_memory_format(model, torch.channels_last)  # ~1.6x faster training on CPU
            train_epochs(model, plan.dataset, config.seed_epochs, batch_size=config.batch_size, lr=config.lr,
                         seed=config.seed, progress=lambda step, loss: emit("seed_step", step=step, loss=loss))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        RunFolder.save(spec, state, seed_checkpoint)
    model = build_model(spec)
    model.load_state_dict(state, strict=True)
    return state, holdout_metrics(model, plan.dataset)


class IterationLog:
    """iterations.csv as a search grows it: every change is written at once (atomically), so a killed run
    resumes after its last written row. Row 0 is the seed."""

    def __init__(self, folder: RunFolder, rows: list[IterationRecord]) -> None:
        self.folder = folder
        self._rows = rows

    @property
    def rows(self) -> list[IterationRecord]:
        return list(self._rows)

    @property
    def last(self) -> IterationRecord:
        return self._rows[-1]

    def append(self, row: IterationRecord) -> None:
        self._rows.append(row)
        self._write()

    def update_last(self, **fields: Any) -> IterationRecord:
        self._rows[-1] = replace(self._rows[-1], **fields)
        self._write()
        return self._rows[-1]

    def restart(self) -> None:
        """Keep the seed's row only (a search that starts from the seed again when resumed)."""
        del self._rows[1:]
        self._write()

    def _write(self) -> None:
        self.folder.write_iterations(self._rows)


@dataclass(frozen=True)
class RunSession:
    """One run, ready to search: its plan, storage and study (None for a knapsack run, which keeps none),
    artifact store, pricing, the seed network and its figures, the iterations so far, and the confirmation
    of networks timed beside the seed."""

    plan: RunPlan
    storage_url: Optional[str]
    study_name: str
    study: Optional[optuna.Study]
    artifacts: Optional[RunArtifacts]
    pricing: Pricing
    seed_value: float  # the seed's figure in the budget's unit (the table's, for latency)
    target: float
    seed_state: dict[str, torch.Tensor]
    seed_accuracy: float
    seed_loss: float
    log: IterationLog
    confirmer: Confirmer
    emit: Event

    @classmethod
    def start(cls, plan: RunPlan, started: StartedFolder, pricing: Pricing, check: BudgetCheck,
              emit: Event) -> "RunSession":
        """Open the study (before the seed trains, so a worker started with the run finds it), emit the seed's
        figure, get the seed network, and write its row unless a resumed run has it."""
        config, folder = plan.config, plan.folder
        study = create_study(started.storage_url or folder.default_storage_url, started.study_name) \
            if config.iterative else None
        emit("seed", value=check.seed_value, target=check.target,
             unit="ms" if pricing.is_latency else plan.budget.resource)
        seed_state, (seed_accuracy, seed_loss) = seed_network(plan, emit)
        rows = folder.read_iterations()
        log = IterationLog(folder, rows)
        if not rows:
            log.append(IterationRecord(
                iteration=0, proposal="seed", predicted_latency_ms=pricing.latency_ms(check.seed_value),
                macs=spec_macs(plan.seed_spec), params=spec_params(plan.seed_spec), holdout_accuracy=seed_accuracy,
                holdout_loss=seed_loss, tie_tolerance=tolerance(seed_accuracy, len(plan.dataset.holdout)),
                wall_seconds=0.0))
        confirmer = Confirmer(pricing.timing_table, plan.budget, plan.seed_spec, check.seed_value, emit)
        return cls(plan, started.storage_url, started.study_name, study, started.artifacts, pricing,
                   check.seed_value, check.target, seed_state, seed_accuracy, seed_loss, log, confirmer, emit)

    @property
    def config(self) -> RunConfig:
        return self.plan.config

    @property
    def folder(self) -> RunFolder:
        return self.plan.folder

    @property
    def dataset(self) -> Dataset:
        return self.plan.dataset

    @property
    def seed_spec(self) -> ArchSpec:
        return self.plan.seed_spec

    def tolerance(self, parent_accuracy: float) -> float:
        """Accuracy differences below the holdout's standard error (selection.tolerance) are ties."""
        return tolerance(parent_accuracy, len(self.dataset.holdout))


class Found(NamedTuple):
    """What a shape search chose: the network, its weights, and its row of iterations.csv (with the
    measurement that confirmed it, under a latency budget)."""

    spec: ArchSpec
    state: dict[str, torch.Tensor]
    row: IterationRecord


class ShapeSearch(Protocol):
    """How a run finds a network within the budget, from the session's seed (iterative.py, knapsack_search.py).
    It writes its rows of iterations.csv and its checkpoints; the final training is not its business."""

    def search(self, session: RunSession) -> Found: ...
