"""ONNX files: the export every ONNX-reading backend shares, and ONNX Runtime's post-training INT8 quantization.

INT8 is static QDQ quantization (`onnxruntime.quantization.quantize_static`): weights signed INT8 per output
channel, activations *unsigned* INT8 per tensor, ranges by MinMax over calibration inputs. Why unsigned
activations: on an x86 CPU without VNNI, ONNX Runtime's fused QLinearConv takes u8 activations x s8 weights;
with its default signed activations it leaves most convolutions in float between Q/DQ pairs and the network
ran 2.7-3.6x slower than FP32 (Small and Large at 224 px, AMD EPYC with AVX2). Every operator ONNX Runtime can
quantize is; HardSigmoid (the squeeze-and-excite gate) stays FP32 between a DequantizeLinear and a
QuantizeLinear.

A block quantized alone gets a QuantizeLinear at its input and a DequantizeLinear at its output: what the whole
network pays once at its ends, each table entry pays at its boundaries. Summed, INT8 entries came within ~3 %
of the whole INT8 network on the thread CPU clock (Small and Large at 224 px, measured on an AVX2 CPU); the
table's calibration on whole networks takes the rest.

Calibration inputs: for *latency*, random normal inputs (`random_calibration`): the quantized graph's operators
and shapes, hence its speed, do not depend on the ranges found, and a table entry has no trained weights or
real activations to calibrate on anyway. For *accuracy* (export, a run's INT8 test accuracy), real training
images (`mnv3_search.quantize.calibration_images`).
"""

from __future__ import annotations

import io
import logging
import tempfile
import warnings
import weakref
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .programs import ProgramCache, arrays_digest, bytes_digest

CALIBRATION_INPUTS = 4  # random inputs per INT8 conversion for latency: the ranges do not change the speed
DYNAMIC_AXES = {"input": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}}


def onnx_bytes(module: nn.Module, input_shape: tuple[int, ...], constant_folding: bool = True,
               dynamic: bool = False) -> bytes:
    """Export with the TorchScript-based exporter (under a second for Large, where dynamo takes ~11 s);
    opset 17, input `input`, output `output`; `dynamic`: batch, height and width left free (one file for the
    deployment size and the test images' size)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # torch hints f as a path, yet its TorchScript exporter writes to a BytesIO (_export_file: BytesIO | str)
        torch.onnx.export(module.eval(), (torch.randn(input_shape),), buffer,  # type: ignore[arg-type]
                          dynamo=False, input_names=["input"], output_names=["output"], opset_version=17,
                          do_constant_folding=constant_folding, dynamic_axes=DYNAMIC_AXES if dynamic else None)
    return buffer.getvalue()


_EXPORTS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], bytes]]" = weakref.WeakKeyDictionary()


def export_onnx(module: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """`onnx_bytes`, cached per module object and shape: a network is exported once however often it is timed."""
    cache = _EXPORTS.setdefault(module, {})
    key = tuple(int(d) for d in input_shape)
    if key not in cache:
        cache[key] = onnx_bytes(module, key)
    return cache[key]


def random_calibration(input_shape: tuple[int, ...], count: int = CALIBRATION_INPUTS,
                       seed: int = 0) -> list[np.ndarray]:
    """`count` standard normal inputs of `input_shape` (float32), the same for the same seed."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(input_shape, dtype=np.float32) for _ in range(count)]


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of arrays fed to the input named `input`."""

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        self.arrays = list(arrays)
        self.i = 0

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self.i >= len(self.arrays):
            return None
        self.i += 1
        return {"input": self.arrays[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantizer logs advice and warns about deprecated ONNX helpers on every call, and its histogram
    calibrators print their progress: keep it all off the terminal."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


_QUANTIZED: ProgramCache[bytes] = ProgramCache()


CALIBRATION_METHODS = ("minmax", "percentile", "entropy")  # ONNX Runtime's ways to find activation ranges


def quantize_onnx(fp32: bytes, calibration: Sequence[np.ndarray], method: str = "minmax") -> bytes:
    """`fp32` (an ONNX model) statically quantized to INT8 QDQ for ONNX Runtime on the CPU (see the module
    docstring), activation ranges found by `method` (CALIBRATION_METHODS); cached by the content of all three,
    so a network is quantized once however often it is timed."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r}: use one of {', '.join(CALIBRATION_METHODS)}")
    key = bytes_digest(fp32, arrays_digest(calibration), *([method] if method != "minmax" else []))
    return _QUANTIZED.get(key, lambda: _quantize(fp32, calibration, method))


def _quantize(fp32: bytes, calibration: Sequence[np.ndarray], method: str) -> bytes:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="mnv3-int8-") as folder, _quiet_quantizer():
        source, prepared, target = (Path(folder) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        source.write_bytes(fp32)
        # shape inference and ONNX Runtime's graph optimisations first, as its quantization guide advises
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(target), _Reader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method={"minmax": CalibrationMethod.MinMax,
                                          "percentile": CalibrationMethod.Percentile,
                                          "entropy": CalibrationMethod.Entropy}[method])
        return target.read_bytes()
