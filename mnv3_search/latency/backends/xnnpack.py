"""ExecuTorch with the XNNPACK delegate: the runtime PyTorch models ship in on phones, here on the host's CPU.

A module is exported (`torch.export`), lowered to XNNPACK and serialised as a .pte program; INT8 first goes
through PT2E static quantization with `XNNPACKQuantizer` (weights symmetric per output channel, activations per
tensor), calibrated on random inputs for latency (the ranges do not change the operators) or on the images
given to `lower`. Lowering is slow (a whole MobileNetV3 70-155 s on 2 shared cores, a single block 3-8 s), so
programs are cached by the module's content (`programs`): the seed timed beside every candidate is lowered once.

Two constraints of ExecuTorch's Python runtime shape the runner: XNNPACK's thread pool is process-wide and
defaults to one thread per core (`_unsafe_reset_threadpool` sets it before every runner is made), and a loaded
program reads the .pte buffer in place, so the runner holds both the buffer and the program (executing a method
whose program or buffer was freed crashes the process). The optional extra installs it:
`pip install 'mnv3-search[executorch]'` (executorch declares no torch pin; the extra pins the pair tested).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import BackendBase, register_backend
from ..protocol import Runner
from .onnxfile import random_calibration
from .programs import ProgramCache, arrays_digest, module_digest

_PROGRAMS: ProgramCache[bytes] = ProgramCache()


@contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence what native code writes to the process's stderr meanwhile (torchao reports each optional kernel
    library it cannot load, ExecuTorch each thread-pool reset): one line per event on every command's terminal.
    Python exceptions still propagate and are printed after the stream is restored; Python warnings (its
    runtime calls itself experimental on every import) are dropped too."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _version() -> str:
    return importlib.metadata.version("executorch")


def _lower(module: nn.Module, example: torch.Tensor, calibration: Optional[Sequence[np.ndarray]]) -> bytes:
    with quiet_native_stderr():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        module = module.eval()
        with torch.no_grad():
            if calibration is not None:
                from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                    XNNPACKQuantizer, get_symmetric_quantization_config)
                from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

                quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
                prepared = prepare_pt2e(torch.export.export(module, (example,)).module(), quantizer)
                for x in calibration:
                    prepared(torch.from_numpy(x))
                module = convert_pt2e(prepared)
            program = torch.export.export(module, (example,))
            return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def lower(module: nn.Module, input_shape: tuple[int, ...],
          calibration: Optional[Sequence[np.ndarray]] = None) -> bytes:
    """`module` as an ExecuTorch .pte program for XNNPACK: FP32, or INT8 calibrated on `calibration` when given.
    Cached by content (module, shape, calibration inputs, ExecuTorch's version)."""
    shape = tuple(int(d) for d in input_shape)
    tag = ("int8", arrays_digest(calibration)) if calibration is not None else ("fp32",)
    key = module_digest(module, shape, _version(), *tag)
    return _PROGRAMS.get(key, lambda: _lower(module, torch.zeros(shape), calibration))


class ProgramRunner:
    """A loaded .pte program's forward method on one input; callable on numpy arrays too (`predict`)."""

    def __init__(self, program_bytes: bytes, threads: int = 1) -> None:
        with quiet_native_stderr():
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime

            portable_lib._unsafe_reset_threadpool(threads)
        self.buffer = program_bytes  # the program reads it in place: it must live as long as the method
        self.program = Runtime.get().load_program(program_bytes)
        self.method = self.program.load_method("forward")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.execute([x])[0]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self(torch.from_numpy(np.ascontiguousarray(x))).numpy()


@register_backend
class ExecuTorchBackend(BackendBase):
    """ExecuTorch with every supported operator delegated to XNNPACK (FP32 or INT8), on the CPU."""

    name = "executorch"
    infers_on_caller = True  # XNNPACK's pool of one thread computes on the caller
    precisions = ("fp32", "int8")
    file_suffix = ".pte"

    @classmethod
    def unavailable(cls, precision: str = "fp32") -> Optional[str]:
        if importlib.util.find_spec("executorch") is None:
            return ("backend executorch needs ExecuTorch: pip install 'mnv3-search[executorch]' "
                    "(after torch==2.13.0)")
        return None

    def versions(self) -> dict[str, str]:
        return {"executorch": _version(), "torch": torch.__version__}

    def model_file(self, module: nn.Module, input_shape: tuple[int, ...]) -> bytes:
        calibration = random_calibration(input_shape) if self.precision == "int8" else None
        return lower(module, input_shape, calibration)

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Runner:
        run = ProgramRunner(self.model_file(module, input_shape), self.threads)
        x = torch.from_numpy(np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32))
        return lambda: run(x)
