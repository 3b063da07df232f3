"""Judging a network against a budget through a reference network (e.g. the seed) timed beside it now.

Absolute levels drift on a shared host while ratios of networks timed together hold, so a budget is turned
into a share of the reference measured in the same measurement, and the candidate's measured share decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..spec.arch import ArchSpec
from .table import LatencyTable


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
