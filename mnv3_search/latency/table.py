"""A per-block latency lookup table for one device, backend, thread count and batch, with calibration.

Entries are keyed by everything that changes a block's cost (`BlockKey`): block kind, input resolution,
in/exp/out channels, kernel, stride, SE, nonlinearity and whether the expansion conv exists. Each entry is
a block timed in isolation; entries are timed in shuffled round-robin passes and store the 25th percentile,
which survives the host's slow bursts (REFERENCE §4).

The sum of entries is not the whole network's latency: a block timed alone keeps its weights in cache (the
whole network streams all of them from memory every run), and each entry pays a call's fixed cost that the
whole network pays once. So `predict` reports the raw sum and a calibrated figure, `a * sum + b * params + c`,
fitted on whole networks measured with the same protocol (p25): the seed, two uniform shrinks of it (half and a
quarter of its channels) and random variants, timed interleaved. Four models compete (`MODEL_TERMS`): plain
(the seed's factor, b = c = 0), two-term (a, b), overhead (a, c) and three-term; each is fitted with one
network held out at a time, and the one that predicts held-out networks relative to the seed best is kept
(`Calibration.model`). With the seed alone, b = c = 0 and a = measured / sum (the plain factor of REFERENCE §4).
On Small at 224 px the per-call surplus made the raw sum put width 0.1 at 31 % of the seed (measured 22 %) and
a 35 % NetAdapt network at 37 % (measured 27 %), so the loop overshot its budget.

Entries timed minutes apart sit on different levels of a shared host, so every chunk of new entries is timed
beside `ANCHORS` entries already in the table and divided by their median ratio (`anchor_level`).

Absolute levels drift on a shared host (tens of percent within a minute) while ratios of networks timed
together hold, so `check_table` reports errors relative to the seed timed beside the variants as well as
absolute ones, plus the drift since calibration; `relative_to_reference` judges a candidate against a budget
through the seed measured now.

The table is one JSON file written atomically. A file that cannot be read, or was made on another device,
backend, thread count or batch, is refused with one line and never overwritten.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from torch import nn

from ..model.counts import spec_params, unit_params
from ..errors import UserError
from ..fileio import PathLike, atomic_write_text, json_cut_short
from .measure import (Backend, InterleavedPolicy, Measurement, Runner, Together, measure_interleaved, measure_together,
                      thread_clock_ok)
from ..model.build import build_model, build_unit
from ..spec.arch import ArchSpec, BlockConfig, default_residual, se_width
from ..spec.units import BneckUnit, ClassifierUnit, LastConvUnit, StemUnit, Unit, spec_units
from ..prune.variants import random_variant, single_axis_variants, uniform_variant

SCHEMA = "mnv3-search/latency-table"
SCHEMA_VERSION = 1
KINDS = ("stem", "bneck", "last_conv", "classifier")
# Entries are timed in chunks: every session of a chunk is open at once and interleaved.
CHUNK_ENTRIES = 160
# Entries already in the table timed again with every chunk, to put the chunk on the table's level.
ANCHORS = 8
MODULES_KEPT = 16  # networks and anchor blocks kept built (and exported) for the next timing of the same shape

Progress = Callable[[float, float, str], None]  # (done, total, what)


# --- keys ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class BlockKey:
    """Everything that changes one unit's cost (a unit of `spec_units`). Unused fields are 0 / False / "".

    stem: in=3, out, kernel, stride, nl. bneck: all fields. last_conv: in, out, nl (1x1).
    classifier (pool + Linear in->exp, nl, Linear exp->out): in = last conv width, exp = hidden, out = classes.
    `resolution` is the unit's input height = width. `residual` (bneck only) is whether the block adds its
    input; None when constructing means the paper's rule (stride 1 and in == out) and is resolved at once.
    The id names `residual` only where it departs from the rule, so ids of tables written before the flag
    existed stay valid.
    """

    kind: str
    resolution: int
    in_channels: int
    exp: int
    out: int
    kernel: int
    stride: int
    se: bool
    nl: str
    expand: bool
    residual: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.residual is None:
            object.__setattr__(self, "residual", self._rule_residual)
        elif self.residual is True and not self._rule_residual:
            raise ValueError(f"residual needs a bneck with stride 1 and in == out, not {self.id}")

    @property
    def _rule_residual(self) -> bool:
        return self.kind == "bneck" and default_residual(self.stride, self.in_channels, self.out)

    @property
    def id(self) -> str:
        flag = "" if self.residual == self._rule_residual else f" res{int(bool(self.residual))}"
        return (f"{self.kind} r{self.resolution} in{self.in_channels} exp{self.exp} out{self.out} "
                f"k{self.kernel} s{self.stride} se{int(self.se)} {self.nl} x{int(self.expand)}{flag}")

    @staticmethod
    def of(unit: Unit) -> "BlockKey":
        """The key of one unit of `spec_units`."""
        if isinstance(unit, StemUnit):
            return BlockKey("stem", unit.resolution, unit.in_channels, 0, unit.out_channels, unit.kernel,
                            unit.stride, False, unit.nl, False, False)
        if isinstance(unit, BneckUnit):
            c = unit.config
            return BlockKey("bneck", unit.resolution, c.in_channels, c.exp, c.out, c.kernel, c.stride, c.se, c.nl,
                            c.expand_conv, c.residual)
        if isinstance(unit, LastConvUnit):
            return BlockKey("last_conv", unit.resolution, unit.in_channels, 0, unit.out_channels, 1, 1, False,
                            unit.nl, False, False)
        if isinstance(unit, ClassifierUnit):
            return BlockKey("classifier", unit.resolution, unit.in_channels, unit.hidden, unit.out_channels, 0, 0,
                            False, unit.nl, False, False)
        raise TypeError(f"not a unit: {unit!r}")

    def unit(self) -> Unit:
        """The unit this key stands for (index 0 and dropout 0.2: neither changes the cost)."""
        if self.kind == "stem":
            return StemUnit(self.resolution, self.out, self.kernel, self.stride, self.nl, self.in_channels)
        if self.kind == "bneck":
            return BneckUnit(self.resolution, BlockConfig(
                index=0, in_channels=self.in_channels, kernel=self.kernel, exp=self.exp, out=self.out, se=self.se,
                nl=self.nl, stride=self.stride, expand_conv=self.expand, se_channels=se_width(self.exp),
                residual=bool(self.residual)))
        if self.kind == "last_conv":
            return LastConvUnit(self.resolution, self.in_channels, self.out, self.nl, index=0)
        if self.kind == "classifier":
            return ClassifierUnit(self.resolution, self.in_channels, self.exp, self.out, self.nl, dropout=0.2)
        raise ValueError(f"unknown block kind {self.kind!r}")

    def module(self) -> nn.Module:
        """A freshly constructed module for this unit alone (weights do not change latency)."""
        return build_unit(self.unit())

    @property
    def params(self) -> int:
        """Parameter count of `module()`, by the counts' arithmetic (cheap: `predict` sums it per spec)."""
        return unit_params(self.unit())

    def input_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.in_channels, self.resolution, self.resolution)


def anchor_level(anchors: Sequence["Entry"], now: Sequence[Measurement]) -> float:
    """The host's level now relative to the table's: the median of anchors' p25 now / stored (1.0 without)."""
    ratios = sorted(m.p25_ms / e.latency_ms for e, m in zip(anchors, now))
    if not ratios:
        return 1.0
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else 0.5 * (ratios[mid - 1] + ratios[mid])


def spec_keys(spec: ArchSpec) -> list[tuple[str, BlockKey]]:
    """(label, key) of every unit of `spec`, in order: stem, bneck 1..n, last_conv, classifier.

    Labels match the profile table's block names. Cheap: no module is built.
    """
    return [(unit.label, BlockKey.of(unit)) for unit in spec_units(spec)]


def netadapt_keys(spec: ArchSpec, step: int = 8) -> list[BlockKey]:
    """The entries NetAdapt's first step asks for: the seed's blocks and every single-axis shrink of it
    (each block's exp, each coupled out group, the last conv and the hidden width) in steps of `step`."""
    seen: dict[BlockKey, None] = {key: None for _, key in spec_keys(spec)}
    for child in single_axis_variants(spec, step):
        for _, key in spec_keys(child):
            seen.setdefault(key, None)
    return list(seen)


# --- entries and the file ------------------------------------------------------------------------------------

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


@dataclass(frozen=True)
class Calibration:
    """whole_ms = a * sum_of_entries_ms + b_ms_per_mparam * params / 1e6 + c_ms, fitted for one seed.

    raw_ms / measured_ms / params are the seed's; `networks` is how many whole networks the fit used.
    `b` is the memory term: a block timed alone keeps its weights in cache, the whole network streams them.
    `c_ms` is the per-call term: every entry was timed as its own call, so the sum counts a call's fixed cost
    once per block while the whole network pays it once (c_ms < 0 takes the surplus back). Networks of the seed's
    depth carry the same surplus, so it weighs most on small ones: on a Small at 224 px the raw sum put width 0.1
    at 31 % of the seed, measured 22 %.
    """

    spec_name: str
    raw_ms: float
    measured_ms: float
    params: int
    resolution: int
    a: float
    b_ms_per_mparam: float
    networks: int
    # which model earned its place (`MODEL_TERMS`; "plain" = the raw block sum scaled by the seed's factor),
    # chosen by seed-relative error on held-out networks
    model: str = "plain"
    c_ms: float = 0.0
    heldout_pct: Optional[dict[str, float]] = None  # model -> leave-one-out seed-relative MAPE (%)

    def apply(self, raw_ms: float, params: int) -> float:
        whole = self.a * raw_ms + self.b_ms_per_mparam * params / 1e6 + self.c_ms
        # a network far smaller than any the fit saw must not be predicted free: never below a tenth of its sum
        return max(whole, MIN_SHARE_OF_SUM * self.a * raw_ms)

    @property
    def factor(self) -> float:
        """The seed's calibrated / raw: the single factor REFERENCE §4 speaks of."""
        return self.apply(self.raw_ms, self.params) / self.raw_ms

    def as_json(self) -> dict:
        return {**asdict(self), "factor": self.factor}


def heldout_text(cal: Calibration) -> str:
    """'plain 4.9% · two-term 5.1% · ...': each model's held-out seed-relative error, for tables and logs."""
    if not cal.heldout_pct:
        return "-"
    return " · ".join(f"{model} {pct:.1f}%" for model, pct in cal.heldout_pct.items())


Point = tuple[float, int, float]  # (raw block sum ms, params, measured whole ms)
Coefficients = tuple[float, float, float]  # (a, b ms per M params, c ms)

# the terms each fitted model has beside `a * raw`: "params" (b) and "call" (c)
MODEL_TERMS: dict[str, tuple[str, ...]] = {"two-term": ("params",), "overhead": ("call",),
                                           "three-term": ("params", "call")}
MODELS = ("plain", *MODEL_TERMS)
MIN_SHARE_OF_SUM = 0.1


def _plain(points: Sequence[Point]) -> Coefficients:
    return points[0][2] / points[0][0], 0.0, 0.0


def fit_model(points: Sequence[Point], model: str) -> Coefficients:
    """(a, b, c) of measured ~ a * raw + b * params/1e6 + c for one of `MODEL_TERMS`, minimising relative
    squared error (every network counts alike, small or large).

    The first point is the seed. Too few points for the terms, a singular fit, or one that is not physical
    (a <= 0, b < 0, or a network of the fit predicted below a tenth of its sum) give the seed's plain factor:
    a = measured / raw, b = c = 0.
    """
    terms = MODEL_TERMS[model]
    if len(points) < len(terms) + 2:  # one more point than unknowns: a fit that is not merely solved
        return _plain(points)
    rows = np.array([[r, *(q / 1e6 if t == "params" else 1.0 for t in terms)] for r, q, _ in points])
    measured = np.array([m for _, _, m in points])
    weighted = rows / measured[:, None]  # each row divided by its measurement: relative error
    if np.linalg.matrix_rank(weighted) < len(terms) + 1:
        return _plain(points)
    solution = np.linalg.lstsq(weighted, np.ones(len(points)), rcond=None)[0]
    fitted = dict(zip(("raw", *terms), (float(x) for x in solution)))
    a, b, c = fitted["raw"], fitted.get("params", 0.0), fitted.get("call", 0.0)
    if a <= 0 or b < 0 or any(a * r + b * q / 1e6 + c < MIN_SHARE_OF_SUM * a * r for r, q, _ in points):
        return _plain(points)
    return a, b, c


def fit_calibration(points: Sequence[Point]) -> tuple[float, float]:
    """(a, b) of the two-term model, measured ~ a * raw + b * params/1e6 (`fit_model`)."""
    a, b, _ = fit_model(points, "two-term")
    return a, b


def _relative_error_pct(predicted: Sequence[float], measured: Sequence[float]) -> list[float]:
    """Seed-relative errors (%) of points 1.. : predicted / predicted seed vs measured / measured seed."""
    return [100.0 * ((p / predicted[0]) / (m / measured[0]) - 1.0) for p, m in zip(predicted[1:], measured[1:])]


@dataclass(frozen=True)
class CalibrationChoice:
    """`choose_calibration`'s answer: the kept model, its coefficients, and every model's held-out error."""

    model: str
    a: float
    b_ms_per_mparam: float
    c_ms: float
    heldout_pct: Optional[dict[str, float]]


def choose_calibration(points: Sequence[Point]) -> CalibrationChoice:
    """The calibration model that best predicts held-out networks relative to the seed, for points (raw, params,
    measured); the first point is the seed.

    Each companion is held out in turn: every fitted model (`MODEL_TERMS`) is fitted on the seed and the other
    companions and predicts the held-out one relative to the seed (what NetAdapt's decisions depend on); the
    plain model's relative prediction is the raw sum's ratio. The model with the lowest mean abs error is kept;
    ties go to the simpler (plain first). With fewer than 4 points nothing can be held out: the two-term fit is
    kept when it is physical, as before the other models existed.
    """
    plain = _plain(points)
    if len(points) < 4:
        coefficients = fit_model(points, "two-term")
        return CalibrationChoice("plain" if coefficients == plain else "two-term", *coefficients, None)
    seed = points[0]
    errors: dict[str, list[float]] = {name: [] for name in MODELS}
    for i in range(1, len(points)):
        rest = [p for j, p in enumerate(points) if j != i]
        held = points[i]
        for name in MODELS:
            a, b, c = plain if name == "plain" else fit_model(rest, name)
            pair = [a * r + b * q / 1e6 + c for r, q, _ in (seed, held)]
            errors[name].append(abs(_relative_error_pct(pair, [seed[2], held[2]])[0]))
    pct = {name: sum(e) / len(e) for name, e in errors.items()}
    fits = {name: plain if name == "plain" else fit_model(points, name) for name in MODELS}
    kept = [name for name in MODELS if name == "plain" or fits[name] != plain]  # a fit that fell back is plain
    model = min(kept, key=lambda name: (round(pct[name], 9), MODELS.index(name)))
    return CalibrationChoice(model, *fits[model], pct)


@dataclass
class Header:
    """What every entry depends on besides the block: refusing a mismatch keeps numbers comparable."""

    backend: str
    versions: dict
    threads: int
    batch: int
    device: dict
    protocol: dict

    def mismatch(self, other: "Header") -> Optional[str]:
        """The first field that differs, phrased for the user; None when compatible."""
        if self.backend != other.backend:
            return f"backend {self.backend}, not {other.backend}"
        if self.threads != other.threads:
            return f"{self.threads} thread(s), not {other.threads}"
        if self.batch != other.batch:
            return f"batch {self.batch}, not {other.batch}"
        for field_name in sorted(set(self.device) | set(other.device)):
            if self.device.get(field_name) != other.device.get(field_name):
                return f"device {field_name} {self.device.get(field_name)!r}, not {other.device.get(field_name)!r}"
        for package, version in sorted(other.versions.items()):
            # ONNX Runtime timings do not depend on torch's version (it only exports); torch's do
            if (package != "torch" or other.backend != "onnxruntime") and self.versions.get(package) != version:
                return f"{package} {self.versions.get(package)}, not {version}"
        return None


def _bad(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}; it was left untouched: fix or move it, or give another --lut path")


def _parse_key(raw: object) -> BlockKey:
    if not isinstance(raw, dict):
        raise ValueError("key is not an object")
    names = {f.name: f.type for f in fields(BlockKey)}
    if set(raw) not in (set(names), set(names) - {"residual"}):  # tables from before the flag: the rule
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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} is {value!r}, not a number")
    if value < 0 and not signed:
        raise ValueError(f"{name} is {value!r}, not a non-negative number")
    return float(value)


def read_table_file(path: PathLike) -> tuple[Header, dict[str, Entry], dict[str, Calibration]]:
    """Parse and validate a table file; any problem is one UserError line naming the file."""
    path = Path(path)
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
    if data.get("version") != SCHEMA_VERSION:
        raise _bad(path, f"has table version {data.get('version')!r}; this mnv3-search reads version "
                         f"{SCHEMA_VERSION}")
    try:
        header = Header(str(data["backend"]), dict(data["versions"]), int(data["threads"]), int(data["batch"]),
                        dict(data["device"]), dict(data["protocol"]))
        raw_entries = data["entries"]
        raw_cal = data.get("calibrations", {})
        if not isinstance(raw_entries, dict) or not isinstance(raw_cal, dict):
            raise ValueError("entries/calibrations are not objects")
        for name in ("passes", "runs_per_pass"):  # LatencyTable.open measures with the file's protocol
            if name in header.protocol and not (isinstance(header.protocol[name], int) and header.protocol[name] > 0):
                raise ValueError(f"protocol {name} is {header.protocol[name]!r}, not a positive integer")
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
                                      int(_number(raw, "runs")),
                                      _number(raw, "level") if "level" in raw else 1.0)
        except (TypeError, ValueError) as exc:
            raise _bad(path, f"entry {entry_id!r} is malformed ({exc})") from None
    calibrations: dict[str, Calibration] = {}
    for name, raw in raw_cal.items():
        try:
            b = _number(raw, "b_ms_per_mparam")
            model = raw.get("model", "two-term" if b > 0 else "plain")  # tables from before the choice
            if model not in MODELS:
                raise ValueError(f"model is {model!r}, not one of {', '.join(MODELS)}")
            c = _number(raw, "c_ms", signed=True) if "c_ms" in raw else 0.0  # tables from before the per-call term
            heldout = raw.get("heldout_pct")
            if heldout is None:  # tables from before: one field per model
                legacy = {"two-term": raw.get("heldout_two_term_pct"), "plain": raw.get("heldout_plain_pct")}
                heldout = {m: v for m, v in legacy.items() if v is not None} or None
            if heldout is not None:
                heldout = {str(m): float(v) for m, v in heldout.items()}
            calibrations[name] = Calibration(str(raw["spec_name"]), _number(raw, "raw_ms"),
                                             _number(raw, "measured_ms"), int(raw["params"]),
                                             int(raw["resolution"]), _number(raw, "a"), b,
                                             int(raw["networks"]), model, c, heldout)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _bad(path, f"calibration {name!r} is malformed ({exc})") from None
    return header, entries, calibrations


# --- the table -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    """Predicted whole-network latency: raw sum of entries and the calibrated figure."""

    raw_ms: float
    factor: float  # calibrated_ms / raw_ms
    calibrated_ms: float
    calibration: Optional[str]  # the seed whose calibration was used; None = uncalibrated (factor 1)
    params: int
    blocks: tuple[tuple[str, float], ...]  # (label, entry latency_ms)


@dataclass
class LatencyTable:
    """Entries for one device/backend/threads/batch; measures what is missing, saves after every chunk."""

    path: Path
    header: Header
    entries: dict[str, Entry] = field(default_factory=dict)
    calibrations: dict[str, Calibration] = field(default_factory=dict)
    backend: Optional[Backend] = None
    policy: InterleavedPolicy = InterleavedPolicy()
    measured: int = 0  # entries measured by this object (each entry is measured once)
    _modules: "OrderedDict[object, nn.Module]" = field(default_factory=OrderedDict, repr=False, compare=False)

    # -- opening and saving --

    @classmethod
    def open(cls, path: PathLike, backend: Backend, batch: int = 1,
             policy: InterleavedPolicy = InterleavedPolicy()) -> "LatencyTable":
        """Open `path` for `backend` (create it on first save); refuse a table made under other conditions."""
        path = Path(path)
        # a new table times on the inference thread's CPU clock where that is the latency (one CPU thread):
        # on a shared machine wall-clock entries timed a minute apart disagree by 20-40 %, CPU-time ones by ~5 %
        policy = replace(policy, clock="thread" if thread_clock_ok(backend) else "wall")
        wanted = Header(backend.name, backend.versions(), backend.threads, batch, backend.fingerprint(),
                        {"statistic": "p25", "passes": policy.passes, "runs_per_pass": policy.runs_per_pass,
                         "clock": policy.clock})
        if not path.exists():
            return cls(path, wanted, backend=backend, policy=policy)
        header, entries, calibrations = read_table_file(path)
        problem = header.mismatch(wanted)
        if problem:
            raise UserError(f"{path}: this table was measured with {problem} (here); it cannot predict this "
                            f"machine's latency: give another --lut path to build a new one")
        # entries of one table share one protocol: the file's wins over the caller's
        protocol = header.protocol
        policy = replace(policy, passes=int(protocol.get("passes", policy.passes)),
                         runs_per_pass=int(protocol.get("runs_per_pass", policy.runs_per_pass)),
                         clock=str(protocol.get("clock", "wall")))  # tables from before the clock: wall
        return cls(path, header, entries, calibrations, backend=backend, policy=policy)

    @classmethod
    def load(cls, path: PathLike) -> "LatencyTable":
        """Open for reading only (show): no backend, so nothing can be measured."""
        header, entries, calibrations = read_table_file(path)
        return cls(Path(path), header, entries, calibrations)

    def to_json(self) -> dict:
        h = self.header
        return {"schema": SCHEMA, "version": SCHEMA_VERSION, "backend": h.backend, "versions": h.versions,
                "threads": h.threads, "batch": h.batch, "device": h.device, "protocol": h.protocol,
                "calibrations": {n: c.as_json() for n, c in sorted(self.calibrations.items())},
                "entries": {i: e.as_json() for i, e in sorted(self.entries.items())}}

    @property
    def lock_path(self) -> Path:
        """The lock file beside the table that serialises every process's read-merge-write."""
        return self.path.with_name(self.path.name + ".lock")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive `fcntl` lock on `lock_path` (blocking): two writers never merge at once.

        Without it, two processes that both read the file before either renamed its copy into place would
        each write back only their own new entries, and the first rename would be lost.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def save(self) -> None:
        """Write atomically, first merging entries another process saved meanwhile (never lose an entry).

        The read, merge and rename happen under the table's lock file, so concurrent writers serialise.
        """
        with self._locked():
            self._merge_and_write()

    def _merge_and_write(self) -> None:
        if self.path.exists():
            header, entries, calibrations = read_table_file(self.path)
            problem = header.mismatch(self.header)
            if problem:
                raise UserError(f"{self.path}: another process wrote a table measured with {problem} there "
                                f"meanwhile; it was left untouched: give another --lut path")
            for entry_id, entry in entries.items():
                self.entries.setdefault(entry_id, entry)
            for name, cal in calibrations.items():
                self.calibrations.setdefault(name, cal)
        atomic_write_text(self.path, json.dumps(self.to_json(), indent=1) + "\n")

    # -- measuring --

    def missing(self, keys: Iterable[BlockKey]) -> list[BlockKey]:
        seen: dict[BlockKey, None] = {}
        for key in keys:
            if key.id not in self.entries:
                seen.setdefault(key, None)
        return list(seen)

    def _require_backend(self) -> Backend:
        if self.backend is None:
            raise UserError(f"{self.path}: opened read-only; open it with a backend to measure missing entries")
        return self.backend

    def anchors(self, exclude: Iterable[BlockKey] = ()) -> list[Entry]:
        """Up to `ANCHORS` entries already in the table, spread evenly over its latencies (deterministic)."""
        skip = {key.id for key in exclude}
        ranked = sorted((e for e in self.entries.values() if e.key.id not in skip),
                        key=lambda e: (e.latency_ms, e.key.id))
        if len(ranked) <= ANCHORS:
            return ranked
        return [ranked[round(i * (len(ranked) - 1) / (ANCHORS - 1))] for i in range(ANCHORS)]

    def ensure(self, keys: Iterable[BlockKey], progress: Optional[Progress] = None) -> int:
        """Measure the entries of `keys` not yet in the table (interleaved, in chunks); returns how many.

        Every chunk also times `anchors`, entries the table already holds: the median of their new / stored
        figures is the host's level at that moment (`anchor_level`), and the chunk's entries are divided by it.
        Without this, entries timed minutes apart (a NetAdapt run measures new widths as it goes) carry the
        host's drift of 15-30 % into the sums, and a network's predicted share depends on when its blocks were
        timed: a Small table grown over a benchmark had a quarter of its entries 19-115 % above a fresh
        timing of the same blocks.
        """
        todo = self.missing(keys)
        if not todo:
            return 0
        backend = self._require_backend()
        total = 2.0 * len(todo)
        done = 0.0
        rng = random.Random(self.policy.seed)
        rng.shuffle(todo)  # neighbours in a chunk should not all be the same block
        for start in range(0, len(todo), CHUNK_ENTRIES):
            chunk = todo[start:start + CHUNK_ENTRIES]
            anchors = self.anchors(exclude=todo[start:])  # a new table's first chunk has none; the next ones do
            runners = []
            for key in chunk:
                runners.append(backend.runner(key.module(), key.input_shape(self.header.batch)))
                done += 1
                if progress:
                    progress(done, total, f"opening {key.kind}")
            runners += [backend.runner(self._module(e.key.id, e.key.module), e.key.input_shape(self.header.batch))
                        for e in anchors]
            base = done

            def on_pass(passes_done: int, passes: int, base: float = base, n: int = len(chunk)) -> None:
                if progress:
                    progress(base + n * passes_done / passes, total, "timing entries")

            measurements = measure_interleaved(runners, self.policy, on_pass=on_pass)
            level = anchor_level(anchors, measurements[len(chunk):])
            done = base + len(chunk)
            for key, m in zip(chunk, measurements):
                self.entries[key.id] = Entry.from_measurement(key, m, level)
            self.measured += len(chunk)
            del runners
            self.save()
        return len(todo)

    def measure_networks(self, specs: Sequence[ArchSpec],
                         on_pass: Optional[Callable[[int, int], None]] = None) -> list[Measurement]:
        """Whole networks under the table's protocol (interleaved, p25): what predictions are compared with."""
        return measure_interleaved(self._network_runners(specs), self.policy, on_pass=on_pass)

    def measure_together(self, specs: Sequence[ArchSpec], tolerance: float = 0.05,
                         on_pass: Optional[Callable[[int, int], None]] = None) -> Together:
        """Whole networks in one interleaved measurement, ratios to `specs[0]` checked for interference
        (re-measured once when disturbed, then marked unreliable)."""
        return measure_together(self._network_runners(specs), self.policy, reference=0, tolerance=tolerance,
                                on_pass=on_pass)

    def _network_runners(self, specs: Sequence[ArchSpec]) -> list[Runner]:
        """A fresh runner (session) per network, on a module built once per shape (`_module`)."""
        backend = self._require_backend()
        return [backend.runner(self._module(s, partial(build_model, s)),
                               (self.header.batch, 3, s.resolution, s.resolution)) for s in specs]

    def _module(self, shape: object, build: Callable[[], nn.Module]) -> nn.Module:
        """The module for `shape` (an ArchSpec or an entry id), built on first use and kept for the next
        `MODULES_KEPT` shapes. Why: an ONNX backend exports once per module object (`export_onnx`), and the
        export (about 1.4 s for Large at 224 px here) cost more than the timing itself when NetAdapt times the
        seed beside every iteration's network three times, and every chunk of new entries beside the same
        anchors. Each timing still opens a new session."""
        module = self._modules.pop(shape, None)
        if module is None:
            module = build()
        self._modules[shape] = module
        while len(self._modules) > MODULES_KEPT:
            self._modules.popitem(last=False)
        return module

    def calibrate(self, spec: ArchSpec, measured_ms: Optional[float] = None, companions: int = 8,
                  on_pass: Optional[Callable[[int, int], None]] = None) -> Calibration:
        """Fit the calibration for `spec.name` on whole networks timed with the table's protocol.

        The seed is timed interleaved with `companions` networks of its depth (`calibration_companions`) and
        each model is fitted on all of them; a fitted model is kept only if it predicts held-out companions
        relative to the seed better than the raw block sum does (`choose_calibration`), and
        `Calibration.model` records which. With `measured_ms` given, or no companions, the seed alone sets a
        plain factor. Entries the networks need are measured first.
        """
        networks = [spec] if measured_ms is not None else [spec] + calibration_companions(spec, companions)
        self.ensure(key for s in networks for _, key in spec_keys(s))
        if measured_ms is None:
            measured = [m.p25_ms for m in self.measure_networks(networks, on_pass)]
        else:
            measured = [measured_ms]
        points = [(self.raw_ms(s), spec_params(s), m) for s, m in zip(networks, measured)]
        choice = choose_calibration(points)
        cal = Calibration(spec.name, points[0][0], points[0][2], points[0][1], spec.resolution, choice.a,
                          choice.b_ms_per_mparam, len(points), choice.model, choice.c_ms, choice.heldout_pct)
        self.calibrations[spec.name] = cal
        self.save()
        return cal

    # -- predicting --

    def raw_ms(self, spec: ArchSpec) -> float:
        return sum(self.entries[key.id].latency_ms for _, key in spec_keys(spec))

    def calibration_for(self, spec: ArchSpec) -> Optional[Calibration]:
        """The seed calibration of the same name, else the one nearest in resolution then parameter count."""
        if spec.name in self.calibrations:
            return self.calibrations[spec.name]
        if not self.calibrations:
            return None
        params = spec_params(spec)
        return min(self.calibrations.values(),
                   key=lambda c: (abs(c.resolution - spec.resolution), abs(math.log(c.params / params))))

    def predict(self, spec: ArchSpec, measure_missing: bool = True) -> Prediction:
        """Calibrated latency of `spec`; dictionary look-ups only once its entries exist."""
        keys = spec_keys(spec)
        missing = [key for _, key in keys if key.id not in self.entries]
        if missing:
            if not measure_missing:
                raise UserError(f"{self.path}: {len(missing)} block(s) of {spec.name} are not in the table "
                                f"(e.g. {missing[0].id}); run `mnv3-search lut build` for this spec")
            self.ensure(missing)
        blocks = tuple((label, self.entries[key.id].latency_ms) for label, key in keys)
        raw = sum(ms for _, ms in blocks)
        cal = self.calibration_for(spec)
        params = sum(key.params for _, key in keys)
        calibrated = cal.apply(raw, params) if cal else raw
        return Prediction(raw, calibrated / raw, calibrated, cal.spec_name if cal else None, params,
                          blocks)


# --- library entry points for the CLI ------------------------------------------------------------------------

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


def open_for_run(path: Optional[PathLike], backend: Backend, seed: ArchSpec,
                 on_calibrate: Optional[Callable[[], None]] = None) -> LatencyTable:
    """The table a run predicts with: `path`, or the machine's default table. Entries it holds are never
    measured again; the seed is calibrated only when the table has no calibration for this very network
    (same name, resolution and parameter count), so runs on one machine share and extend one file."""
    table = LatencyTable.open(Path(path) if path else default_table_path(backend), backend)
    cal = table.calibrations.get(seed.name)
    if cal is None or (cal.resolution, cal.params) != (seed.resolution, spec_params(seed)):
        if on_calibrate:
            on_calibrate()
        table.calibrate(seed)
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


def build_table(table: LatencyTable, spec: ArchSpec, step: int = 8,
                progress: Optional[Progress] = None) -> BuildReport:
    """Pre-populate what NetAdapt needs for `spec` (steps of `step`), then calibrate on the seed network."""
    start = time.perf_counter()
    keys = netadapt_keys(spec, step)
    measured = table.ensure(keys, progress)
    calibration = table.calibrate(spec)
    return BuildReport(len(keys), measured, time.perf_counter() - start, calibration)


@dataclass(frozen=True)
class CheckRow:
    """One network: predicted (raw sum, calibrated) vs measured p25, absolute and relative to the seed.

    The `*_ratio` fields are this network over the seed: predicted from the table, measured in the same
    interleaved measurement. The seed's own row has ratios 1 and relative errors 0.
    """

    network: str
    raw_ms: float
    predicted_ms: float
    measured_ms: float
    measured_median_ms: float
    predicted_ratio: float = 1.0
    raw_ratio: float = 1.0
    measured_ratio: float = 1.0

    @property
    def error_pct(self) -> float:
        return 100.0 * (self.predicted_ms - self.measured_ms) / self.measured_ms

    @property
    def raw_error_pct(self) -> float:
        return 100.0 * (self.raw_ms - self.measured_ms) / self.measured_ms

    @property
    def relative_error_pct(self) -> float:
        """Calibrated prediction relative to the seed vs measured relative to the seed timed beside it."""
        return 100.0 * (self.predicted_ratio / self.measured_ratio - 1.0)

    @property
    def raw_relative_error_pct(self) -> float:
        return 100.0 * (self.raw_ratio / self.measured_ratio - 1.0)


def variant_specs(spec: ArchSpec, n: int, seed: int = 0, step: int = 8) -> list[ArchSpec]:
    """`n` random channel variants of `spec` (multiples of `step`), named variant-1..n, reproducible by seed."""
    rng = random.Random(seed)
    return [replace(random_variant(spec, rng, step), name=spec.name) for _ in range(n)]


# the first companions shrink every group alike, to these shares of the seed's channels; the rest are random
UNIFORM_COMPANIONS = (0.5, 0.25)


def calibration_companions(spec: ArchSpec, n: int, step: int = 8) -> list[ArchSpec]:
    """`n` networks the calibration is fitted on beside the seed: uniform shrinks (`UNIFORM_COMPANIONS`), so the
    fit sees networks as small as low budgets reach (random variants keep most groups: 60-90 % of the seed),
    then random variants."""
    uniform = [replace(uniform_variant(spec, f, step), name=spec.name) for f in UNIFORM_COMPANIONS[:n]]
    return uniform + variant_specs(spec, n - len(uniform), seed=-1, step=step)


@dataclass(frozen=True)
class CheckReport:
    """`check_table`'s answer: rows (seed first), how far the host drifted since calibration, reliability.

    `drift_pct` = seed measured now / seed measured at calibration - 1: the absolute level moved by that much,
    so every absolute prediction is off by about as much, while ratios to the seed are not.
    """

    rows: list[CheckRow]
    calibration: Calibration
    drift_pct: float
    ratio_shift: float
    reliable: bool
    attempts: int
    spread: float = 0.0  # largest p25 / min - 1 of the networks (see `measure_together`)


def check_table(table: LatencyTable, spec: ArchSpec, n: int, seed: int = 0, step: int = 8,
                progress: Optional[Progress] = None) -> CheckReport:
    """Seed plus `n` random variants: prediction vs whole networks measured together (interleaved, p25).

    Missing entries are measured first (and cached); the seed is calibrated first if it never was. Errors
    are reported absolute (against the calibration's absolute level, which drifts) and relative to the seed
    timed in the same measurement (what NetAdapt's decisions depend on).
    """
    variants = variant_specs(spec, n, seed, step)
    networks = [spec.scaled()] + variants
    table.ensure((key for s in networks for _, key in spec_keys(s)), progress)
    cal = table.calibrations[spec.name] if spec.name in table.calibrations else table.calibrate(spec)
    predictions = [table.predict(s, measure_missing=False) for s in networks]

    def on_pass(done: int, total: int) -> None:
        if progress:
            progress(done, total, "timing networks")

    together = table.measure_together(networks, on_pass=on_pass)
    measurements = together.measurements
    names = ["seed"] + [f"variant {i}" for i in range(1, n + 1)]
    p0, m0 = predictions[0], measurements[0]
    rows = [CheckRow(name, p.raw_ms, p.calibrated_ms, m.p25_ms, m.median_ms, p.calibrated_ms / p0.calibrated_ms,
                     p.raw_ms / p0.raw_ms, m.p25_ms / m0.p25_ms)
            for name, p, m in zip(names, predictions, measurements)]
    return CheckReport(rows, cal, 100.0 * (m0.p25_ms / cal.measured_ms - 1.0), together.ratio_shift,
                       together.reliable, together.attempts, together.spread)


def check_variants(table: LatencyTable, spec: ArchSpec, n: int, seed: int = 0, step: int = 8,
                   progress: Optional[Progress] = None) -> list[CheckRow]:
    """The rows of `check_table`: the seed first, then `n` random variants."""
    return check_table(table, spec, n, seed, step, progress).rows


@dataclass(frozen=True)
class ErrorSummary:
    """How good predictions were over variants (the seed row excluded): the figures to quote.

    Absolute figures (`mape_pct`...) compare with the calibration's level; `rel_*` compare ratios to the seed
    timed in the same measurement.
    """

    count: int
    mape_pct: float
    worst_pct: float
    within_10_pct: float  # share of variants within +-10 %, in percent
    raw_mape_pct: float
    rel_mape_pct: float = math.nan
    rel_worst_pct: float = math.nan
    rel_within_10_pct: float = math.nan
    raw_rel_mape_pct: float = math.nan


def summarize_errors(rows: Sequence[CheckRow]) -> ErrorSummary:
    variants = [r for r in rows if r.network != "seed"] or list(rows)
    errors = [abs(r.error_pct) for r in variants]
    relative = [abs(r.relative_error_pct) for r in variants]
    return ErrorSummary(len(variants), sum(errors) / len(errors), max(errors),
                        100.0 * sum(e <= 10.0 for e in errors) / len(errors),
                        sum(abs(r.raw_error_pct) for r in variants) / len(variants),
                        sum(relative) / len(relative), max(relative),
                        100.0 * sum(e <= 10.0 for e in relative) / len(relative),
                        sum(abs(r.raw_relative_error_pct) for r in variants) / len(variants))


# --- judging a network against a budget through a reference timed now --------------------------------------

@dataclass(frozen=True)
class RelativeVerdict:
    """A candidate judged against a budget through a reference network timed in the same measurement.

    `budget_ratio` is the budget as a share of the reference *now*: a relative budget as given, an absolute
    one divided by `reference_ms` (the reference measured in this measurement, not at calibration). `ok` is
    `measured_ratio <= budget_ratio`; decide on it only when `reliable`.
    """

    reference_ms: float  # reference p25, this measurement
    candidate_ms: float  # candidate p25, this measurement
    measured_ratio: float  # candidate / reference, timed together
    predicted_ratio: float  # the table's prediction of the same ratio
    predicted_reference_ms: float  # the table's (calibrated) prediction for the reference
    budget_ratio: float
    ok: bool
    reliable: bool
    ratio_shift: float
    attempts: int
    spread: float = 0.0  # largest p25 / min - 1 of the two (see `measure_together`)

    @property
    def table_budget_ms(self) -> float:
        """The budget on the table's scale (what predictions should be aimed at): the budget's share of the
        reference now, times the table's prediction for the reference."""
        return self.budget_ratio * self.predicted_reference_ms

    @property
    def disagreement_pct(self) -> float:
        """How far the table's ratio missed the measured one (positive: the table predicted too slow)."""
        return 100.0 * (self.predicted_ratio / self.measured_ratio - 1.0)


def relative_to_reference(table: LatencyTable, reference: ArchSpec, candidate: ArchSpec, *,
                          budget_ms: Optional[float] = None, budget_ratio: Optional[float] = None,
                          tolerance: float = 0.05) -> RelativeVerdict:
    """Judge `candidate` against a budget by timing it beside `reference` (e.g. the seed) now.

    Give exactly one of `budget_ms` (absolute: converted through the reference measured in this same
    measurement) or `budget_ratio` (share of the reference). The measurement is repeated once when the
    ratio moved within it (`measure_together`); if it is still disturbed the verdict says `reliable` False.
    """
    if (budget_ms is None) == (budget_ratio is None):
        raise ValueError("give exactly one of budget_ms or budget_ratio")
    together = table.measure_together([reference, candidate], tolerance)
    ref_m, cand_m = together.measurements
    p_ref = table.predict(reference)
    p_cand = table.predict(candidate)
    ratio = together.ratio(1)
    if budget_ratio is not None:
        limit = budget_ratio
    else:
        assert budget_ms is not None  # exactly one of the two, checked above
        limit = budget_ms / ref_m.p25_ms
    return RelativeVerdict(ref_m.p25_ms, cand_m.p25_ms, ratio, p_cand.calibrated_ms / p_ref.calibrated_ms,
                           p_ref.calibrated_ms, limit, ratio <= limit, together.reliable, together.ratio_shift,
                           together.attempts, together.spread)
