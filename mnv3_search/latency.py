"""Measuring latency on this machine: ONNX Runtime on CPU (default) or torch eager.

A backend turns a module and an input shape into a zero-argument runner; `measure` times any runner
with warm-up and an adaptive number of repeats and reports robust statistics (median, p10, p90).
"""

from __future__ import annotations

import io
import statistics
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn

from .errors import UserError

Runner = Callable[[], object]


@dataclass(frozen=True)
class Measurement:
    """Robust statistics of repeated timings, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class TimingPolicy:
    """How long to warm up and how many repeats to take; repeats stop at `max_seconds` or `max_repeats`."""

    warmup_seconds: float = 0.05
    min_repeats: int = 15
    max_repeats: int = 500
    max_seconds: float = 0.3


def measure(run: Runner, policy: TimingPolicy = TimingPolicy()) -> Measurement:
    """Warm up, then repeat until enough samples or time; a stable median needs both."""
    start = time.perf_counter()
    run()
    while time.perf_counter() - start < policy.warmup_seconds:
        run()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < policy.min_repeats or (
        len(samples) < policy.max_repeats and time.perf_counter() - start < policy.max_seconds
    ):
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1000.0)
    p10, p90 = np.percentile(samples, [10, 90])
    return Measurement(statistics.median(samples), float(p10), float(p90), len(samples))


class Backend(Protocol):
    name: str
    threads: int

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Runner: ...


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TorchEagerBackend:
    """torch eager on CPU in inference mode, with the thread count pinned while the runner is called."""

    name = "torch"

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Runner:
        module = module.eval()
        x = torch.randn(input_shape)

        def run() -> object:
            with torch_threads(self.threads), torch.inference_mode():
                return module(x)

        return run


def export_onnx(module: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """Export with the TorchScript-based exporter: under a second for Large, where dynamo takes ~11 s."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(input_shape),), buffer, dynamo=False,
                          input_names=["input"], output_names=["output"], opset_version=17)
    return buffer.getvalue()


class OnnxRuntimeBackend:
    """ONNX Runtime CPU execution provider; session options set explicitly, sequential execution."""

    name = "onnxruntime"

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads

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


BACKENDS: dict[str, type] = {"onnxruntime": OnnxRuntimeBackend, "torch": TorchEagerBackend}


def make_backend(name: str, threads: int = 1) -> Backend:
    if name not in BACKENDS:
        raise UserError(f"unknown latency backend {name!r}; use one of {', '.join(BACKENDS)}")
    if threads < 1:
        raise UserError(f"threads must be at least 1, got {threads}")
    return BACKENDS[name](threads)
