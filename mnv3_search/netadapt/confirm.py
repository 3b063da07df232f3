"""Confirmation by measurement: a network timed beside the seed decides whether a latency budget is met.

The latency table ranks a parent's children well, but its error grows as the network shrinks, so neither
search stops on the table's word: the network is timed together with the seed and the budget is judged on
their ratio (an absolute budget through the seed measured in the same measurement, never through a
calibration from an earlier minute). Under load one timing moves by several percent, and the best of several
single timings would be a lucky one (over budget when timed again), so `CONFIRM_TIMINGS` timings are taken and
the median share of the seed decides. With a MACs or params budget the count is exact: nothing is timed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..budget import Budget
from ..latency import LatencyTable, relative_to_reference
from ..spec.arch import ArchSpec
from .events import Event
from .runfolder import IterationRecord

CONFIRM_ATTEMPTS = 3  # measurements before a disturbed one is used (and marked unreliable)
CONFIRM_TIMINGS = 3  # timings beside the seed per confirmation; the median share of the seed decides


@dataclass(frozen=True)
class Confirmation:
    """A verdict and the iterations.csv fields it fills (none without a latency budget)."""

    ok: bool
    row_update: dict[str, Any]


class Confirmer:
    """Times networks beside the seed for one run: its timing table (None: nothing to time), budget and seed."""

    def __init__(self, table: Optional[LatencyTable], budget: Budget, seed_spec: ArchSpec, seed_value: float,
                 emit: Event) -> None:
        self.table = table
        self.budget = budget
        self.seed_spec = seed_spec
        self.seed_value = seed_value  # the seed's table figure: a relative budget's measurements in its units
        self.emit = emit

    def once(self, spec: ArchSpec) -> Confirmation:
        """One timing of `spec` beside the seed. A measurement disturbed by the host is repeated; if all
        `CONFIRM_ATTEMPTS` are disturbed the verdict of the last is used and the row says `latency_reliable`
        False."""
        if self.table is None:
            return Confirmation(True, {})
        limit = {"budget_ratio": self.budget.value} if self.budget.relative else {"budget_ms": self.budget.value}
        for attempt in range(1, CONFIRM_ATTEMPTS + 1):
            verdict = relative_to_reference(self.table, self.seed_spec, spec, **limit)
            if verdict.reliable:
                break
            self.emit("unreliable", attempt=attempt, ratio_shift=verdict.ratio_shift, spread=verdict.spread)
        measured, seed_measured = verdict.candidate_ms, verdict.reference_ms
        self.emit("confirm", measured=measured, seed_measured=seed_measured, ok=verdict.ok,
                  reliable=verdict.reliable)
        return Confirmation(verdict.ok, {"measured_latency_ms": measured, "seed_measured_latency_ms": seed_measured,
                                         "latency_reliable": verdict.reliable})

    def median(self, spec: ArchSpec) -> Confirmation:
        """`once` CONFIRM_TIMINGS times; the timing with the median share of the seed decides."""
        if self.table is None:
            return self.once(spec)
        timings = [self.once(spec) for _ in range(CONFIRM_TIMINGS)]
        timings.sort(key=lambda t: t.row_update["measured_latency_ms"] / t.row_update["seed_measured_latency_ms"])
        return timings[len(timings) // 2]

    def equivalent(self, row: IterationRecord) -> float:
        """A confirmation's measurement in the target's units: for a relative budget, the measured share of
        the seed (timed together) times the seed's table figure; for an absolute one, the measurement."""
        assert row.measured_latency_ms and row.seed_measured_latency_ms
        if self.budget.relative:
            return row.measured_latency_ms / row.seed_measured_latency_ms * self.seed_value
        return row.measured_latency_ms

    def corrected_target(self, rows: Sequence[IterationRecord], target: float) -> float:
        """The table's target after the last measurement disagreed with it: scaled by predicted / measured."""
        for row in reversed(rows):
            if row.measured_latency_ms and row.predicted_latency_ms and row.seed_measured_latency_ms:
                return target * row.predicted_latency_ms / self.equivalent(row)
        return target
