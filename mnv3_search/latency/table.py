"""The per-block latency table of one device, backend, precision, thread count and batch: open, measure, predict.

Entries are keyed by everything that changes a block's cost (`BlockKey`). Each entry is a block timed in
isolation; entries are timed in shuffled round-robin passes and store the 25th percentile, which survives the
host's slow bursts (REFERENCE §4). A prediction sums a network's entries and applies the calibration fitted on
whole networks (`calibration`), since the sum of blocks timed alone is not the whole network's latency.

Entries timed minutes apart sit on different levels of a shared host, so every chunk of new entries is timed
beside `ANCHORS` entries already in the table and divided by their median ratio (`anchor_level`).

The table is one JSON file (`tablefile`) shared by every run and command on the machine: each save merges what
other processes saved meanwhile under a lock file and writes atomically.
"""

from __future__ import annotations

import fcntl
import math
import random
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from torch import nn

from ..errors import UserError
from ..fileio import PathLike, atomic_write_text
from ..model.build import build_model
from ..model.counts import spec_macs, spec_params
from ..spec.arch import ArchSpec
from .backends import Backend, thread_clock_ok
from .calibration import Calibration, choose_calibration
from .keys import BlockKey, spec_keys
from .protocol import InterleavedPolicy, Measurement, Runner, Together, measure_interleaved, measure_together
from .tablefile import Entry, Header, read_table_file, table_text

# Entries are timed in chunks: every session of a chunk is open at once and interleaved.
CHUNK_ENTRIES = 160
# Entries already in the table timed again with every chunk, to put the chunk on the table's level.
ANCHORS = 8
CALIBRATION_PASSES = 2  # the calibration's whole networks are timed this many times the table's passes
MODULES_KEPT = 16  # networks and anchor blocks kept built (and exported) for the next timing of the same shape

Progress = Callable[[float, float, str], None]  # (done, total, what)


def anchor_level(anchors: Sequence[Entry], now: Sequence[Measurement]) -> float:
    """The host's level now relative to the table's: the median of anchors' p25 now / stored (1.0 without)."""
    ratios = sorted(m.p25_ms / e.latency_ms for e, m in zip(anchors, now))
    if not ratios:
        return 1.0
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else 0.5 * (ratios[mid - 1] + ratios[mid])


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
    """Entries for one device/backend/precision/threads/batch; measures what is missing, saves after every chunk."""

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
                         "clock": policy.clock}, backend.precision)
        if not path.exists():
            return cls(path, wanted, backend=backend, policy=policy)
        header, entries, calibrations = read_table_file(path)
        problem = header.mismatch(wanted)
        if problem:
            raise UserError(f"{path}: this table was measured with {problem} (here); it cannot predict this "
                            f"machine's latency: give another --lut path to build a new one")
        # entries of one table share one protocol: the file's wins over the caller's
        protocol = header.protocol
        policy = replace(policy, passes=int(protocol["passes"]), runs_per_pass=int(protocol["runs_per_pass"]),
                         clock=str(protocol["clock"]))
        return cls(path, header, entries, calibrations, backend=backend, policy=policy)

    @classmethod
    def load(cls, path: PathLike) -> "LatencyTable":
        """Open for reading only (show): no backend, so nothing can be measured."""
        header, entries, calibrations = read_table_file(path)
        return cls(Path(path), header, entries, calibrations)

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
        atomic_write_text(self.path, table_text(self.header, self.entries, self.calibrations))

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

    def measure_networks(self, specs: Sequence[ArchSpec], on_pass: Optional[Callable[[int, int], None]] = None,
                         passes: Optional[int] = None) -> list[Measurement]:
        """Whole networks under the table's protocol (interleaved, p25; `passes` instead of the table's where
        given): what predictions are compared with."""
        policy = self.policy if passes is None else replace(self.policy, passes=passes)
        return measure_interleaved(self._network_runners(specs), policy, on_pass=on_pass)

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
        export (about 1.4 s for Large at 224 px) costs more than the timing itself when NetAdapt times the
        seed beside every iteration's network three times, and every chunk of new entries beside the same
        anchors. Each timing still opens a new session."""
        module = self._modules.pop(shape, None)
        if module is None:
            module = build()
        self._modules[shape] = module
        while len(self._modules) > MODULES_KEPT:
            self._modules.popitem(last=False)
        return module

    def calibrate(self, spec: ArchSpec, companions: Sequence[ArchSpec] = (), measured_ms: Optional[float] = None,
                  on_pass: Optional[Callable[[int, int], None]] = None,
                  progress: Optional[Progress] = None) -> Calibration:
        """Fit the calibration for `spec.name` on whole networks timed with the table's protocol.

        The seed is timed interleaved with `companions`, networks of its depth (`prune.variants` makes them:
        `calibration_companions`), and each model is fitted on all of them; a fitted model is kept only if it
        predicts held-out companions relative to the seed better than the raw block sum does
        (`choose_calibration`), and `Calibration.model` records which. With `measured_ms` given, or no
        companions, the seed alone sets a plain factor. Entries the networks need are measured first.
        """
        networks = [spec] if measured_ms is not None else [spec, *companions]
        self.ensure((key for s in networks for _, key in spec_keys(s)), progress)
        if measured_ms is None:
            # twice the table's passes: every prediction inherits this measurement's noise, and on a shared host
            # ratios of whole networks timed a minute apart differ by 2-4 %; the wholes cost seconds, the
            # entries minutes
            measured = [m.p25_ms for m in self.measure_networks(networks, on_pass,
                                                               CALIBRATION_PASSES * self.policy.passes)]
        else:
            measured = [measured_ms]
        points = [(self.raw_ms(s), spec_params(s), m) for s, m in zip(networks, measured)]
        choice = choose_calibration(points)
        smallest = min((spec_macs(s) / spec_macs(spec) for s in networks[1:]), default=None)
        cal = Calibration(spec.name, points[0][0], points[0][2], points[0][1], spec.resolution, choice.a,
                          choice.b_ms_per_mparam, len(points), choice.model, choice.c_ms, choice.heldout_pct,
                          smallest)
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
