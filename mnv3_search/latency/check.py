"""Checking a table: its predictions against whole networks measured together now.

Absolute levels drift on a shared host (tens of percent within a minute) while ratios of networks timed
together hold, so `check_table` reports errors relative to the seed timed beside the variants as well as
absolute ones, plus the drift since calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from ..spec.arch import ArchSpec
from .calibration import Calibration
from .keys import spec_keys
from .table import LatencyTable, Progress


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


def check_table(table: LatencyTable, spec: ArchSpec, variants: Sequence[ArchSpec], companions: Sequence[ArchSpec],
                progress: Optional[Progress] = None) -> CheckReport:
    """The seed and `variants` (e.g. `prune.variants.variant_specs`): prediction vs whole networks measured
    together (interleaved, p25).

    Missing entries are measured first (and cached); the seed is calibrated first (beside `companions`) if it
    never was. Errors are reported absolute (against the calibration's absolute level, which drifts) and
    relative to the seed timed in the same measurement (what NetAdapt's decisions depend on).
    """
    networks = [spec.scaled(), *variants]
    table.ensure((key for s in networks for _, key in spec_keys(s)), progress)
    cal = table.calibrations[spec.name] if spec.name in table.calibrations else table.calibrate(spec, companions)
    predictions = [table.predict(s, measure_missing=False) for s in networks]

    def on_pass(done: int, total: int) -> None:
        if progress:
            progress(done, total, "timing networks")

    together = table.measure_together(networks, on_pass=on_pass)
    measurements = together.measurements
    names = ["seed"] + [f"variant {i}" for i in range(1, len(variants) + 1)]
    p0, m0 = predictions[0], measurements[0]
    rows = [CheckRow(name, p.raw_ms, p.calibrated_ms, m.p25_ms, m.median_ms, p.calibrated_ms / p0.calibrated_ms,
                     p.raw_ms / p0.raw_ms, m.p25_ms / m0.p25_ms)
            for name, p, m in zip(names, predictions, measurements)]
    return CheckReport(rows, cal, 100.0 * (m0.p25_ms / cal.measured_ms - 1.0), together.ratio_shift,
                       together.reliable, together.attempts, together.spread)


def check_variants(table: LatencyTable, spec: ArchSpec, variants: Sequence[ArchSpec],
                   companions: Sequence[ArchSpec], progress: Optional[Progress] = None) -> list[CheckRow]:
    """The rows of `check_table`: the seed first, then `variants`."""
    return check_table(table, spec, variants, companions, progress).rows


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
    # the mean of the signed seed-relative errors: a bias (every small network predicted slow, say) shows here
    # while noise averages out
    rel_bias_pct: float = math.nan
    raw_rel_bias_pct: float = math.nan
    smallest_ratio: float = math.nan  # the variants' measured shares of the seed: the sizes the check covered
    largest_ratio: float = math.nan


def summarize_errors(rows: Sequence[CheckRow]) -> ErrorSummary:
    variants = [r for r in rows if r.network != "seed"] or list(rows)
    n = len(variants)
    errors = [abs(r.error_pct) for r in variants]
    relative = [abs(r.relative_error_pct) for r in variants]
    return ErrorSummary(n, sum(errors) / n, max(errors), 100.0 * sum(e <= 10.0 for e in errors) / n,
                        sum(abs(r.raw_error_pct) for r in variants) / n,
                        sum(relative) / n, max(relative), 100.0 * sum(e <= 10.0 for e in relative) / n,
                        sum(abs(r.raw_relative_error_pct) for r in variants) / n,
                        sum(r.relative_error_pct for r in variants) / n,
                        sum(r.raw_relative_error_pct for r in variants) / n,
                        min(r.measured_ratio for r in variants), max(r.measured_ratio for r in variants))
