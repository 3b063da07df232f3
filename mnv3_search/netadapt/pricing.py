"""What a network costs in the budget's unit, and whether the budget can be reached at all.

MACs and params are exact counts of the spec; latency is the run's latency table's prediction (calibrated ms).
Every search prices its candidates here, so the budget's unit is decided in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from ..budget import LATENCY, MACS, PARAMS, Budget
from ..errors import UserError
from ..latency import LatencyTable, relative_to_reference, spec_keys
from ..model.counts import spec_macs, spec_params
from ..prune.groups import find_group, proposal_groups
from ..prune.surgery import child_spec
from ..spec.arch import ArchSpec


class BudgetUnreachable(UserError):
    """The budget cannot be met by this search space; the run folder keeps what was reached."""

    exit_code = 3  # distinct from bad input (2), so scripts can try a looser budget


@dataclass(frozen=True)
class Pricing:
    """The budget and, for a latency budget, the table that prices networks (None for MACs and params)."""

    budget: Budget
    table: Optional[LatencyTable] = None

    def __post_init__(self) -> None:
        if self.budget.resource == LATENCY and self.table is None:
            raise ValueError("a latency budget is priced by a latency table")

    @property
    def is_latency(self) -> bool:
        return self.budget.resource == LATENCY

    @property
    def timing_table(self) -> Optional[LatencyTable]:
        """The table when the budget is latency (networks are priced by it and timed), else None."""
        return self.table if self.is_latency else None

    def resource(self, spec: ArchSpec) -> float:
        if self.budget.resource == MACS:
            return float(spec_macs(spec))
        if self.budget.resource == PARAMS:
            return float(spec_params(spec))
        assert self.table is not None
        return self.table.predict(spec).calibrated_ms

    def latency_ms(self, value: float) -> Optional[float]:
        """`value` for a latency column of iterations.csv and the trials: itself with a latency budget, else None."""
        return value if self.is_latency else None

    def prefetch(self, specs: Iterable[ArchSpec]) -> None:
        """Measure the missing table entries of many candidates at once (interleaved, in chunks)."""
        table = self.timing_table
        if table is not None:
            table.ensure(key for spec in specs for _, key in spec_keys(spec))

    def describe(self, value: float) -> str:
        return f"{value:.3f} ms" if self.is_latency else f"{value:,.0f} {self.budget.resource}"


@dataclass(frozen=True)
class BudgetCheck:
    """The seed's figure and the budget's target in the same unit."""

    seed_value: float
    target: float

    @property
    def nothing_to_do(self) -> bool:
        return self.seed_value <= self.target


def smallest(spec: ArchSpec, step: int) -> ArchSpec:
    """Every group at its smallest allowed width: the floor of this search."""
    for seed_group in proposal_groups(spec, step):
        group = find_group(spec, seed_group.name, step)  # earlier shrinks change what is allowed
        options = group.keep_options()
        if options:
            spec = child_spec(spec, group, options[-1], step)
    return spec


def check_budget(pricing: Pricing, seed_spec: ArchSpec, step: int) -> BudgetCheck:
    """The seed's figure and the target; an unreachable budget is refused before any training (the floor is
    every group at its smallest width).

    With a latency budget a floor the table prices over the budget is timed beside the seed before the run is
    refused: the table prices the tiniest networks least well (an INT8 entry carries its own quantize and
    dequantize at its boundaries, which the whole network does not pay: Small's INT8 floor was priced at 52 % of
    the seed and measured at 41 %), and the budget is judged on measurements everywhere else too."""
    seed_value = pricing.resource(seed_spec)
    check = BudgetCheck(seed_value, pricing.budget.target(seed_value))
    if check.nothing_to_do:
        return check
    low = smallest(seed_spec, step)
    floor = pricing.resource(low)
    if floor > check.target and not _floor_measured_within(pricing, seed_spec, low):
        raise BudgetUnreachable(f"budget {pricing.budget.text} cannot be reached: the smallest network this search "
                                f"can make (every group at its minimum) is {pricing.describe(floor)}; the seed is "
                                f"{pricing.describe(seed_value)}")
    return check


def _floor_measured_within(pricing: Pricing, seed_spec: ArchSpec, floor: ArchSpec) -> bool:
    """Whether the floor network, timed beside the seed now, meets a latency budget (False for counts). A
    measurement the host disturbed counts too: this only decides whether to start, and every network the run
    keeps is confirmed by its own measurement beside the seed."""
    table = pricing.timing_table
    if table is None:
        return False
    budget = pricing.budget
    verdict = relative_to_reference(table, seed_spec, floor, budget_ratio=budget.value if budget.relative else None,
                                    budget_ms=None if budget.relative else budget.value)
    return verdict.ok
