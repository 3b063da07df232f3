"""Backends: what turns a module and an input shape into a zero-argument runner for the timing protocols.

Every backend also says what its numbers depend on (package versions, thread count, precision, a device
fingerprint), which the table's header and each `MeasurementContext` record so that numbers from different
conditions are never mixed.

One module per backend: `ort` (ONNX Runtime), `eager` (torch on CPU and CUDA), `xnnpack` (ExecuTorch with
the XNNPACK delegate), `openvino_cpu` (OpenVINO), and `command` (a device reached by a command, wrapping one of
them for the file it writes); `onnxfile` holds the ONNX export and ONNX Runtime's INT8 quantization they share,
`programs` the content-hash cache of converted models.

Adding one: subclass `BackendBase`, give it a unique `name`, list its `precisions`, implement `runner` (and
`versions` / `fingerprint` where they differ), set `infers_on_caller` when a one-thread runner does all its work
on the calling thread, override `unavailable` when it needs hardware or a package that may be missing, decorate
the class with `@register_backend` and import its module at the end of this file. `make_backend(name, threads,
precision)` then builds it, and the CLI's `--backend` choices (`cli/options.py`'s BACKEND_NAMES, kept equal by
a test) name it. A backend that can write its model as a file a device runs (`file_suffix`, `model_file`) can
also be used through `--runner` (`command`).
"""

from __future__ import annotations

import os
import platform
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator, Optional, Protocol, TypeVar

import torch
from torch import nn

from ...errors import UserError
from ..protocol import Measurement, MeasurementContext, Runner, TimingPolicy, measure

# what a network computes in: float32 throughout, or post-training static INT8 (weights per channel, activations
# per tensor, calibrated on a few inputs) wherever the runtime has INT8 kernels
PRECISIONS = ("fp32", "int8")


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
    precision: str
    # a one-thread runner infers on the calling thread: that thread's CPU time is the latency (`thread_clock_ok`)
    infers_on_caller: bool

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Runner: ...

    def versions(self) -> dict[str, str]: ...

    def fingerprint(self) -> dict[str, object]: ...


class BackendBase:
    """What the backends share: threads, precision, torch's version, this machine's fingerprint, `time`."""

    name = "base"
    infers_on_caller = False
    precisions: tuple[str, ...] = ("fp32",)
    # the file a device runs (`model_file`): None when this backend cannot be used through a command runner
    file_suffix: Optional[str] = None
    # whether its timings depend on torch's version (False where torch only exports an ONNX file)
    torch_matters = True

    def __init__(self, threads: int = 1, precision: str = "fp32") -> None:
        self.threads = threads
        self.precision = precision

    @classmethod
    def unavailable(cls, precision: str = "fp32") -> Optional[str]:
        """Why this backend cannot run here at `precision`, as the user's one-line error; None when it can."""
        return None

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    def fingerprint(self) -> dict[str, object]:
        return dict(device_fingerprint())

    def context(self, input_shape: tuple[int, ...]) -> MeasurementContext:
        return MeasurementContext(self.name, self.versions(), self.threads, int(input_shape[0]), tuple(input_shape),
                                  self.fingerprint(), self.precision)

    def time(self, module: nn.Module, input_shape: tuple[int, ...],
             policy: TimingPolicy = TimingPolicy()) -> Measurement:
        """Measure one module with the adaptive protocol; the result carries its context."""
        return measure(self.runner(module, input_shape), policy, self.context(input_shape))

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Runner:  # pragma: no cover
        raise NotImplementedError

    def model_file(self, module: nn.Module, input_shape: tuple[int, ...]) -> bytes:  # pragma: no cover
        """The model as the file this runtime loads (`file_suffix`), at this backend's precision."""
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


def thread_clock_ok(backend: Backend) -> bool:
    """Whether the calling thread's CPU time is this backend's latency: true for a backend that infers on the
    caller with one thread; a GPU's work or a pool's workers are not on the calling thread's clock."""
    return bool(getattr(backend, "infers_on_caller", False)) and backend.threads == 1


def available_backends() -> list[str]:
    """Backends usable here (torch-cuda only when a GPU is present, executorch and openvino when installed)."""
    return [name for name, cls in BACKENDS.items() if cls.unavailable() is None]


def backend_class(name: str) -> type[BackendBase]:
    if name not in BACKENDS:
        raise UserError(f"unknown latency backend {name!r}; use one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def make_backend(name: str, threads: int = 1, precision: str = "fp32", *, runner: Optional[str] = None,
                 runner_device: Optional[str] = None) -> Backend:
    """The backend `name` at `precision`; with `runner` (a command), that backend's model files timed by the
    command on the device it reaches (`command.CommandBackend`)."""
    cls = backend_class(name)
    if threads < 1:
        raise UserError(f"threads must be at least 1, got {threads}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision not in cls.precisions:
        raise UserError(f"backend {name} times {' and '.join(p.upper() for p in cls.precisions)} only, not "
                        f"{precision.upper()}; use --backend onnxruntime, executorch or openvino for INT8")
    problem = cls.unavailable(precision)
    if problem:
        raise UserError(problem)
    inner = cls(threads, precision)
    if runner is None:
        if runner_device is not None:
            raise UserError("--runner-device names the device a --runner command reaches; give --runner too")
        return inner
    from .command import CommandBackend

    return CommandBackend(inner, runner, runner_device)


# the backends register themselves on import, in the order the CLI lists them
from . import ort as _ort  # noqa: E402,F401
from . import eager as _eager  # noqa: E402,F401
from . import xnnpack as _xnnpack  # noqa: E402,F401
from . import openvino_cpu as _openvino  # noqa: E402,F401
from .eager import TorchCudaBackend, TorchEagerBackend  # noqa: E402
from .onnxfile import export_onnx, onnx_bytes, quantize_onnx  # noqa: E402
from .ort import OnnxRuntimeBackend  # noqa: E402

__all__ = ["BACKENDS", "PRECISIONS", "Backend", "BackendBase", "OnnxRuntimeBackend", "TorchCudaBackend",
           "TorchEagerBackend", "available_backends", "backend_class", "device_fingerprint", "export_onnx",
           "make_backend", "onnx_bytes", "quantize_onnx", "register_backend", "thread_clock_ok", "torch_threads"]
