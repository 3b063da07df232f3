"""The measurement engine: statistics, protocols, backends and what each measurement records."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from mnv3_search import UserError
from mnv3_search.latency import (Comparison, InterleavedPolicy, OnnxRuntimeBackend, TimingPolicy, TorchEagerBackend,
                                 compare, device_fingerprint, export_onnx, make_backend, measure, measure_interleaved,
                                 measure_together, ratio_shift, summarize)
from mnv3_search.model.build import ConvBNAct


def test_summarize_exact_statistics():
    m = summarize([float(v) for v in range(10, 0, -1)])  # 10 .. 1, unsorted on purpose
    assert m.repeats == 10
    assert m.median_ms == 5.5
    assert m.p25_ms == pytest.approx(3.25)
    assert m.p10_ms == pytest.approx(1.9)
    assert m.p90_ms == pytest.approx(9.1)
    assert m.min_ms == 1.0
    assert m.ci_low_ms <= m.median_ms <= m.ci_high_ms
    assert (m.ci_low_ms, m.ci_high_ms) == (1.0, 10.0)  # 1-based ranks floor(5 - 3.1), ceil(6 + 3.1)
    big = summarize([float(v) for v in range(1, 101)])
    assert (big.ci_low_ms, big.ci_high_ms) == (40.0, 61.0)  # the textbook ranks for n = 100


def test_summarize_refuses_no_samples():
    with pytest.raises(ValueError):
        summarize([])


def test_measure_respects_repeat_bounds():
    calls = []
    m = measure(lambda: calls.append(1), TimingPolicy(warmup_seconds=0.0, min_repeats=7, max_repeats=7,
                                                      max_seconds=10.0))
    assert m.repeats == 7
    assert len(calls) == 8  # one warm-up call + 7 timed


def test_measure_stops_early_once_confidence_interval_is_tight():
    m = measure(lambda: None, TimingPolicy(warmup_seconds=0.0, min_repeats=20, max_repeats=100_000,
                                           max_seconds=30.0, target_ci=10.0))
    assert m.repeats == 20  # a 1000 % CI target is met at the first check


def _sleeper(*ms: float):
    """A runner that sleeps the given milliseconds in turn: its timing distribution is known in advance."""
    calls = []

    def run() -> None:
        time.sleep(ms[len(calls) % len(ms)] / 1000.0)
        calls.append(1)

    return run


def test_measure_keeps_going_while_the_confidence_interval_is_wide():
    """Alternating 1 ms / 3 ms runs: the median's CI spans both levels (about 100 % of the median), so a 5 %
    target is never met and the time/repeat limit ends it (the 1000 % target above is met at once)."""
    wide = measure(_sleeper(1.0, 3.0), TimingPolicy(warmup_seconds=0.0, min_repeats=20, max_repeats=60,
                                                    max_seconds=30.0, target_ci=0.05))
    assert wide.repeats == 60 and wide.ci_relative > 0.3


def test_interleaved_runs_each_runner_in_shuffled_passes():
    log: list[int] = []
    runners = [lambda i=i: log.append(i) for i in range(4)]
    policy = InterleavedPolicy(passes=6, runs_per_pass=2, warmup_runs=1, seed=3)
    result = measure_interleaved(runners, policy)
    assert [m.repeats for m in result] == [12, 12, 12, 12]
    timed = log[4:]  # after one warm-up run each
    assert log[:4] == [0, 1, 2, 3]
    passes = [timed[i:i + 8] for i in range(0, len(timed), 8)]
    assert len(passes) == 6
    orders = []
    for p in passes:
        assert p[0::2] == p[1::2]  # runs_per_pass consecutive runs of one runner
        assert sorted(p[0::2]) == [0, 1, 2, 3]  # every runner once per pass
        orders.append(tuple(p[0::2]))
    assert len(set(orders)) > 1  # the order is reshuffled between passes


def test_comparison_ratio_is_a_over_b_of_the_25th_percentiles():
    a = summarize([1.0, 2.0, 3.0, 4.0, 100.0])  # p25 2, median 3
    b = summarize([4.0, 5.0, 20.0, 30.0, 40.0])  # p25 5, median 20
    assert Comparison(a, b).ratio == pytest.approx(0.4)  # medians would give 0.15, b / a 2.5


def test_compare_times_two_runners_in_the_same_passes():
    c = compare(_sleeper(2.0), _sleeper(4.0), InterleavedPolicy(passes=5, runs_per_pass=3, warmup_runs=1))
    assert c.a.repeats == c.b.repeats == 15
    assert 0.3 < c.ratio < 0.7  # 2 ms over 4 ms of sleep, whatever the load (sleeping needs no CPU)


def test_ratio_shift_compares_the_first_and_second_half_of_the_passes():
    reference = [1.0, 1.0, 1.0, 1.0]
    assert ratio_shift([reference, [2.0, 2.0, 4.0, 4.0]], passes=2, runs_per_pass=2) == pytest.approx(0.5)
    assert ratio_shift([[2.0, 2.0, 4.0, 4.0], [3.0, 3.0, 6.0, 6.0]], passes=2, runs_per_pass=2) == 0.0
    assert ratio_shift([reference, [1.0] * 4, [1.0, 1.0, 1.5, 1.5]], passes=2, runs_per_pass=2) == \
        pytest.approx(1 / 3)  # the largest over runners
    assert math.isnan(ratio_shift([reference, reference], passes=1, runs_per_pass=4))


def test_measure_together_remeasures_once_when_a_probe_moved():
    """A runner that turns 3x slower half-way through the first measurement: the ratio to the reference
    moved, so it is measured again; the second measurement is steady and is the one kept."""
    state = {"calls": 0}

    def jumps() -> None:
        state["calls"] += 1
        time.sleep((1.0 if state["calls"] <= 13 else 6.0) / 1000.0)  # 1 warm-up + 12 timed, then slow

    policy = InterleavedPolicy(passes=8, runs_per_pass=3, warmup_runs=1)
    together = measure_together([_sleeper(1.0), jumps], policy, tolerance=0.6, max_spread=math.inf)
    assert together.attempts == 2 and together.reliable
    assert together.ratio_shift <= 0.6
    assert together.ratio(1) > 3.0  # the second measurement's: 6 ms over 1 ms (the first one's was ~3.5)
    assert together.measurements[1].repeats == 24


def test_measure_together_marks_a_disturbed_measurement_unreliable():
    """A runner that keeps slowing down: both measurements are disturbed; the result says so. Sleeps of 5 ms
    and more, so that a loaded host's wake-up delays (a few ms beside CPU-bound processes) neither hide the
    drift nor fake one in the steady pair."""
    state = {"calls": 0}

    def drifts() -> None:
        state["calls"] += 1
        time.sleep(2.5 * (1 + state["calls"] / 4) / 1000.0)

    policy = InterleavedPolicy(passes=6, runs_per_pass=2, warmup_runs=1)
    together = measure_together([_sleeper(5.0), drifts], policy, tolerance=0.1, retries=1, max_spread=math.inf)
    assert together.attempts == 2 and not together.reliable and together.ratio_shift > 0.1
    steady = measure_together([_sleeper(10.0), _sleeper(20.0)], policy, tolerance=0.8, max_spread=math.inf)
    assert steady.attempts == 1 and steady.reliable


def test_measure_together_marks_mostly_preempted_runs_unreliable():
    """A steady competitor: three runs in four take 5x longer, in both halves alike (no ratio shift), so the
    p25 is the slow level, 5x the minimum: unreliable after one re-measurement."""
    policy = InterleavedPolicy(passes=4, runs_per_pass=4, warmup_runs=0)
    together = measure_together([_sleeper(1.0), _sleeper(1.0, 5.0, 5.0, 5.0)], policy, tolerance=math.inf)
    assert together.spread > 2.0
    assert together.attempts == 2 and not together.reliable


def test_measurement_records_its_context():
    backend = OnnxRuntimeBackend(threads=1)
    m = backend.time(ConvBNAct(3, 8, 3, 2, nl="HS"), (2, 3, 16, 16),
                     TimingPolicy(warmup_seconds=0.0, min_repeats=3, max_repeats=3))
    ctx = m.context
    assert ctx is not None
    assert (ctx.backend, ctx.threads, ctx.batch, ctx.input_shape) == ("onnxruntime", 1, 2, (2, 3, 16, 16))
    import onnxruntime

    assert ctx.versions["onnxruntime"] == onnxruntime.__version__
    assert ctx.versions["torch"] == torch.__version__
    assert ctx.device == device_fingerprint()
    with open("/proc/cpuinfo") as handle:
        models = {line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")}
    if models:
        assert ctx.device["cpu_model"] in models
    assert ctx.device["cpu_cores"] >= 1
    assert m.as_dict()["context"]["backend"] == "onnxruntime"


def test_onnx_export_is_cached_per_module_and_shape():
    module = ConvBNAct(4, 8, 1, nl="RE")
    first = export_onnx(module, (1, 4, 8, 8))
    assert export_onnx(module, (1, 4, 8, 8)) is first
    assert export_onnx(module, (1, 4, 6, 6)) is not first


def test_onnxruntime_runner_computes_the_same_as_torch():
    torch.manual_seed(0)
    module = ConvBNAct(4, 8, 3, 1, nl="HS").eval()
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    got = OnnxRuntimeBackend().runner(module, (1, 4, 8, 8))()[0]
    want = module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_torch_backend_pins_threads_only_while_running():
    before = torch.get_num_threads()
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    TorchEagerBackend(threads=1).runner(Probe(), (1, 1))()
    assert seen == [1]
    assert torch.get_num_threads() == before


def test_make_backend_errors_are_user_errors():
    with pytest.raises(UserError, match="unknown latency backend 'tflite'"):
        make_backend("tflite")
    with pytest.raises(UserError, match="threads must be at least 1"):
        make_backend("onnxruntime", 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_backend_refused_without_gpu():
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        make_backend("torch-cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_backend_measures_on_gpu():  # pragma: no cover - only with a GPU
    backend = make_backend("torch-cuda")
    m = backend.time(ConvBNAct(3, 8, 3, 2, nl="HS"), (1, 3, 32, 32), TimingPolicy(min_repeats=3, max_repeats=3))
    assert m.context.device["gpu"]
    assert math.isfinite(m.median_ms)


LAYERS_ABOVE = ("prune", "netadapt", "cli", "report", "explore")


@pytest.mark.slow
def test_latency_never_imports_a_layer_above_it() -> None:
    """latency/ sits below prune/ (and netadapt, cli, report, explore): what it needs from them is passed in.

    Checked twice: every import statement of every module, lazy ones inside functions included, and what
    importing all of them loads (so a lower module that imported one of them would be caught too)."""
    import ast
    import os
    import subprocess
    import sys
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "mnv3_search" / "latency"
    forbidden = tuple(f"mnv3_search.{name}" for name in LAYERS_ABOVE)
    found = []
    paths = sorted(package.rglob("*.py"))
    dotted = {path: ["mnv3_search", *path.relative_to(package.parent).with_suffix("").parts] for path in paths}
    for path in paths:
        here = dotted[path][:-1]  # the package a relative import starts from (an __init__ is its own)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here[:len(here) + 1 - node.level] if node.level else []  # `.x` / `..x` from here
                module = ".".join([*base, *([node.module] if node.module else [])])
                names = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            found += [f"{path.name}:{node.lineno} {name}" for name in names if name.startswith(forbidden)]
    assert found == []
    assert len(paths) >= 17  # the subpackage backends/ is walked too
    modules = [".".join(d[:-1] if d[-1] == "__init__" else d) for d in dotted.values()]
    code = (f"import importlib, sys\nfor name in {modules!r}: importlib.import_module(name)\n"
            f"print(sorted(m for m in sys.modules if m.startswith({forbidden!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(package.parents[1])})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
