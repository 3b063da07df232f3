"""Timing protocols: how runners are timed so that numbers survive a shared, noisy host.

A runner is a zero-argument callable (a backend makes one from a module and an input shape). Three protocols:

- `measure`: one runner, warm-up then an adaptive number of repeats (stops once the median's 95 % confidence
  interval is narrow enough, or at a time limit). Good for a quick look at one network.
- `measure_interleaved`: several runners in shuffled round-robin passes of a few runs each. A shared host has
  bursts (~0.3 s) where everything runs up to 2x slower; a hot loop of one runner can sit inside a burst, while
  interleaving spreads every burst over all runners. This is the protocol for fair comparisons and for the
  lookup table, whose entries store the 25th percentile (REFERENCE §4).
- `measure_together`: the same, checked for interference. The absolute level of a shared host drifts by tens
  of percent within a minute while the ratio of two networks timed together holds (REFERENCE §4), so
  decisions use ratios to a reference timed in the same measurement; when those ratios moved between the
  first and second half of the passes, the measurement is repeated once and otherwise marked unreliable.

Every `Measurement` can carry a `MeasurementContext`: backend, versions, threads, batch, input shape, a
device fingerprint and the precision, so a number is never separated from what it was measured on.

A runner that times itself (`SelfTimed`: a command that runs the model on another device and prints each run's
milliseconds) is asked for a number of runs instead of being timed here; the protocols treat its figures like
their own clock's.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import UserError

Runner = Callable[[], object]


@runtime_checkable
class SelfTimed(Protocol):
    """A runner that times its own runs (on another device): `timed(n)` runs the model n times after its own
    warm-up and returns each run's milliseconds."""

    def timed(self, runs: int) -> list[float]: ...


def _timed_runs(run: Runner, runs: int, clock: Callable[[], int]) -> list[float]:
    """`runs` timings (ms) of `run`: by `clock` here, or as a `SelfTimed` runner reports them."""
    if isinstance(run, SelfTimed):
        return run.timed(runs)
    out = []
    for _ in range(runs):
        t0 = clock()
        run()
        out.append((clock() - t0) / 1e6)
    return out


@dataclass(frozen=True)
class MeasurementContext:
    """Everything a latency number depends on besides the network itself."""

    backend: str
    versions: dict
    threads: int
    batch: int
    input_shape: tuple[int, ...]
    device: dict
    precision: str = "fp32"


@dataclass(frozen=True)
class Measurement:
    """Robust statistics of repeated timings, in milliseconds.

    `ci_low_ms`/`ci_high_ms` bound the median with 95 % confidence (distribution-free, from order statistics).
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    p25_ms: float = math.nan
    min_ms: float = math.nan
    ci_low_ms: float = math.nan
    ci_high_ms: float = math.nan
    context: Optional[MeasurementContext] = None

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def ci_relative(self) -> float:
        """Width of the median's confidence interval as a share of the median."""
        return (self.ci_high_ms - self.ci_low_ms) / self.median_ms if self.median_ms else math.inf


def summarize(samples_ms: Sequence[float], context: Optional[MeasurementContext] = None) -> Measurement:
    """Median, p10/p25/p90, minimum and a 95 % confidence interval of the median."""
    if not samples_ms:
        raise ValueError("no samples to summarize")
    values = np.sort(np.asarray(samples_ms, dtype=float))
    n = len(values)
    p10, p25, median, p90 = np.percentile(values, [10, 25, 50, 90])
    half = 1.96 * math.sqrt(n) / 2  # 1-based ranks of the median's 95 % CI (n = 100: 40th and 61st)
    low = values[min(n - 1, max(0, math.floor(n / 2 - half) - 1))]
    high = values[min(n - 1, max(0, math.ceil(1 + n / 2 + half) - 1))]
    return Measurement(float(median), float(p10), float(p90), n, float(p25), float(values[0]), float(low),
                       float(high), context)


@dataclass(frozen=True)
class TimingPolicy:
    """One runner timed alone: warm up, then repeat until the median's 95 % CI is within `target_ci` of it
    (after `min_repeats`), or `max_seconds` / `max_repeats` is reached."""

    warmup_seconds: float = 0.05
    min_repeats: int = 15
    max_repeats: int = 500
    max_seconds: float = 0.3
    target_ci: float = 0.0  # 0: no early stop, use the time limit


def measure(run: Runner, policy: TimingPolicy = TimingPolicy(),
            context: Optional[MeasurementContext] = None) -> Measurement:
    """Warm up, then repeat adaptively; a stable median needs both enough samples and enough time. A
    `SelfTimed` runner is asked for `min_repeats` runs, at least 20, at once."""
    if isinstance(run, SelfTimed):
        return summarize(run.timed(max(20, policy.min_repeats)), context)
    start = time.perf_counter()
    run()
    while time.perf_counter() - start < policy.warmup_seconds:
        run()
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1000.0)
        n = len(samples)
        if n < policy.min_repeats:
            continue
        if n >= policy.max_repeats or time.perf_counter() - start >= policy.max_seconds:
            break
        if policy.target_ci > 0 and n % 10 == 0 and summarize(samples).ci_relative <= policy.target_ci:
            break
    return summarize(samples, context)


CLOCKS = {"wall": time.perf_counter_ns, "thread": time.thread_time_ns}


@dataclass(frozen=True)
class InterleavedPolicy:
    """Shuffled round-robin passes: in each pass every runner runs `runs_per_pass` times, in a new random order.

    `max_seconds` (if > 0) stops after the pass that crosses it, but never before `min_passes`.
    `clock`: `wall` times each run with a stopwatch; `thread` with the calling thread's CPU time, which is
    the latency on a dedicated core for a backend that infers on the calling thread (one thread) and does not
    count the time a shared machine's scheduler keeps the thread waiting (see `thread_clock_ok`).
    """

    passes: int = 30
    runs_per_pass: int = 5
    warmup_runs: int = 3
    min_passes: int = 10
    max_seconds: float = 0.0
    seed: int = 0
    clock: str = "wall"

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise UserError(f"unknown clock {self.clock!r}; use one of {', '.join(CLOCKS)}")


def _interleaved_samples(runners: Sequence[Runner], policy: InterleavedPolicy,
                         on_pass: Optional[Callable[[int, int], None]] = None) -> tuple[list[list[float]], int]:
    """Raw samples (ms) of each runner in pass order, and how many passes were done."""
    rng = random.Random(policy.seed)
    clock = CLOCKS[policy.clock]
    for run in runners:
        for _ in range(policy.warmup_runs if not isinstance(run, SelfTimed) else 0):  # it warms up itself
            run()
    samples: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    start = time.perf_counter()
    done = 0
    for done in range(1, policy.passes + 1):
        rng.shuffle(order)
        for i in order:
            samples[i] += _timed_runs(runners[i], policy.runs_per_pass, clock)
        if on_pass:
            on_pass(done, policy.passes)
        if policy.max_seconds > 0 and done >= policy.min_passes and time.perf_counter() - start >= policy.max_seconds:
            break
    return samples, done


def measure_interleaved(runners: Sequence[Runner], policy: InterleavedPolicy = InterleavedPolicy(),
                        contexts: Optional[Sequence[Optional[MeasurementContext]]] = None,
                        on_pass: Optional[Callable[[int, int], None]] = None) -> list[Measurement]:
    """Time several runners fairly: a noisy burst hits them all alike instead of one of them."""
    samples, _ = _interleaved_samples(runners, policy, on_pass)
    contexts = contexts or [None] * len(runners)
    return [summarize(s, c) for s, c in zip(samples, contexts)]


def ratio_shift(samples: Sequence[Sequence[float]], passes: int, runs_per_pass: int, reference: int = 0) -> float:
    """How far the ratios to the reference moved within one interleaved measurement.

    The passes are split into a first and a second half; for each runner, ratio = its p25 / the reference's
    p25 in each half, and the shift is |first / second - 1|. The largest shift over the runners is returned
    (nan with fewer than 2 passes or a single runner: nothing to compare). A load that slows everything alike
    leaves ratios alone (that is why decisions use them); a shift means something hit some runners and not
    others, e.g. a burst that lasted only part of the measurement or a probe that changed speed.
    """
    if passes < 2 or len(samples) < 2:
        return math.nan
    cut = (passes // 2) * runs_per_pass

    def p25(values: Sequence[float]) -> float:
        return float(np.percentile(np.asarray(values, dtype=float), 25))

    ref_first, ref_second = p25(samples[reference][:cut]), p25(samples[reference][cut:])
    shifts = []
    for i, bucket in enumerate(samples):
        if i == reference:
            continue
        first = p25(bucket[:cut]) / ref_first
        second = p25(bucket[cut:]) / ref_second
        shifts.append(abs(first / second - 1.0))
    return max(shifts)


@dataclass(frozen=True)
class Together:
    """Runners timed in one interleaved measurement, with a verdict on whether it was disturbed.

    `ratio_shift` is `ratio_shift(...)` of the measurement kept; `reliable` is False when it stayed above
    the tolerance even after the re-measurements (`attempts` counts them all). Decide only on reliable ones.
    """

    measurements: list[Measurement]
    reference: int
    ratio_shift: float
    tolerance: float
    attempts: int
    spread: float = 0.0  # largest p25 / min - 1 over the runners
    max_spread: float = math.inf

    @property
    def reliable(self) -> bool:
        # nan shift (too few passes to tell) counts as not disturbed
        return not self.ratio_shift > self.tolerance and not self.spread > self.max_spread

    def ratio(self, i: int) -> float:
        """Runner i's p25 over the reference's p25, both from this one measurement."""
        return self.measurements[i].p25_ms / self.measurements[self.reference].p25_ms


def measure_together(runners: Sequence[Runner], policy: InterleavedPolicy = InterleavedPolicy(),
                     reference: int = 0, tolerance: float = 0.05, retries: int = 1, max_spread: float = 0.5,
                     contexts: Optional[Sequence[Optional[MeasurementContext]]] = None,
                     on_pass: Optional[Callable[[int, int], None]] = None) -> Together:
    """`measure_interleaved`, checked for interference, two ways:

    - the ratios to `reference` moved by more than `tolerance` between the first and second half of the
      passes (a burst that hit part of the measurement);
    - some runner's p25 is more than `max_spread` above its minimum (a steady competitor: most runs were
      preempted, so the p25 measures waiting, not the network: under a load of 11 on 2 cores the p25 reaches
      3x the minimum, and ratios are compressed or stretched by 20-40 % while both halves agree).

    Either one: measure again (up to `retries` times) and keep the last; if it is still disturbed, the result
    says so (`reliable` False) instead of hiding it.
    """
    contexts = contexts or [None] * len(runners)
    attempts = 0
    while True:
        attempts += 1
        samples, passes = _interleaved_samples(runners, replace(policy, seed=policy.seed + attempts - 1), on_pass)
        shift = ratio_shift(samples, passes, policy.runs_per_pass, reference)
        measurements = [summarize(s, c) for s, c in zip(samples, contexts)]
        spread = max(m.p25_ms / m.min_ms - 1.0 if m.min_ms > 0 else 0.0 for m in measurements)
        together = Together(measurements, reference, shift, tolerance, attempts, spread, max_spread)
        if together.reliable or attempts > retries:
            return together


@dataclass(frozen=True)
class Comparison:
    """Two networks timed interleaved; `ratio` = a / b of their 25th percentiles."""

    a: Measurement
    b: Measurement

    @property
    def ratio(self) -> float:
        return self.a.p25_ms / self.b.p25_ms


def compare(a: Runner, b: Runner, policy: InterleavedPolicy = InterleavedPolicy()) -> Comparison:
    """Paired measurement of two runners (alternating runs), the only fair way to say which is faster on a
    shared host."""
    ma, mb = measure_interleaved([a, b], policy)
    return Comparison(ma, mb)
