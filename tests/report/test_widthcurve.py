"""The width curve a shape search is judged against: monotone, per-seed offsets, paired intervals."""

import math

import numpy as np
import pytest

from mnv3_search.report.widthcurve import fit_width_curve, paired_interval, ratio_interval


def test_a_noisy_curve_becomes_monotone_and_keeps_each_seeds_level():
    # two seeds on one curve, seed 1 a point above seed 0 everywhere, seed 0's 0.45 width dipping below 0.35's
    true = {0.2: 85.0, 0.3: 86.0, 0.4: 86.5, 0.6: 87.0, 1.0: 87.5}
    points = [(0, lat, acc) for lat, acc in true.items()] + [(1, lat, acc + 1.0) for lat, acc in true.items()]
    points[2] = (0, 0.4, 85.5)  # a dip under the point to its left
    curve = fit_width_curve(points)
    assert np.all(np.diff(curve.accuracy) >= 0)
    assert curve.offsets[1] - curve.offsets[0] == pytest.approx(1.0 + 1.0 / 5, abs=0.05)
    assert sum(curve.offsets.values()) == pytest.approx(0.0)
    # inside the widths' range: linear between fitted points; outside: undefined
    assert curve.accuracy_at(0.5, 1) - curve.accuracy_at(0.5, 0) == pytest.approx(curve.offsets[1] - curve.offsets[0])
    assert math.isnan(curve.accuracy_at(0.1, 0))
    assert math.isnan(curve.accuracy_at(1.1, 0))


def test_latency_at_equal_accuracy_inverts_the_curve():
    points = [(0, 0.2, 80.0), (0, 0.5, 83.0), (0, 1.0, 86.0)]
    curve = fit_width_curve(points)
    assert curve.latency_at(84.5, 0) == pytest.approx(0.75)
    assert curve.latency_at(80.0, 0) == pytest.approx(0.2)
    assert math.isnan(curve.latency_at(79.0, 0))  # below the narrowest width
    assert math.isnan(curve.latency_at(86.5, 0))  # above the widest
    assert curve.accuracy_at(curve.latency_at(81.7, 0), 0) == pytest.approx(81.7)


def test_a_flat_stretch_answers_its_smallest_latency():
    curve = fit_width_curve([(0, 0.2, 80.0), (0, 0.4, 82.0), (0, 0.6, 82.0), (0, 1.0, 84.0)])
    assert curve.latency_at(82.0, 0) == pytest.approx(0.4)


def test_paired_interval_is_the_t_interval():
    diffs = [1.0, 2.0, 3.0, 4.0, 5.0]
    interval = paired_interval(diffs)
    half = 2.7764451051977987 * np.std(diffs, ddof=1) / math.sqrt(5)  # t(0.975, 4)
    assert (interval.mean, interval.low, interval.high, interval.n) == pytest.approx((3.0, 3.0 - half, 3.0 + half, 5))
    assert paired_interval([float("nan"), 1.0]).n == 1
    assert paired_interval([]).text() == "n/a"


def test_ratio_interval_is_geometric():
    interval = ratio_interval([2.0, 0.5])
    assert interval.mean == pytest.approx(1.0)
    assert interval.low < 1.0 < interval.high
    assert ratio_interval([1.5, 1.5, 1.5]).text(".2f") == "1.50 [1.50, 1.50]"
