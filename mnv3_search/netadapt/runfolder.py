"""The run folder `results/<run>/`: where every file of a run lives, each written atomically.

Layout:
  run.json                 command, config, versions, device fingerprint, final result
  study.journal            the Optuna study (default storage; `optuna-dashboard study.journal`)
  lut.json                 the latency table (unless --lut names another)
  seed.pt                  the seed network (given or trained), spec embedded
  iterations/NNN.pt        the network chosen by iteration NNN (fine-tuned), spec embedded
  trials/NNNNN.pt          each finished rung trial's fine-tuned weights (removed once its iteration is done)
  trials/NNNNN.state.pt    its optimizer, data-order and RNG state, which the next rung continues from
  artifacts/               the default Optuna artifact store: the current parent network and the trials' files
                           again, for workers without this folder (netadapt/artifacts.py; --artifacts elsewhere)
  iterations.csv           one row per finished iteration: the choice and the selection rule's inputs
  proposals.csv            one row per proposal, stopped ones included: its last rung's holdout accuracy and
                           loss, saving, score and rank by the selection rule, steps trained
  final.yaml, final.pt, final.onnx
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import MISSING, asdict, dataclass, fields, replace
import os
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import torch

from ..errors import CheckpointError, UserError
from ..fileio import atomic_write_text, json_cut_short
from ..fileio import write_csv
from ..spec.arch import ArchSpec
from ..spec.spaces import resolve_spec_path
from ..model.weights import read_checkpoint, save_state
from .config import RESUMABLE, RunConfig

@dataclass
class IterationRecord:
    """One row of iterations.csv: the network an iteration chose and the selection rule's inputs (iteration 0
    is the seed). The loop, a resumed run and the reports read and write these, never raw CSV rows; the
    confirmation by measurement fills the latency fields of the last record."""

    iteration: int
    proposal: str  # "seed", or "group=channels"
    group: Optional[str] = None
    channels_before: Optional[int] = None
    channels: Optional[int] = None
    target_latency_ms: Optional[float] = None
    predicted_latency_ms: Optional[float] = None
    measured_latency_ms: Optional[float] = None
    seed_measured_latency_ms: Optional[float] = None
    latency_reliable: Optional[bool] = None
    macs: Optional[int] = None
    params: Optional[int] = None
    holdout_accuracy: Optional[float] = None
    holdout_loss: Optional[float] = None
    saving: Optional[float] = None
    score: Optional[float] = None
    tie_tolerance: Optional[float] = None
    tied: Optional[int] = None
    decided_by: Optional[str] = None
    proposals: Optional[int] = None
    pruned: Optional[int] = None
    steps: Optional[int] = None
    full_steps: Optional[int] = None
    wall_seconds: Optional[float] = None


ITERATION_COLUMNS = [f.name for f in fields(IterationRecord)]
ADDED_COLUMNS = {"latency_reliable", "cuts"}  # columns a run folder of an earlier version lacks (read as blank)
INTEGER_COLUMNS = ["iteration", "channels_before", "channels", "macs", "params", "tied", "proposals", "pruned",
                   "steps", "full_steps"]
TEXT_COLUMNS = {"proposal", "group", "cuts", "decided_by", "state", "worker", "failure", "chosen"}
BOOLEAN_COLUMNS = {"latency_reliable"}


def _typed(column: str, value: Any) -> Any:
    """A CSV cell as its record field's type (None for a blank)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if column in INTEGER_COLUMNS:
        return int(value)
    if column in BOOLEAN_COLUMNS:
        return value if isinstance(value, bool) else str(value) == "True"
    if column in TEXT_COLUMNS:
        return str(value)
    return float(value)


@dataclass(frozen=True)
class RunResult:
    """What a run reached: the library's return value, run.json's "result" and the CLI's --json, one record in
    one vocabulary (`*_resource` in the budget's unit: ms, MACs or params). run.json keeps the fields up to
    `finished` (`to_run_json`); the rest say where and how this call found the run, which run.json cannot."""

    iterations: int
    seed_resource: float
    target: float
    final_resource: Optional[float]
    measured_latency_ms: Optional[float]
    seed_measured_latency_ms: Optional[float]
    test_accuracy: Optional[float]
    final_method: Optional[str] = None  # None in runs made before --final auto
    final_macs: Optional[int] = None
    final_params: Optional[int] = None
    latency_table_entries_measured: Optional[int] = None
    # what `test_accuracy` (and the latencies) were measured in; an INT8 run's test accuracy is the quantized
    # file's (final_int8.onnx), and the FP32 network's stands beside it
    precision: str = "fp32"
    fp32_test_accuracy: Optional[float] = None
    finished: Optional[str] = None
    run_dir: Optional[Path] = None  # not in run.json: a moved folder is still the same run
    nothing_to_do: bool = False  # the seed met the budget: no folder was written
    already_finished: bool = False  # the folder held this run finished: nothing was trained
    final_spec: Optional[ArchSpec] = None

    def to_run_json(self) -> dict[str, Any]:
        """run.json's "result"."""
        return {name: getattr(self, name) for name in RUN_JSON_RESULT}

    @classmethod
    def from_run_json(cls, data: dict[str, Any], where: Path) -> "RunResult":
        """run.json's "result", also one written before the later fields existed."""
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise damaged(where, f"damaged run file (its result has no {missing[0]!r})")
        return cls(**{k: v for k, v in data.items() if k in RUN_JSON_RESULT})

    def as_json(self) -> dict[str, Any]:
        """What the CLI's --json prints."""
        shown = {name: getattr(self, name) for name in CALLER_JSON}
        return {**shown, "run_dir": str(self.run_dir)}


_RESULT_FIELDS = [f.name for f in fields(RunResult)]
RUN_JSON_RESULT = _RESULT_FIELDS[:_RESULT_FIELDS.index("finished") + 1]  # run.json's "result"
CALLER_JSON = ["run_dir", "nothing_to_do", "already_finished", "seed_resource", "target", "final_resource",
               "iterations", "measured_latency_ms", "seed_measured_latency_ms", "test_accuracy", "precision",
               "fp32_test_accuracy"]


@dataclass(frozen=True)
class ProposalRecord:
    """One row of proposals.csv (ledger.py builds them from the study): a proposal's last finished rung, its
    rank there by the selection rule, and what all its trials cost."""

    trial: int
    iteration: int
    group: str  # the proposal's name: its group, or `knapsack` (--method hybrid's cut of several groups)
    cuts: str  # what it cuts, as iterations.csv's `proposal` names it: exp8=72, or exp2=72,last_conv=120
    channels_before: Optional[int]
    channels: Optional[int]
    state: str  # COMPLETE (reached the last rung), PRUNED (stopped before it), or the trial's state
    rung: int
    predicted_latency_ms: Optional[float]
    macs: Optional[int]
    params: Optional[int]
    holdout_accuracy: Optional[float]
    holdout_loss: Optional[float]
    saving: Optional[float]
    score: Optional[float]
    rank: Optional[int]
    trials: int
    steps: int
    seconds: float
    chosen: bool
    worker: str
    attempt: int
    failure: Optional[str]


PROPOSAL_COLUMNS = [f.name for f in fields(ProposalRecord)]


def damaged(path: Path, what: str) -> UserError:
    """One line for a run file that cannot be trusted: which file, what is wrong, what to do. Never a guess:
    a run resumed from a half-read file would go on from the wrong network."""
    return UserError(f"{path}: {what}; the run cannot go on from it: restore the file from a copy, or start the run "
                     f"again in another folder (--out)")


class RunFolder:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    # -- paths --
    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def default_storage_url(self) -> str:
        """A journal file: embedded like SQLite, and safe for several local processes at once."""
        return str((self.path / "study.journal").resolve())

    @property
    def default_lut(self) -> Path:
        return self.path / "lut.json"

    @property
    def seed_checkpoint(self) -> Path:
        return self.path / "seed.pt"

    def iteration_checkpoint(self, iteration: int) -> Path:
        return self.path / "iterations" / f"{iteration:03d}.pt"

    def trial_checkpoint(self, number: int) -> Path:
        return self.path / "trials" / f"{number:05d}.pt"

    def trial_state(self, number: int) -> Path:
        return self.path / "trials" / f"{number:05d}.state.pt"

    @property
    def iterations_csv(self) -> Path:
        return self.path / "iterations.csv"

    @property
    def proposals_csv(self) -> Path:
        return self.path / "proposals.csv"

    @property
    def final_yaml(self) -> Path:
        return self.path / "final.yaml"

    @property
    def final_pt(self) -> Path:
        return self.path / "final.pt"

    @property
    def final_onnx(self) -> Path:
        return self.path / "final.onnx"

    @property
    def final_int8_onnx(self) -> Path:
        """An INT8 run's deployable network: QDQ ONNX calibrated on training images, any batch and size."""
        return self.path / "final_int8.onnx"

    @staticmethod
    def is_run(path: str | os.PathLike) -> bool:
        """The one rule for "this folder is a NetAdapt run": netadapt writes run.json before anything else."""
        return (Path(path) / "run.json").is_file()

    # -- creation --
    def prepare(self) -> None:
        """Create the folder, or say in one line why it cannot be written."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"{self.path}: cannot write the run folder ({exc.strerror or exc}); "
                            f"choose another --out") from None

    def sweep_temporary_files(self) -> int:
        """Delete the temporary files of atomic writes a kill cut short (`.NAME.xxxx.tmp`, never renamed into
        place) in the folder, its iterations/ and trials/ (nothing else ever removes one: a trial's training
        state cut mid-write would stay for good); called when a run resumes, before its workers start."""
        swept = 0
        for folder in (self.path, self.path / "iterations", self.path / "trials"):
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
                tmp.unlink(missing_ok=True)
                swept += 1
        return swept

    def read_run_json(self) -> Optional[dict[str, Any]]:
        """run.json, checked to be a run file (an object, its config an object); None before the first write."""
        if not self.run_json.exists():
            return None
        try:
            text = self.run_json.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise damaged(self.run_json, "damaged run file (not UTF-8 text)") from None
        except OSError as exc:
            raise damaged(self.run_json, f"unreadable run file ({exc.strerror or exc})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            what = "truncated run file (it stops mid-way)" if json_cut_short(text, exc) \
                else f"damaged run file (not JSON: line {exc.lineno}: {exc.msg})"
            raise damaged(self.run_json, what) from None
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise damaged(self.run_json, "not a NetAdapt run file (no \"config\" object)")
        return data

    def resume_config(self, given: Optional[dict[str, Any]] = None) -> RunConfig:
        """The run's own settings, from run.json (`--resume DIR` needs no --budget). A setting `given` again
        (RunConfig field -> value) must equal the recorded one: a changed setting would not apply to the run
        already made, so it is refused in one line naming it rather than silently ignored."""
        saved = self.read_run_json()
        if saved is None or "config" not in saved:
            raise UserError(f"{self.path}: no run.json here; --resume needs a run folder made by netadapt")
        config = RunConfig.from_json(saved["config"], str(self.run_json))
        recorded = config.as_json()
        for name, value in (given or {}).items():
            if name in RESUMABLE:
                config = replace(config, **{name: value})
                continue
            if name == "spec_path":
                same = resolve_spec_path(value) == resolve_spec_path(recorded[name])
            else:
                same = value == recorded[name]
            if not same:
                option = "SPEC" if name == "spec_path" else "--" + name.replace("_", "-")
                theirs = "default" if recorded[name] is None else recorded[name]
                raise UserError(f"{self.path}: {option} {value} differs from this run's {theirs} (run.json); "
                                f"--resume continues a run with its own settings: leave {option} out, or start a "
                                f"new run with another --out")
        return config

    def write_run_json(self, data: dict[str, Any]) -> None:
        atomic_write_text(self.run_json, json.dumps(data, indent=2, default=str) + "\n")

    # -- checkpoints --
    @staticmethod
    def save(spec: ArchSpec, state_dict: dict[str, torch.Tensor], path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_state(state_dict, spec, path)

    @staticmethod
    def load(path: Path) -> tuple[ArchSpec, dict[str, torch.Tensor]]:
        """A checkpoint of this run; a missing or damaged one is one line saying so (never a traceback)."""
        if not path.is_file():
            raise damaged(path, "missing checkpoint of this run")
        try:
            return read_checkpoint(path)
        except CheckpointError as exc:
            raise damaged(path, str(exc).removeprefix(f"{path}: ")) from None

    # -- tables --
    def _read_table(self, path: Path, columns: list[str]) -> pd.DataFrame:
        """A CSV this run wrote, checked before use: header, every row complete (a truncated last row would
        otherwise read as a row of blanks), numbers where numbers belong."""
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise damaged(path, "damaged table (not UTF-8 text)") from None
        except OSError as exc:
            raise damaged(path, f"unreadable table ({exc.strerror or exc})") from None
        lines = list(csv.reader(io.StringIO(text)))
        older = [c for c in columns if c not in ADDED_COLUMNS]  # written before those columns existed
        if not lines or lines[0] not in (columns, older):
            raise damaged(path, f"not this run's table (its header is not {','.join(columns[:3])},...)")
        width = len(lines[0])
        if not text.endswith("\n"):
            raise damaged(path, f"truncated table (its last line, line {len(lines)}, stops mid-way)")
        for number, row in enumerate(lines[1:], start=2):
            if len(row) != width:
                raise damaged(path, f"damaged table (line {number} has {len(row)} fields, not {width})")
        frame = pd.read_csv(io.StringIO(text)).reindex(columns=columns)
        for column in columns:
            if column in TEXT_COLUMNS or pd.api.types.is_numeric_dtype(frame[column]):
                continue
            bad = frame[column][pd.to_numeric(frame[column], errors="coerce").isna() & frame[column].notna()]
            if bad.empty:
                continue
            raise damaged(path, f"damaged table (line {bad.index[0] + 2}: {column} is {bad.iloc[0]!r}, not a "
                                f"number)")
        if "iteration" in frame and columns == ITERATION_COLUMNS and \
                frame["iteration"].tolist() != list(range(len(frame))):
            raise damaged(path, "damaged table (its iterations are not 0, 1, 2, ... in order)")
        return frame

    def iterations_frame(self) -> pd.DataFrame:
        """iterations.csv, checked (see `_read_table`); empty before the seed's row is written."""
        if not self.iterations_csv.exists():
            return pd.DataFrame(columns=ITERATION_COLUMNS)
        return self._read_table(self.iterations_csv, ITERATION_COLUMNS)

    def proposals_frame(self) -> pd.DataFrame:
        """proposals.csv, checked (see `_read_table`); empty before the first iteration ends."""
        if not self.proposals_csv.exists():
            return pd.DataFrame(columns=PROPOSAL_COLUMNS)
        return self._read_table(self.proposals_csv, PROPOSAL_COLUMNS)

    def read_iterations(self) -> list[IterationRecord]:
        """iterations.csv as records: what a resumed run goes on from."""
        return [IterationRecord(**{str(k): _typed(str(k), v) for k, v in row.items()})
                for row in self.iterations_frame().to_dict("records")]

    def write_iterations(self, records: list[IterationRecord]) -> None:
        frame = pd.DataFrame([asdict(r) for r in records], columns=ITERATION_COLUMNS)
        for column in INTEGER_COLUMNS:
            frame[column] = frame[column].astype("Int64")
        write_csv(frame, self.iterations_csv)

    def read_result(self) -> Optional[RunResult]:
        """The finished run's result from run.json; None while the run is not finished."""
        result = (self.read_run_json() or {}).get("result")
        return RunResult.from_run_json(result, self.run_json) if isinstance(result, dict) else None

    def write_result(self, result: RunResult) -> None:
        saved = self.read_run_json() or {}
        saved["result"] = result.to_run_json()
        self.write_run_json(saved)

    def write_proposals(self, records: list[ProposalRecord]) -> None:
        write_csv(pd.DataFrame([asdict(r) for r in records], columns=PROPOSAL_COLUMNS), self.proposals_csv)
