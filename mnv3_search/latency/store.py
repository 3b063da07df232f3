"""Where a machine's tables live and how runs use them: one shared file per device, backend, precision, threads
and batch.

Every command and run on a machine reads and extends the same table, so entries are timed once per machine:
`default_table_path` names it, `open_for_run` opens (and calibrates) it for a run, `table_record` is what the
run writes down about it, and `build_table` fills it ahead of a run.
"""

from __future__ import annotations

import hashlib
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..fileio import PathLike
from ..model.counts import spec_macs, spec_params
from ..spec.arch import ArchSpec
from .backends import Backend
from .calibration import Calibration
from .keys import BlockKey
from .table import LatencyTable, Progress

LUT_DIR_ENV = "MNV3_SEARCH_LUT_DIR"


def default_table_dir() -> Path:
    """The one folder for this machine's tables: $MNV3_SEARCH_LUT_DIR, else $XDG_CACHE_HOME/mnv3-search/lut,
    else ~/.cache/mnv3-search/lut. Every command and run reads and extends the same file there."""
    if os.environ.get(LUT_DIR_ENV):
        return Path(os.environ[LUT_DIR_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "mnv3-search" / "lut"


def _slug(text: str) -> str:
    slug = "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug


def table_file_name(fingerprint: dict, backend: str, precision: str, threads: int, batch: int) -> str:
    """The default table's file name: this machine's CPU and cores (or a runner's device name), backend,
    precision (FP32 tables keep the name they had before precisions existed), threads and batch."""
    if "cpu_model" in fingerprint:
        where = f"{_slug(str(fingerprint['cpu_model']))}-{fingerprint.get('cpu_cores')}c"
    else:
        where = _slug(str(fingerprint.get("device", "device")))
    kind = _slug(backend) + ("" if precision == "fp32" else f"-{precision}")
    return f"{where}-{kind}-t{threads}-b{batch}.json"


def default_table_path(backend: Backend, batch: int = 1, folder: Optional[PathLike] = None) -> Path:
    """Where a table lives unless the user names one: one file per device, backend, precision, threads and
    batch, in `default_table_dir()` unless `folder` is given."""
    name = table_file_name(backend.fingerprint(), backend.name, backend.precision, backend.threads, batch)
    return Path(folder if folder is not None else default_table_dir()) / name


def open_for_run(path: Optional[PathLike], backend: Backend, seed: ArchSpec, companions: Sequence[ArchSpec],
                 on_calibrate: Optional[Callable[[], None]] = None) -> LatencyTable:
    """The table a run predicts with: `path`, or the machine's default table. Entries it holds are never
    measured again; the seed is calibrated (beside `companions`, see `LatencyTable.calibrate`) only when the
    table has no calibration for this very network (same name, resolution and parameter count) or has one that
    never saw a small network while `companions` reach smaller ones (`_refit_for_span`), so runs on one machine
    share and extend one file."""
    table = LatencyTable.open(Path(path) if path else default_table_path(backend), backend)
    cal = table.calibrations.get(seed.name)
    if cal is None or (cal.resolution, cal.params) != (seed.resolution, spec_params(seed)) or \
            _refit_for_span(cal, seed, companions):
        if on_calibrate:
            on_calibrate()
        table.calibrate(seed, companions)
    return table


def _refit_for_span(cal: Calibration, seed: ArchSpec, companions: Sequence[ArchSpec]) -> bool:
    """Whether a calibration that never saw a small network (`Calibration.spans_small_networks`: fitted on mild
    cuts, or written before its span was recorded) should be fitted again on `companions`: only where they
    reach a smaller network than it saw, so a seed whose companions cannot shrink that far is not fitted again
    by every run."""
    if not companions or cal.spans_small_networks:
        return False
    reach = min(spec_macs(c) for c in companions) / spec_macs(seed)
    return cal.smallest_macs_share is None or reach < cal.smallest_macs_share


def table_record(table: LatencyTable) -> dict:
    """What a run writes down about the table it used: where it is and a hash of its content then."""
    data = table.path.read_bytes() if table.path.exists() else b""
    return {"path": str(table.path.resolve()), "sha256": hashlib.sha256(data).hexdigest(),
            "entries": len(table.entries)}


def cpu_seconds() -> float:
    """CPU time this process has used so far (user + system, every thread): what a build costs on a shared
    machine, where wall time depends on the other tenants."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class BuildReport:
    entries_needed: int
    entries_measured: int
    seconds: float
    calibration: Calibration
    cpu_seconds: float = 0.0  # CPU time of the build (this process)


def build_table(table: LatencyTable, spec: ArchSpec, keys: Sequence[BlockKey], companions: Sequence[ArchSpec],
                progress: Optional[Progress] = None) -> BuildReport:
    """Pre-populate `keys` (what NetAdapt will ask for: `prune.variants.netadapt_keys`), then calibrate on the
    seed network beside `companions` (their entries first, then the whole networks), reporting both to
    `progress`."""
    start, cpu = time.perf_counter(), cpu_seconds()
    measured = table.ensure(keys, progress)

    def on_pass(done: int, total: int) -> None:
        if progress:
            progress(done, total, "timing whole networks (calibration)")

    calibration = table.calibrate(spec, companions, on_pass=on_pass, progress=progress)
    return BuildReport(len(keys), measured, time.perf_counter() - start, calibration, cpu_seconds() - cpu)
