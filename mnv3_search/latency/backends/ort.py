"""ONNX Runtime's CPU execution provider, FP32 or INT8 (QDQ, `onnxfile.quantize_onnx`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import BackendBase, register_backend
from ..protocol import Runner
from .onnxfile import export_onnx, quantize_onnx, random_calibration


@register_backend
class OnnxRuntimeBackend(BackendBase):
    """ONNX Runtime CPU execution provider; session options set explicitly, sequential execution."""

    name = "onnxruntime"
    infers_on_caller = True  # without an intra-op pool (one thread) a session runs on the caller
    precisions = ("fp32", "int8")
    file_suffix = ".onnx"
    torch_matters = False  # torch only exports the file

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

    def model_file(self, module: nn.Module, input_shape: tuple[int, ...]) -> bytes:
        """The ONNX file: exported once per module and shape; INT8 quantized on random inputs (latency only)."""
        fp32 = export_onnx(module, input_shape)
        return fp32 if self.precision == "fp32" else quantize_onnx(fp32, random_calibration(input_shape))

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Runner:
        session = self.session(self.model_file(module, input_shape))
        feed = {"input": np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32)}
        return lambda: session.run(None, feed)
