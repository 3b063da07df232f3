"""The width-multiplier curve a shape search is judged against, and paired per-seed differences.

Single-seed accuracies are not monotone in width on a flat curve (one seed moves a network by about half a
point), so a piecewise line through them turns noise into kinks. The curve is fitted instead as one
non-decreasing function of latency shared by every seed plus a constant offset per seed
(accuracy[s, w] = f(latency_w) + offset_s): isotonic regression on the pooled points, alternated with the
offsets. A network trained on seed s is then compared with f + offset_s, the curve of its own seed, so the
seed's shared luck (data order, initialisation) cancels in the per-seed difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class WidthCurve:
    """f at the distinct latencies of the widths (non-decreasing), and each seed's offset from it."""

    latency: np.ndarray  # increasing
    accuracy: np.ndarray  # non-decreasing, same length
    offsets: Mapping[int, float]

    def accuracy_at(self, latency: float, seed: int) -> float:
        """The seed's curve at `latency`: linear between fitted points; NaN outside the widths' latencies."""
        if not self.latency[0] <= latency <= self.latency[-1]:
            return math.nan
        return float(np.interp(latency, self.latency, self.accuracy)) + self.offsets.get(seed, 0.0)

    def latency_at(self, accuracy: float, seed: int) -> float:
        """The smallest latency at which the seed's curve reaches `accuracy` (linear between fitted points);
        NaN when the curve never reaches it or starts above it (below the narrowest width)."""
        y = self.accuracy + self.offsets.get(seed, 0.0)
        if accuracy < y[0] or accuracy > y[-1]:
            return math.nan
        for i in range(1, len(y)):
            if y[i] >= accuracy:
                if y[i] == y[i - 1]:
                    return float(self.latency[i - 1])
                share = (accuracy - y[i - 1]) / (y[i] - y[i - 1])
                return float(self.latency[i - 1] + share * (self.latency[i] - self.latency[i - 1]))
        return float(self.latency[0])


def _isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing least-squares fit of y on x (pool adjacent violators), at the distinct x values."""
    from sklearn.isotonic import IsotonicRegression

    xs = np.unique(x)
    fitted = IsotonicRegression(increasing=True).fit(x, y).predict(xs)
    return xs, np.asarray(fitted, dtype=float)


def fit_width_curve(points: Sequence[tuple[int, float, float]], rounds: int = 50) -> WidthCurve:
    """Fit f + offset_s to (seed, latency, accuracy) points of the width networks (several seeds per width).

    Alternates: f = isotonic fit of accuracy - offset; offset_s = the seed's mean residual from f; offsets are
    centred (mean 0) so that f is the average seed's curve. Converges in a few rounds."""
    if len({lat for _, lat, _ in points}) < 2:
        raise ValueError("a width curve needs at least two distinct latencies")
    seeds = np.array([s for s, _, _ in points])
    x = np.array([lat for _, lat, _ in points], dtype=float)
    y = np.array([acc for _, _, acc in points], dtype=float)
    offsets = {int(s): 0.0 for s in np.unique(seeds)}
    xs, fs = _isotonic(x, y)
    for _ in range(rounds):
        shift = np.array([offsets[int(s)] for s in seeds])
        xs, fs = _isotonic(x, y - shift)
        residual = y - np.interp(x, xs, fs)
        new = {s: float(residual[seeds == s].mean()) for s in offsets}
        centre = float(np.mean(list(new.values())))
        new = {s: v - centre for s, v in new.items()}
        if max(abs(new[s] - offsets[s]) for s in offsets) < 1e-9:
            offsets = new
            break
        offsets = new
    shift = np.array([offsets[int(s)] for s in seeds])
    xs, fs = _isotonic(x, y - shift)
    return WidthCurve(xs, fs, offsets)


@dataclass(frozen=True)
class Interval:
    """Mean of paired per-seed differences with its two-sided 95 % t interval."""

    mean: float
    low: float
    high: float
    n: int

    def text(self, fmt: str = "+.2f") -> str:
        if self.n == 0:
            return "n/a"
        if self.n == 1:
            return f"{self.mean:{fmt}} (1 seed)"
        return f"{self.mean:{fmt}} [{self.low:{fmt}}, {self.high:{fmt}}]"


def paired_interval(differences: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and t interval of per-seed differences (NaN values left out)."""
    values = np.array([d for d in differences if d is not None and not math.isnan(d)], dtype=float)
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(values.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, n - 1)) * float(values.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def ratio_interval(ratios: Sequence[float], level: float = 0.95) -> Interval:
    """Geometric mean of per-seed ratios with the t interval of their logarithms, exponentiated."""
    logs = paired_interval([math.log(r) for r in ratios if r is not None and not math.isnan(r) and r > 0], level)

    def exp(v: float) -> float:
        return math.nan if math.isnan(v) else math.exp(v)

    return Interval(exp(logs.mean), exp(logs.low), exp(logs.high), logs.n)
