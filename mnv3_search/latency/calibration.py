"""Calibration: from the sum of a network's table entries to the whole network's latency.

The sum of entries is not the whole network's latency: a block timed alone keeps its weights in cache (the
whole network streams all of them from memory every run), and each entry pays a call's fixed cost that the
whole network pays once. So a prediction carries a calibrated figure, `a * sum + b * params + c`, fitted on
whole networks measured with the table's protocol (p25): the seed and companions of its depth timed
interleaved, spanning a quarter to all of its channels (`prune.variants.calibration_companions`). Four models
compete (`MODEL_TERMS`): plain (the seed's factor, b = c = 0), two-term (a, b), overhead (a, c) and three-term;
each is fitted on ratios to the seed (what decisions use) with one network held out at a time, and the one that
predicts held-out networks relative to the seed best is kept (`Calibration.model`). With the seed alone,
b = c = 0 and a = measured / sum (the plain factor of REFERENCE §4). On Small at 224 px the raw sum put networks
at a fifth to a quarter of the seed's latency 23-51 % too slow relative to the seed: the per-call surplus weighs
most on small networks.
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
# a fit whose block sum explains less than this share of the seed's own time has traded the blocks for its
# other terms (noise fitted, not cost): refused
MIN_SEED_SHARE = 0.5
# a calibration whose smallest network has more than this share of the seed's MACs is fitted again when a run
# opens the table (`store.open_for_run`): calibrations on mild cuts alone over-predicted small networks by 5-15 %
# (a uniform shrink to half the channels has about 30 % of the MACs)
SMALL_SHARE = 0.4


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
    # the smallest network of the fit as a share of the seed's MACs (None: the seed alone, or a table written
    # before this was recorded): a fit that never saw a small network cannot say what the per-call term costs it.
    # MACs, not measured latency: a property of the networks, the same on every run and at every resolution
    smallest_macs_share: Optional[float] = None

    @property
    def spans_small_networks(self) -> bool:
        """Whether the fit saw a network at or below `SMALL_SHARE` of the seed's MACs (low budgets reach them)."""
        return self.smallest_macs_share is not None and self.smallest_macs_share <= SMALL_SHARE

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
    """(a, b, c) of measured ~ a * raw + b * params/1e6 + c for one of `MODEL_TERMS`, fitted on ratios to the
    seed (the first point) and exact at the seed.

    Decisions use a network's latency relative to the seed timed beside it, so the fit is made where they are:
    with beta = b / a and gamma = c / a, the predicted ratio (raw_i + beta p_i + gamma) / (raw_0 + beta p_0 +
    gamma) should equal the measured m_i = measured_i / measured_0. Multiplied out that is linear,
    beta (p_i - m_i p_0) + gamma (1 - m_i) = m_i raw_0 - raw_i, solved by least squares with each row divided by
    m_i (every network's relative error counts alike, small or large); then a puts the seed on its measurement.

    Too few points for the terms (one more ratio than unknowns is needed), a singular fit, or one that is not
    physical give the seed's plain factor: a = measured / raw, b = c = 0. Not physical: b < 0 (a memory term
    cannot make bigger networks cheaper), the seed's blocks less than `MIN_SEED_SHARE` of its whole time, or a
    network of the fit predicted below a tenth of its sum.
    """
    terms = MODEL_TERMS[model]
    if len(points) < len(terms) + 2:
        return _plain(points)
    raw0, params0, measured0 = points[0]
    rows, rhs = [], []
    for raw, params, measured in points[1:]:
        m = measured / measured0
        row = [(params - m * params0) / 1e6 if t == "params" else 1.0 - m for t in terms]
        rows.append([x / m for x in row])
        rhs.append((m * raw0 - raw) / m)
    matrix = np.array(rows)
    if np.linalg.matrix_rank(matrix) < len(terms):
        return _plain(points)
    solution = dict(zip(terms, (float(x) for x in np.linalg.lstsq(matrix, np.array(rhs), rcond=None)[0])))
    beta, gamma = solution.get("params", 0.0), solution.get("call", 0.0)
    denominator = raw0 + beta * params0 / 1e6 + gamma
    if denominator <= 0:
        return _plain(points)
    a = measured0 / denominator
    b, c = a * beta, a * gamma
    if b < 0 or a * raw0 < MIN_SEED_SHARE * measured0 or \
            any(a * r + b * q / 1e6 + c < MIN_SHARE_OF_SUM * a * r for r, q, _ in points):
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
