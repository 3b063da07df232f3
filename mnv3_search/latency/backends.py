"""Backends: what turns a module and an input shape into a zero-argument runner for the timing protocols.

Every backend also says what its numbers depend on (package versions, thread count, a device fingerprint),
which the table's header and each `MeasurementContext` record so that numbers from different conditions are
never mixed.

Adding one: subclass `BackendBase`, give it a unique `name`, implement `runner` (and `versions` /
`fingerprint` where they differ), set `infers_on_caller` when a one-thread runner does all its work on the
calling thread, override `unavailable` when it needs hardware or a package that may be missing, and decorate
the class with `@register_backend`. `make_backend(name, threads)` then builds it, and the CLI's
`--backend` choices (`cli/options.py`'s BACKEND_NAMES, kept equal by a test) name it.
"""

from __future__ import annotations

import io
import os
import platform
import warnings
import weakref
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator, Optional, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from .protocol import Measurement, MeasurementContext, Runner, TimingPolicy, measure


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


class Backend(Protocol):
    name: str
    threads: int
    # a one-thread runner infers on the calling thread: that thread's CPU time is the latency (`thread_clock_ok`)
    infers_on_caller: bool

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Runner: ...

    def versions(self) -> dict[str, str]: ...

    def fingerprint(self) -> dict[str, object]: ...


class BackendBase:
    """What the backends share: the thread count, torch's version, this machine's fingerprint, `time`."""

    name = "base"
    infers_on_caller = False

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads

    @classmethod
    def unavailable(cls) -> Optional[str]:
        """Why this backend cannot run here, as the user's one-line error; None when it can."""
        return None

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


# name -> backend class, in the order the CLI lists them
BACKENDS: dict[str, type[BackendBase]] = {}

B = TypeVar("B", bound=type[BackendBase])


def register_backend(cls: B) -> B:
    """Make `cls` buildable by `make_backend(cls.name, ...)`."""
    if cls.name in BACKENDS:
        raise ValueError(f"a latency backend named {cls.name!r} is already registered")
    BACKENDS[cls.name] = cls
    return cls


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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


@register_backend
class OnnxRuntimeBackend(BackendBase):
    """ONNX Runtime CPU execution provider; session options set explicitly, sequential execution."""

    name = "onnxruntime"
    infers_on_caller = True  # without an intra-op pool (one thread) a session runs on the caller

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


@register_backend
class TorchEagerBackend(BackendBase):
    """torch eager on CPU in inference mode, with the thread count pinned while the runner is called."""

    name = "torch"
    infers_on_caller = True  # with one thread torch computes on the caller

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Runner:
        module = module.eval()
        x = torch.randn(input_shape)

        def run() -> object:
            with torch_threads(self.threads), torch.inference_mode():
                return module(x)

        return run


@register_backend
class TorchCudaBackend(BackendBase):
    """torch eager on the first CUDA device; each run waits for the GPU so the time is the real latency."""

    name = "torch-cuda"

    @classmethod
    def unavailable(cls) -> Optional[str]:
        if torch.cuda.is_available():
            return None
        return ("backend torch-cuda needs a CUDA GPU and none is visible to torch here; "
                "use --backend onnxruntime or torch")

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


def thread_clock_ok(backend: Backend) -> bool:
    """Whether the calling thread's CPU time is this backend's latency: true for a backend that infers on the
    caller with one thread; a GPU's work or a pool's workers are not on the calling thread's clock."""
    return bool(getattr(backend, "infers_on_caller", False)) and backend.threads == 1


def available_backends() -> list[str]:
    """Backends usable here (torch-cuda only when a GPU is present)."""
    return [name for name, cls in BACKENDS.items() if cls.unavailable() is None]


def make_backend(name: str, threads: int = 1) -> Backend:
    if name not in BACKENDS:
        raise UserError(f"unknown latency backend {name!r}; use one of {', '.join(BACKENDS)}")
    problem = BACKENDS[name].unavailable()
    if problem:
        raise UserError(problem)
    if threads < 1:
        raise UserError(f"threads must be at least 1, got {threads}")
    return BACKENDS[name](threads)

