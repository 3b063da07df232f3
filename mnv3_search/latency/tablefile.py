"""The table file: one JSON document per device, backend, precision, thread count and batch, versioned.

A file that cannot be read, or was made on another device, backend, precision, thread count or batch, is refused
with one line naming it and is never overwritten (the caller writes atomically, `LatencyTable.save`).

Format versions: version 1 grew fields over time and read a missing one as its old meaning; version 2 writes
every field; version 3 adds the header's `precision` (fp32 or int8: INT8 entries are blocks quantized as they
run in the INT8 network, so they never mix with FP32 ones); version 4 records each calibration's
`smallest_macs_share` (the smallest network it was fitted on, as a share of the seed's MACs). An older file is
brought up to date in memory by the numbered steps of `MIGRATIONS` right after it is read, so the reader below
knows only the current version; the next save writes the current version. To change the format: bump
`FORMAT_VERSION`, add the step from the previous version to `MIGRATIONS`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional, TypeGuard

from ..errors import UserError
from ..fileio import PathLike, json_cut_short
from .calibration import MODELS, Calibration
from .keys import KINDS, BlockKey
from .protocol import Measurement

SCHEMA = "mnv3-search/latency-table"
FORMAT_VERSION = 4


@dataclass
class Header:
    """What every entry depends on besides the block: refusing a mismatch keeps numbers comparable."""

    backend: str
    versions: dict
    threads: int
    batch: int
    device: dict
    protocol: dict
    precision: str = "fp32"

    def mismatch(self, other: "Header") -> Optional[str]:
        """The first field that differs, phrased for the user; None when compatible."""
        if self.backend != other.backend:
            return f"backend {self.backend}, not {other.backend}"
        if self.precision != other.precision:
            return f"precision {self.precision.upper()}, not {other.precision.upper()}"
        if self.threads != other.threads:
            return f"{self.threads} thread(s), not {other.threads}"
        if self.batch != other.batch:
            return f"batch {self.batch}, not {other.batch}"
        for field_name in sorted(set(self.device) | set(other.device)):
            if self.device.get(field_name) != other.device.get(field_name):
                return f"device {field_name} {self.device.get(field_name)!r}, not {other.device.get(field_name)!r}"
        for package, version in sorted(other.versions.items()):
            # ONNX Runtime's and OpenVINO's timings do not depend on torch's version (it only exports); torch's
            # and ExecuTorch's do
            if (package != "torch" or _torch_matters(other.backend)) and self.versions.get(package) != version:
                return f"{package} {self.versions.get(package)}, not {version}"
        return None


def _torch_matters(backend: str) -> bool:
    """Whether a table of `backend` (runner:NAME for a command runner) depends on torch's version."""
    from .backends import BACKENDS

    cls = BACKENDS.get(backend.removeprefix("runner:"))
    return cls.torch_matters if cls is not None else True


@dataclass(frozen=True)
class Entry:
    """One block's latency (ms) under the table's protocol; `latency_ms` is the 25th percentile."""

    key: BlockKey
    latency_ms: float
    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    runs: int
    # the host's level when this entry was timed, relative to the table's (`anchor_level`); the figures above are
    # already divided by it
    level: float = 1.0

    def as_json(self) -> dict:
        return {"key": asdict(self.key), "latency_ms": self.latency_ms, "median_ms": self.median_ms,
                "p10_ms": self.p10_ms, "p90_ms": self.p90_ms, "min_ms": self.min_ms, "runs": self.runs,
                "level": self.level}

    @staticmethod
    def from_measurement(key: BlockKey, m: Measurement, level: float = 1.0) -> "Entry":
        """The entry of a measurement taken while the host ran at `level` times the table's level."""
        return Entry(key, m.p25_ms / level, m.median_ms / level, m.p10_ms / level, m.p90_ms / level,
                     m.min_ms / level, m.repeats, level)


# --- migrations: each takes a document of version n and returns it as version n + 1 ---------------------------
# A step patches only what has the shape it expects and leaves anything else alone, so a damaged file still
# reaches the reader and is refused with the reader's own message.

def _is_number(value: object) -> TypeGuard[float]:
    """A finite JSON number (true and false are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _v1_to_v2(data: dict) -> dict:
    """Write out what version 1 left implicit: the fields added after its first files, at their old meaning."""
    protocol = data.get("protocol")
    if isinstance(protocol, dict):
        protocol.setdefault("clock", "wall")  # files from before the thread clock were timed on the wall clock
    entries = data.get("entries")
    for raw in entries.values() if isinstance(entries, dict) else ():
        if not isinstance(raw, dict):
            continue
        raw.setdefault("level", 1.0)  # files from before the anchors: every entry on the table's own level
        key = raw.get("key")
        if isinstance(key, dict) and "residual" not in key:  # files from before the flag: the paper's rule
            try:
                key["residual"] = BlockKey(**key).residual
            except (TypeError, ValueError):
                pass
    calibrations = data.setdefault("calibrations", {})  # files without a calibration could leave it out
    for raw in calibrations.values() if isinstance(calibrations, dict) else ():
        if not isinstance(raw, dict):
            continue
        b = raw.get("b_ms_per_mparam")
        if "model" not in raw and _is_number(b) and b >= 0:  # files from before the choice: a memory term or none
            raw["model"] = "two-term" if b > 0 else "plain"
        raw.setdefault("c_ms", 0.0)  # files from before the per-call term
        legacy = {"two-term": raw.pop("heldout_two_term_pct", None), "plain": raw.pop("heldout_plain_pct", None)}
        if raw.get("heldout_pct") is None:  # files from before: one field per model
            raw["heldout_pct"] = {m: v for m, v in legacy.items() if v is not None} or None
    return data


def _v2_to_v3(data: dict) -> dict:
    """Name the precision: every table before version 3 timed FP32 networks."""
    data.setdefault("precision", "fp32")
    return data


def _v3_to_v4(data: dict) -> dict:
    """Calibrations written before `smallest_macs_share` say they do not know it (null): a run then fits them again
    on companions that reach small networks (`Calibration.spans_small_networks`)."""
    calibrations = data.get("calibrations")
    for raw in calibrations.values() if isinstance(calibrations, dict) else ():
        if isinstance(raw, dict):
            raw.setdefault("smallest_macs_share", None)
    return data


MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4}


def migrate(data: dict) -> dict:
    """`data` (a table document of a known version) brought to `FORMAT_VERSION`, one numbered step at a time."""
    while data["version"] < FORMAT_VERSION:
        version = data["version"]
        data = MIGRATIONS[version](data)
        data["version"] = version + 1
    return data


# --- reading and writing -------------------------------------------------------------------------------------

def _bad(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}; it was left untouched: fix or move it, or give another --lut path")


def _parse_key(raw: object) -> BlockKey:
    if not isinstance(raw, dict):
        raise ValueError("key is not an object")
    names = {f.name for f in fields(BlockKey)}
    if set(raw) != names:
        raise ValueError(f"key fields {sorted(raw)} differ from {sorted(names)}")
    key = BlockKey(**raw)
    if key.kind not in KINDS:
        raise ValueError(f"unknown kind {key.kind!r}")
    for name in ("resolution", "in_channels", "exp", "out", "kernel", "stride"):
        if not isinstance(getattr(key, name), int) or isinstance(getattr(key, name), bool):
            raise ValueError(f"{name} is not an integer")
    if not all(isinstance(flag, bool) for flag in (key.se, key.expand, key.residual)) or \
            not isinstance(key.nl, str):
        raise ValueError("se/expand/residual must be booleans and nl a string")
    return key


def _number(raw: dict, name: str, signed: bool = False) -> float:
    value = raw.get(name)
    if not _is_number(value):
        raise ValueError(f"{name} is {value!r}, not a number")
    if value < 0 and not signed:
        raise ValueError(f"{name} is {value!r}, not a non-negative number")
    return float(value)


def _load_json(path: Path) -> dict:
    """The file's document at `FORMAT_VERSION`: read, parsed, its schema and version checked, migrated."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such latency table; build one with `mnv3-search lut build SPEC --lut "
                        f"{path}`") from None
    except UnicodeDecodeError:
        raise _bad(path, "is not valid JSON (not even UTF-8 text), not a latency table") from None
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        what = "is truncated (it stops mid-way)" if json_cut_short(text, exc) else \
            f"is not valid JSON (line {exc.lineno}: {exc.msg})"
        raise _bad(path, f"{what}, not a latency table") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise _bad(path, f"is not a latency table (no \"schema\": \"{SCHEMA}\")")
    version = data.get("version")
    if type(version) is not int or not (version == FORMAT_VERSION or version in MIGRATIONS):
        raise _bad(path, f"has table version {version!r}; this mnv3-search reads versions "
                         f"{min(MIGRATIONS)} to {FORMAT_VERSION}")
    return migrate(data)


def read_table_file(path: PathLike) -> tuple[Header, dict[str, Entry], dict[str, Calibration]]:
    """Parse and validate a table file; any problem is one UserError line naming the file."""
    path = Path(path)
    data = _load_json(path)
    try:
        header = Header(str(data["backend"]), dict(data["versions"]), int(data["threads"]), int(data["batch"]),
                        dict(data["device"]), dict(data["protocol"]), str(data["precision"]))
        if header.precision not in ("fp32", "int8"):
            raise ValueError(f"precision is {header.precision!r}, not fp32 or int8")
        raw_entries = data["entries"]
        raw_cal = data["calibrations"]
        if not isinstance(raw_entries, dict) or not isinstance(raw_cal, dict):
            raise ValueError("entries/calibrations are not objects")
        for name in ("passes", "runs_per_pass"):  # LatencyTable.open measures with the file's protocol
            value = header.protocol.get(name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"protocol {name} is {value!r}, not a positive integer")
        if "clock" not in header.protocol:
            raise ValueError("protocol has no clock")
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad(path, f"has a malformed header ({exc})") from None
    entries: dict[str, Entry] = {}
    for entry_id, raw in raw_entries.items():
        try:
            if not isinstance(raw, dict):
                raise ValueError("not an object")
            key = _parse_key(raw.get("key"))
            if key.id != entry_id:
                raise ValueError(f"its key says {key.id!r}")
            entries[entry_id] = Entry(key, _number(raw, "latency_ms"), _number(raw, "median_ms"),
                                      _number(raw, "p10_ms"), _number(raw, "p90_ms"), _number(raw, "min_ms"),
                                      int(_number(raw, "runs")), _number(raw, "level"))
        except (TypeError, ValueError) as exc:
            raise _bad(path, f"entry {entry_id!r} is malformed ({exc})") from None
    calibrations: dict[str, Calibration] = {}
    for name, raw in raw_cal.items():
        try:
            b = _number(raw, "b_ms_per_mparam")
            model = raw.get("model")
            if model not in MODELS:
                raise ValueError(f"model is {model!r}, not one of {', '.join(MODELS)}")
            c = _number(raw, "c_ms", signed=True)
            heldout = raw["heldout_pct"]
            if heldout is not None:
                heldout = {str(m): float(v) for m, v in heldout.items()}
            smallest = None if raw["smallest_macs_share"] is None else _number(raw, "smallest_macs_share")
            calibrations[name] = Calibration(str(raw["spec_name"]), _number(raw, "raw_ms"),
                                             _number(raw, "measured_ms"), int(raw["params"]),
                                             int(raw["resolution"]), _number(raw, "a"), b,
                                             int(raw["networks"]), model, c, heldout, smallest)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _bad(path, f"calibration {name!r} is malformed ({exc})") from None
    return header, entries, calibrations


def table_text(header: Header, entries: dict[str, Entry], calibrations: dict[str, Calibration]) -> str:
    """The file's text at `FORMAT_VERSION` (entries and calibrations sorted: the same table, the same bytes)."""
    h = header
    data = {"schema": SCHEMA, "version": FORMAT_VERSION, "backend": h.backend, "precision": h.precision,
            "versions": h.versions,
            "threads": h.threads, "batch": h.batch, "device": h.device, "protocol": h.protocol,
            "calibrations": {n: c.as_json() for n, c in sorted(calibrations.items())},
            "entries": {i: e.as_json() for i, e in sorted(entries.items())}}
    return json.dumps(data, indent=1) + "\n"
