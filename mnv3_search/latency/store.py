"""Where a machine's tables live and how runs use them: one shared file per device, backend, threads and batch.

Every command and run on a machine reads and extends the same table, so entries are timed once per machine:
`default_table_path` names it, `open_for_run` opens (and calibrates) it for a run, `table_record` is what the
run writes down about it, and `build_table` fills it ahead of a run.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..fileio import PathLike
from ..model.counts import spec_params
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


def default_table_path(backend: Backend, batch: int = 1, folder: Optional[PathLike] = None) -> Path:
    """Where a table lives unless the user names one: one file per device, backend, threads and batch,
    in `default_table_dir()` unless `folder` is given."""
    cpu = str(backend.fingerprint().get("cpu_model", "cpu"))
    slug = "".join(ch if ch.isalnum() else "-" for ch in cpu.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    name = f"{slug}-{backend.fingerprint().get('cpu_cores')}c-{backend.name}-t{backend.threads}-b{batch}.json"
    return Path(folder if folder is not None else default_table_dir()) / name


def open_for_run(path: Optional[PathLike], backend: Backend, seed: ArchSpec, companions: Sequence[ArchSpec],
                 on_calibrate: Optional[Callable[[], None]] = None) -> LatencyTable:
    """The table a run predicts with: `path`, or the machine's default table. Entries it holds are never
    measured again; the seed is calibrated (beside `companions`, see `LatencyTable.calibrate`) only when the
    table has no calibration for this very network (same name, resolution and parameter count), so runs on one
    machine share and extend one file."""
    table = LatencyTable.open(Path(path) if path else default_table_path(backend), backend)
    cal = table.calibrations.get(seed.name)
    if cal is None or (cal.resolution, cal.params) != (seed.resolution, spec_params(seed)):
        if on_calibrate:
            on_calibrate()
        table.calibrate(seed, companions)
    return table


def table_record(table: LatencyTable) -> dict:
    """What a run writes down about the table it used: where it is and a hash of its content then."""
    data = table.path.read_bytes() if table.path.exists() else b""
    return {"path": str(table.path.resolve()), "sha256": hashlib.sha256(data).hexdigest(),
            "entries": len(table.entries)}


@dataclass(frozen=True)
class BuildReport:
    entries_needed: int
    entries_measured: int
    seconds: float
    calibration: Calibration


def build_table(table: LatencyTable, spec: ArchSpec, keys: Sequence[BlockKey], companions: Sequence[ArchSpec],
                progress: Optional[Progress] = None) -> BuildReport:
    """Pre-populate `keys` (what NetAdapt will ask for: `prune.variants.netadapt_keys`), then calibrate on the
    seed network beside `companions`."""
    start = time.perf_counter()
    measured = table.ensure(keys, progress)
    calibration = table.calibrate(spec, companions)
    return BuildReport(len(keys), measured, time.perf_counter() - start, calibration)
