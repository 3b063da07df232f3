"""Per-block profile of a network: shapes, params, MACs (fvcore) and optionally measured latency.

MACs here are the paper's "MAdds": multiply-adds of convolutions and linear layers. fvcore's own total,
which also counts batch norm and pooling, is kept beside it under its own name, never mixed in.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .latency import Backend, LatencyTable, Measurement, Prediction, TimingPolicy, measure
from .model.build import MobileNetV3
from .model.layout import unit_modules
from .spec.arch import ArchSpec
from .spec.units import BneckUnit, ClassifierUnit, Unit, spec_units

MADD_OPERATORS = ("conv", "linear", "matmul", "einsum", "bmm")


@dataclass
class BlockRow:
    """One line of the profile table."""

    block: str
    module: str
    in_channels: int
    out_channels: int
    kernel: Optional[int]
    stride: Optional[int]
    exp: Optional[int]
    se: Optional[bool]
    nl: str
    output_size: str
    params: int
    macs: int
    fvcore_total: int
    latency_ms: Optional[float] = None
    latency_p10_ms: Optional[float] = None
    latency_p90_ms: Optional[float] = None
    latency_share: Optional[float] = None
    lut_ms: Optional[float] = None  # the lookup table's entry for this block (p25, timed in isolation)


@dataclass
class Profile:
    spec_name: str
    resolution: int
    batch: int
    rows: list[BlockRow]
    backend: Optional[str] = None
    threads: Optional[int] = None
    whole: Optional[Measurement] = None
    precision: str = "fp32"
    device: Optional[str] = None  # a --runner's device; None: this machine
    meta: dict = field(default_factory=dict)
    prediction: Optional[Prediction] = None  # from a latency lookup table, when one was given

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def fvcore_total(self) -> int:
        return sum(r.fvcore_total for r in self.rows)

    @property
    def blocks_latency_ms(self) -> Optional[float]:
        timed = [r.latency_ms for r in self.rows if r.latency_ms is not None]
        return sum(timed) if len(timed) == len(self.rows) else None

    def as_dict(self) -> dict:
        return {
            "spec": self.spec_name,
            "resolution": self.resolution,
            "batch": self.batch,
            "totals": {"params": self.params, "macs": self.macs, "fvcore_total": self.fvcore_total,
                       "blocks_latency_ms": self.blocks_latency_ms},
            "latency": None if self.whole is None else {
                "backend": self.backend, "precision": self.precision, "threads": self.threads, "device": self.device,
                **self.whole.as_dict()},
            "rows": [asdict(r) for r in self.rows],
            **({} if self.prediction is None else {"lut": {
                "raw_ms": self.prediction.raw_ms, "factor": self.prediction.factor,
                "predicted_ms": self.prediction.calibrated_ms, "calibration": self.prediction.calibration}}),
            **self.meta,
        }


@dataclass(frozen=True)
class _Unit:
    """A profiled unit of the network (one of `spec_units`): its module path(s) and the module to time."""

    unit: Unit
    module_names: tuple[str, ...]
    module: nn.Module

    @property
    def block(self) -> str:
        return self.unit.label


def _units(model: MobileNetV3) -> Iterator[_Unit]:
    for unit in spec_units(model.spec):
        names = unit_modules(unit)
        module = model.head() if isinstance(unit, ClassifierUnit) else model.get_submodule(names[0])
        yield _Unit(unit, names, module)


def _row_fields(unit: Unit) -> dict:
    """The profile's descriptive columns of one unit (None where a column means nothing for it)."""
    if isinstance(unit, BneckUnit):
        c = unit.config
        return dict(kernel=c.kernel, stride=c.stride, exp=c.exp, se=c.se)
    if isinstance(unit, ClassifierUnit):
        return dict(kernel=None, stride=None, exp=None, se=None)
    return dict(kernel=unit.kernel, stride=unit.stride, exp=None, se=None)


def fvcore_counts(model: nn.Module, resolution: int) -> dict[str, dict[str, int]]:
    """Per-module, per-operator counts for one image; fvcore's warnings are kept off the terminal."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        logger = logging.getLogger("fvcore")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            analysis = FlopCountAnalysis(model.eval(), torch.zeros(1, 3, resolution, resolution))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            return {name: dict(ops) for name, ops in analysis.by_module_and_operator().items()}
        finally:
            logger.setLevel(level)


def profile_model(model: MobileNetV3, *, batch: int = 1, backend: Optional[Backend] = None,
                  policy: TimingPolicy = TimingPolicy(), whole_policy: TimingPolicy = TimingPolicy(max_seconds=1.5),
                  progress: Optional[Callable[[str], None]] = None) -> Profile:
    """Profile `model` at its spec's resolution; with a backend, time each block and the whole network."""
    spec: ArchSpec = model.spec
    resolution = spec.resolution
    units = list(_units(model))
    counts = fvcore_counts(model, resolution)
    rows = []
    for item in units:
        unit = item.unit
        ops: dict[str, int] = {}
        for name in item.module_names:
            for op, n in counts.get(name, {}).items():
                ops[op] = ops.get(op, 0) + n
        size = str(unit.out_channels) if isinstance(unit, ClassifierUnit) else \
            f"{unit.out_resolution}x{unit.out_resolution}"
        rows.append(BlockRow(
            block=unit.label, module="+".join(item.module_names), in_channels=unit.in_channels,
            out_channels=unit.out_channels, **_row_fields(unit), nl=unit.nl, output_size=size,
            params=sum(p.numel() for p in item.module.parameters()),
            macs=sum(n for op, n in ops.items() if op in MADD_OPERATORS), fvcore_total=sum(ops.values()),
        ))
    profile = Profile(spec.name, resolution, batch, rows)
    if backend is None:
        return profile
    profile.backend, profile.threads, profile.precision = backend.name, backend.threads, backend.precision
    device = backend.fingerprint().get("device")
    profile.device = None if device is None else str(device)
    medians: list[float] = []
    for item, row in zip(units, rows):
        if progress:
            progress(item.block)
        shape = (batch, item.unit.in_channels, item.unit.resolution, item.unit.resolution)
        m = measure(backend.runner(item.module, shape), policy)
        row.latency_ms, row.latency_p10_ms, row.latency_p90_ms = m.median_ms, m.p10_ms, m.p90_ms
        medians.append(m.median_ms)
    total = sum(medians)
    for row, ms in zip(rows, medians):
        row.latency_share = ms / total if total else 0.0
    if progress:
        progress("whole network")
    profile.whole = measure(backend.runner(model, (batch, 3, resolution, resolution)), whole_policy)
    return profile


def attach_prediction(profile: Profile, table: LatencyTable, spec: ArchSpec) -> Prediction:
    """Put the table's per-block entries beside the measured ones (missing entries are measured first)."""
    prediction = table.predict(spec)
    by_label = dict(prediction.blocks)
    for row in profile.rows:
        row.lut_ms = by_label[row.block]
    profile.prediction = prediction
    return prediction
