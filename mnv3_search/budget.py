"""Resource budgets and NetAdapt's reduction schedule.

A budget is what the user types: absolute latency (`15ms`, `800us`), relative to the seed (`60%`), or a
count (`150M-macs`, `3M-params`). Each resolves to a target in one resource (latency ms, MACs or params)
once the seed's figures are known.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UserError

LATENCY = "latency_ms"
MACS = "macs"
PARAMS = "params"

_LATENCY = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|us|µs|s)\s*$", re.IGNORECASE)
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")
_COUNT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgG]?)\s*-?\s*(macs|params)\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}
_TO_MS = {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}


@dataclass(frozen=True)
class Budget:
    """`resource` is latency_ms, macs or params; `value` is absolute in that resource, or a fraction of the
    seed's when `relative` is set (relative budgets are latency budgets)."""

    text: str
    resource: str
    value: float
    relative: bool = False

    def target(self, seed_value: float) -> float:
        """The absolute budget in the resource's unit, given the seed network's figure."""
        return self.value * seed_value if self.relative else self.value

    def describe(self, seed_value: float) -> str:
        target = self.target(seed_value)
        if self.resource == LATENCY:
            return f"{target:.3f} ms" + (f" ({100 * self.value:g}% of the seed)" if self.relative else "")
        return f"{target:,.0f} {self.resource}"


def parse_budget(text: str) -> Budget:
    """Parse `15ms`, `800us`, `60%`, `150M-macs`, `3M-params`; one clear line for anything else."""
    match = _LATENCY.match(text)
    if match:
        value = float(match.group(1)) * _TO_MS[match.group(2).lower()]
        return _positive(Budget(text, LATENCY, value))
    match = _RELATIVE.match(text)
    if match:
        fraction = float(match.group(1)) / 100
        if not 0 < fraction < 1:
            raise UserError(f"budget {text!r}: a relative budget must be between 0% and 100% of the seed, e.g. 60%")
        return Budget(text, LATENCY, fraction, relative=True)
    match = _COUNT.match(text)
    if match:
        value = float(match.group(1)) * _SCALE[match.group(2).lower()]
        return _positive(Budget(text, match.group(3).lower(), value))
    raise UserError(f"budget {text!r} is not understood; use a latency (15ms, 800us), a share of the seed's "
                    f"latency (60%), or a count (150M-macs, 3M-params)")


def _positive(budget: Budget) -> Budget:
    if budget.value <= 0:
        raise UserError(f"budget {budget.text!r} must be greater than zero")
    return budget


@dataclass(frozen=True)
class Schedule:
    """How much each iteration must cut, as a share of the seed's resource.

    NetAdapt's official code: first step 2.5 % of the initial resource, decayed by 0.96 per iteration.
    MobileNetV3 (section 4.2): a fixed delta of 1 % of the seed's latency (`decay` 1.0).
    """

    first_step: float = 0.025
    decay: float = 0.96

    def reduction(self, iteration: int, seed_value: float) -> float:
        """The cut iteration `iteration` (0-based) must make, in the resource's unit."""
        return self.first_step * self.decay ** iteration * seed_value


SCHEDULES = {"netadapt": Schedule(0.025, 0.96), "mobilenetv3": Schedule(0.01, 1.0)}


def parse_schedule(text: str) -> Schedule:
    """`netadapt`, `mobilenetv3`, or `FIRST,DECAY` (e.g. `0.05,0.9`)."""
    if text in SCHEDULES:
        return SCHEDULES[text]
    try:
        first, decay = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"schedule {text!r} is not understood; use netadapt, mobilenetv3 or FIRST,DECAY "
                        f"such as 0.025,0.96") from None
    if not (0 < first < 1 and 0 < decay <= 1):
        raise UserError(f"schedule {text!r}: FIRST must be in (0, 1) and DECAY in (0, 1]")
    return Schedule(first, decay)
