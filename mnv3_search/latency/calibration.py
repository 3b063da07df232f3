"""Calibration: from the sum of a network's table entries to the whole network's latency.

The sum of entries is not the whole network's latency: a block timed alone keeps its weights in cache (the
whole network streams all of them from memory every run), and each entry pays a call's fixed cost that the
whole network pays once. So a prediction carries a calibrated figure, `a * sum + b * params + c`, fitted on
whole networks measured with the table's protocol (p25): the seed and companions of its depth timed
interleaved. Four models compete (`MODEL_TERMS`): plain (the seed's factor, b = c = 0), two-term (a, b),
overhead (a, c) and three-term; each is fitted with one network held out at a time, and the one that predicts
held-out networks relative to the seed best is kept (`Calibration.model`). With the seed alone, b = c = 0 and
a = measured / sum (the plain factor of REFERENCE §4). On Small at 224 px the per-call surplus made the raw sum
put width 0.1 at 31 % of the seed (measured 22 %) and a 35 % NetAdapt network at 37 % (measured 27 %), so the
loop overshot its budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

Point = tuple[float, int, float]  # (raw block sum ms, params, measured whole ms)
Coefficients = tuple[float, float, float]  # (a, b ms per M params, c ms)

# the terms each fitted model has beside `a * raw`: "params" (b) and "call" (c)
MODEL_TERMS: dict[str, tuple[str, ...]] = {"two-term": ("params",), "overhead": ("call",),
                                           "three-term": ("params", "call")}
MODELS = ("plain", *MODEL_TERMS)
MIN_SHARE_OF_SUM = 0.1


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
    kept when it is physical.
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
