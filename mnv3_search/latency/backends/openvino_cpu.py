"""OpenVINO on the CPU: it reads the ONNX export directly; INT8 through NNCF's post-training quantization.

Settings pinned so the numbers mean one thing: `INFERENCE_NUM_THREADS` = --threads, one stream, the latency
hint, no core pinning (the host is shared), and `INFERENCE_PRECISION_HINT f32` so that FP32 stays FP32 on CPUs
where OpenVINO would otherwise run bf16 or f16. INT8 is NNCF's `quantize` with the performance preset
(symmetric), calibrated on random inputs for latency (the ranges do not change the operators); it compiled the
only INT8 network faster than FP32 on an AVX2 CPU without VNNI (Large 0.9x; ONNX Runtime's and ExecuTorch's
INT8 ran at 1.0-1.3x of FP32). `pip install 'mnv3-search[openvino]'` installs both.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import logging
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import BackendBase, register_backend
from ..protocol import Runner
from .onnxfile import export_onnx, random_calibration
from .programs import ProgramCache, arrays_digest, bytes_digest

_QUANTIZED: ProgramCache[Any] = ProgramCache()


def config(threads: int) -> dict[str, Any]:
    return {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False}


def read_onnx(data: bytes) -> Any:  # -> openvino.Model
    import openvino as ov

    return ov.Core().read_model(io.BytesIO(data))


def nncf_int8(model: Any, calibration: Sequence[np.ndarray]) -> Any:
    """`model` (an openvino.Model) quantized by NNCF on `calibration`, its progress bars and logs kept off the
    terminal (a command's stdout may carry CSV or JSON)."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return nncf.quantize(model, nncf.Dataset(list(calibration)), subset_size=len(calibration),
                             preset=nncf.QuantizationPreset.PERFORMANCE)


def ov_model(onnx_fp32: bytes, calibration: Optional[Sequence[np.ndarray]]) -> Any:
    """The openvino.Model of an ONNX file, INT8 when `calibration` is given (cached by content: NNCF takes
    6-9 s for a whole network)."""
    if calibration is None:
        return read_onnx(onnx_fp32)
    key = bytes_digest(onnx_fp32, arrays_digest(calibration), importlib.metadata.version("nncf"))
    return _QUANTIZED.get(key, lambda: nncf_int8(read_onnx(onnx_fp32), calibration))


@register_backend
class OpenVinoBackend(BackendBase):
    """OpenVINO's CPU plugin on the ONNX export (FP32) or its NNCF INT8 quantization."""

    name = "openvino"
    infers_on_caller = True  # with one inference thread and one stream OpenVINO computes on the caller
    precisions = ("fp32", "int8")
    torch_matters = False  # torch only exports the ONNX file

    @classmethod
    def unavailable(cls, precision: str = "fp32") -> Optional[str]:
        needed = ["openvino"] + (["nncf"] if precision == "int8" else [])
        if any(importlib.util.find_spec(name) is None for name in needed):
            return (f"backend openvino{' at INT8' if precision == 'int8' else ''} needs "
                    f"{' and '.join(needed)}: pip install 'mnv3-search[openvino]'")
        return None

    def versions(self) -> dict[str, str]:
        found = {"openvino": importlib.metadata.version("openvino"), "torch": torch.__version__}
        if self.precision == "int8":
            found["nncf"] = importlib.metadata.version("nncf")
        return found

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Runner:
        import openvino as ov

        calibration = random_calibration(input_shape) if self.precision == "int8" else None
        model = ov_model(export_onnx(module, input_shape), calibration)
        request = ov.Core().compile_model(model, "CPU", config(self.threads)).create_infer_request()
        x = np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32)
        return lambda: request.infer({0: x})
