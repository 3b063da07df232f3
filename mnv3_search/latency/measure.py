"""Measuring latency on this machine: backends, a noise-resistant protocol and what each number was measured on.

A backend turns a module and an input shape into a zero-argument runner. Two protocols time runners:

- `measure`: one runner, warm-up then an adaptive number of repeats (stops once the median's 95 % confidence
  interval is narrow enough, or at a time limit). Good for a quick look at one network.
- `measure_interleaved`: several runners in shuffled round-robin passes of a few runs each. The host here has
  bursts (~0.3 s) where everything runs up to 2x slower; a hot loop of one runner can sit inside a burst, while
  interleaving spreads every burst over all runners. This is the protocol for fair comparisons and for the
  lookup table, whose entries store the 25th percentile (REFERENCE §4).
- `measure_together`: the same, checked for interference. The absolute level of a shared host drifts by tens
  of percent within a minute while the ratio of two networks timed together holds (REFERENCE §4), so
  decisions use ratios to a reference timed in the same measurement; when those ratios moved between the
  first and second half of the passes, the measurement is repeated once and otherwise marked unreliable.

Every `Measurement` can carry a `MeasurementContext`: backend, versions, threads, batch, input shape and a
device fingerprint, so a number is never separated from what it was measured on.
"""

from __future__ import annotations

import io
import math
import os
import platform
import random
import time
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Callable, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError

Runner = Callable[[], object]


# --- what a number was measured on -------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "processor\t: ")) and ":" in line:
                    value = line.split(":", 1)[1].strip()
                    if value and not value.isdigit():
                        return value
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@lru_cache(maxsize=None)
def device_fingerprint(cuda: bool = False) -> dict[str, object]:
    """What makes latency numbers comparable between runs: CPU model, core count, architecture (and GPU)."""
    fingerprint: dict[str, object] = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count() or 0,
        "machine": platform.machine(),
        "system": platform.system(),
    }
    if cuda:
        fingerprint["gpu"] = torch.cuda.get_device_name(0)
    return fingerprint


@dataclass(frozen=True)
class MeasurementContext:
    """Everything a latency number depends on besides the network itself."""

    backend: str
    versions: dict
    threads: int
    batch: int
    input_shape: tuple[int, ...]
    device: dict


# --- statistics ----------------------------------------------------------------------------------------------

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


# --- protocols -----------------------------------------------------------------------------------------------

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
    """Warm up, then repeat adaptively; a stable median needs both enough samples and enough time."""
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
        for _ in range(policy.warmup_runs):
            run()
    samples: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    start = time.perf_counter()
    done = 0
    for done in range(1, policy.passes + 1):
        rng.shuffle(order)
        for i in order:
            run, bucket = runners[i], samples[i]
            for _ in range(policy.runs_per_pass):
                t0 = clock()
                run()
                bucket.append((clock() - t0) / 1e6)
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
      preempted, so the p25 measures waiting, not the network; seen here under a load of 11 on 2 cores:
      p25 = 3x the minimum, and ratios compressed or stretched by 20-40 % while both halves agreed).

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
    """Paired measurement of two runners (alternating runs), the only fair way to say which is faster here."""
    ma, mb = measure_interleaved([a, b], policy)
    return Comparison(ma, mb)


# --- backends ------------------------------------------------------------------------------------------------

class Backend(Protocol):
    name: str
    threads: int

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Runner: ...

    def versions(self) -> dict[str, str]: ...

    def fingerprint(self) -> dict[str, object]: ...


class _BackendBase:
    name = "base"

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    def fingerprint(self) -> dict[str, object]:
        return dict(device_fingerprint())

    def context(self, input_shape: tuple[int, ...]) -> MeasurementContext:
        return MeasurementContext(self.name, self.versions(), self.threads, int(input_shape[0]), tuple(input_shape),
                                  self.fingerprint())

    def time(self, module: nn.Module, input_shape: tuple[int, ...],
             policy: TimingPolicy = TimingPolicy()) -> Measurement:
        """Measure one module with the adaptive protocol; the result carries its context."""
        return measure(self.runner(module, input_shape), policy, self.context(input_shape))

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Runner:  # pragma: no cover
        raise NotImplementedError


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TorchEagerBackend(_BackendBase):
    """torch eager on CPU in inference mode, with the thread count pinned while the runner is called."""

    name = "torch"

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Runner:
        module = module.eval()
        x = torch.randn(input_shape)

        def run() -> object:
            with torch_threads(self.threads), torch.inference_mode():
                return module(x)

        return run


class TorchCudaBackend(_BackendBase):
    """torch eager on the first CUDA device; each run waits for the GPU so the time is the real latency."""

    name = "torch-cuda"

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__, "cuda": str(torch.version.cuda)}

    def fingerprint(self) -> dict[str, object]:
        return dict(device_fingerprint(cuda=True))

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Runner:
        device = torch.device("cuda")
        module = module.eval().to(device)
        x = torch.randn(input_shape, device=device)

        def run() -> object:
            with torch.inference_mode():
                out = module(x)
            torch.cuda.synchronize()
            return out

        return run


_EXPORTS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], bytes]]" = weakref.WeakKeyDictionary()


def onnx_bytes(module: nn.Module, input_shape: tuple[int, ...], constant_folding: bool = True) -> bytes:
    """Export with the TorchScript-based exporter (under a second for Large, where dynamo takes ~11 s);
    opset 17, input `input`, output `output`."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # torch hints f as a path, yet its TorchScript exporter writes to a BytesIO (_export_file: BytesIO | str)
        torch.onnx.export(module.eval(), (torch.randn(input_shape),), buffer,  # type: ignore[arg-type]
                          dynamo=False, input_names=["input"], output_names=["output"], opset_version=17,
                          do_constant_folding=constant_folding)
    return buffer.getvalue()


def export_onnx(module: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """`onnx_bytes`, cached per module object and shape: a network is exported once however often it is timed."""
    cache = _EXPORTS.setdefault(module, {})
    key = tuple(int(d) for d in input_shape)
    if key not in cache:
        cache[key] = onnx_bytes(module, key)
    return cache[key]


class OnnxRuntimeBackend(_BackendBase):
    """ONNX Runtime CPU execution provider; session options set explicitly, sequential execution."""

    name = "onnxruntime"

    def versions(self) -> dict[str, str]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__, "torch": torch.__version__}

    def session(self, model_bytes: bytes):  # -> onnxruntime.InferenceSession
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Runner:
        session = self.session(export_onnx(module, input_shape))
        feed = {"input": np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32)}
        return lambda: session.run(None, feed)


BACKENDS: dict[str, type] = {"onnxruntime": OnnxRuntimeBackend, "torch": TorchEagerBackend,
                             "torch-cuda": TorchCudaBackend}


def thread_clock_ok(backend: Backend) -> bool:
    """Whether the calling thread's CPU time is this backend's latency: true for the CPU backends with one
    thread (ONNX Runtime without an intra-op pool and torch with one thread infer on the caller); a GPU's
    work or a pool's workers are not on the calling thread's clock."""
    return backend.name in ("onnxruntime", "torch") and backend.threads == 1


def available_backends() -> list[str]:
    """Backends usable here: torch-cuda only when a GPU is present."""
    return [name for name in BACKENDS if name != "torch-cuda" or torch.cuda.is_available()]


def make_backend(name: str, threads: int = 1) -> Backend:
    if name not in BACKENDS:
        raise UserError(f"unknown latency backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name == "torch-cuda" and not torch.cuda.is_available():
        raise UserError("backend torch-cuda needs a CUDA GPU and none is visible to torch here; "
                        "use --backend onnxruntime or torch")
    if threads < 1:
        raise UserError(f"threads must be at least 1, got {threads}")
    return BACKENDS[name](threads)
