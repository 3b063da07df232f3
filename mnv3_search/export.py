"""Deployable files: ONNX and TorchScript with batch norm folded into the convolutions, checked against PyTorch.

Folding: every conv -> BN pair of the network (stem, expansion, depthwise, projection, last conv) becomes
one conv with a bias (`torch.nn.utils.fusion.fuse_conv_bn_eval`, exact up to float rounding), and the BN
becomes an Identity. Both formats are exported from the folded module, so neither file holds a
BatchNormalization node. (For reference: torch's TorchScript-based ONNX exporter in eval mode folds
Conv+BN by itself too, in its ONNX peephole pass, and `do_constant_folding` precomputes constant
subgraphs; `bn_nodes_unfolded_onnx` lets a test check that. ONNX Runtime would also fuse them at session
load. Folding first makes the file itself the deployable form, whichever runtime reads it.)

INT8 (`precision="int8"`, ONNX only): the folded network is exported with free batch, height and width and
quantized by ONNX Runtime's static QDQ quantization on training images of the dataset given (`quantize`). The
file written is then scored on that dataset's test split, and so is the FP32 PyTorch network on the same
images: the accuracy reported is the file's own, and its predictions are kept on the result. With a dataset an
FP32 ONNX file is written the same way (free sizes) and scored the same way.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .errors import UserError
from .fileio import PathLike, atomic_path
from .latency import (InterleavedPolicy, Measurement, OnnxRuntimeBackend, make_backend, measure_interleaved, onnx_bytes,
                      quantize_onnx, torch_threads)

if TYPE_CHECKING:
    from .data import Dataset
    from .quantize import FileAccuracy

FORMATS = ("onnx", "torchscript")
ATOL = 1e-4  # on outputs of magnitude <= 1; scaled by the largest |output| above that (float32 rounding)


def fold_bn(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` whose conv -> BN pairs (adjacent in a Sequential) are folded into one conv;
    the number of pairs folded is kept on it as `folded_bn`."""
    folded, count = _fold_bn(model)
    # a plain int attribute: nn.Module.__setattr__'s hint admits only Tensor | Module, though it stores any value
    setattr(folded, "folded_bn", count)
    return folded


def _fold_bn(model: nn.Module) -> tuple[nn.Module, int]:
    """fold_bn's copy and the number of conv -> BN pairs folded in it."""
    folded = copy.deepcopy(model).eval()
    count = 0
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[a] = fuse_conv_bn_eval(conv, bn)
                module._modules[b] = nn.Identity()
                count += 1
    return folded, count


def count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def onnx_op_counts(model_bytes: bytes) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load_from_string(model_bytes).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def bn_nodes_unfolded_onnx(model: nn.Module, input_shape: tuple[int, ...], constant_folding: bool) -> int:
    """BatchNormalization nodes torch's own exporter leaves when given the unfolded model (documentation aid)."""
    return onnx_op_counts(onnx_bytes(model, input_shape, constant_folding)).get("BatchNormalization", 0)


def torchscript_module(model: nn.Module, input_shape: tuple[int, ...]) -> torch.jit.ScriptModule:
    """Traced (the network has no data-dependent control flow) and frozen: weights become constants."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), torch.randn(input_shape))
        return torch.jit.freeze(traced)


@dataclass
class ExportResult:
    path: Path
    format: str
    input_shape: tuple[int, ...]
    folded_bn: int  # conv+BN pairs folded
    bn_left: int  # BN layers / nodes left in the exported file
    max_abs_error: float  # exported vs the unfolded PyTorch model, on random inputs
    output_scale: float  # largest |output| of the PyTorch model on those inputs
    # ATOL x max(1, output_scale): float32 rounding grows with the outputs' magnitude (None for INT8: its
    # rounding is the quantization's, judged by accuracy instead)
    tolerance: Optional[float]
    latency: Optional[Measurement] = None  # the exported file, timed
    torch_latency: Optional[Measurement] = None  # the unfolded eager model, timed interleaved with it
    precision: str = "fp32"
    fp32_file_latency: Optional[Measurement] = None  # INT8: the FP32 ONNX file, timed interleaved with it
    accuracy: Optional["FileAccuracy"] = None  # with a dataset: the file's and PyTorch's test accuracy
    predictions: Optional[np.ndarray] = None  # with a dataset: the file's top-1 class of every test image


class _OrtRunner:
    def __init__(self, source: "Path | bytes", threads: int) -> None:
        backend = make_backend("onnxruntime", threads)
        assert isinstance(backend, OnnxRuntimeBackend)  # what make_backend("onnxruntime") builds
        self.session = backend.session(source if isinstance(source, bytes) else source.read_bytes())

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"input": x})[0]


def load_exported(path: Path, fmt: str, threads: int = 1):
    """A callable numpy -> numpy for the exported file, reloaded from disk (what a deployment would do)."""
    if fmt == "onnx":
        return _OrtRunner(path, threads)
    module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch_threads(threads), torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return run


def export_model(model: nn.Module, input_shape: tuple[int, ...], fmt: str, out: PathLike, *,
                 check_inputs: int = 2, measure: bool = True, threads: int = 1,
                 policy: InterleavedPolicy = InterleavedPolicy(passes=20, min_passes=5),
                 precision: str = "fp32", dataset: Optional["Dataset"] = None) -> ExportResult:
    """Fold BN, write `out` atomically in `fmt` at `precision`, reload it, compare outputs with `model` (FP32:
    atol 1e-4; INT8: accuracy on `dataset`'s test split, which INT8 needs for its calibration images) and,
    unless `measure` is False, time the file interleaved with the eager model (and, for INT8, the FP32 file)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if precision not in ("fp32", "int8"):
        raise UserError(f"--precision {precision!r}: use fp32 or int8")
    if precision == "int8" and fmt != "onnx":
        raise UserError("--precision int8 writes ONNX (QDQ, ONNX Runtime's static quantization): use --format onnx")
    if precision == "int8" and dataset is None:
        raise UserError("--precision int8 needs --data SOURCE: its training images calibrate the quantization "
                        "and its test split scores the INT8 file")
    if dataset is not None and fmt != "onnx":
        raise UserError("--data scores an ONNX file on the test split: use --format onnx, or leave out --data")
    out = Path(out)
    model = model.eval()
    folded, folded_pairs = _fold_bn(model)
    fp32_bytes: Optional[bytes] = None
    with atomic_path(out) as tmp:
        if fmt == "onnx":
            data = fp32_bytes = onnx_bytes(folded, input_shape, dynamic=dataset is not None)
            if precision == "int8":
                assert dataset is not None  # checked above
                from .quantize import calibration_images

                data = quantize_onnx(fp32_bytes, calibration_images(dataset))
            tmp.write_bytes(data)
            bn_left = onnx_op_counts(data).get("BatchNormalization", 0)
        else:
            scripted = torchscript_module(folded, input_shape)
            scripted.save(str(tmp))
            bn_left = count_bn(folded)
    exported = load_exported(out, fmt, threads)
    rng = np.random.default_rng(0)
    error, scale = 0.0, 0.0
    with torch.inference_mode():
        for _ in range(check_inputs):
            x = rng.standard_normal(input_shape, dtype=np.float32)
            expected = model(torch.from_numpy(x)).numpy()
            error = max(error, float(np.max(np.abs(exported(x) - expected))))
            scale = max(scale, float(np.max(np.abs(expected))))
    tolerance = ATOL * max(1.0, scale) if precision == "fp32" else None
    if tolerance is not None and error > tolerance:
        raise UserError(f"{out}: the exported model's outputs differ from PyTorch's by {error:.2e} (> {tolerance:.1e}"
                        f" for outputs up to {scale:.3g}); the file was written but should not be deployed")
    result = ExportResult(out, fmt, tuple(input_shape), folded_pairs, bn_left, error, scale, tolerance,
                          precision=precision)
    if dataset is not None:
        from .quantize import compare_predictions, onnx_predictions, torch_predictions

        result.predictions = onnx_predictions(out.read_bytes(), dataset, dataset.test, threads)
        result.accuracy = compare_predictions(torch_predictions(model, dataset, dataset.test), result.predictions,
                                              dataset.test.labels.numpy())
    if measure:
        x = rng.standard_normal(input_shape, dtype=np.float32)
        eager = make_backend("torch", threads).runner(model, input_shape)
        runners = [lambda: exported(x), eager]
        if precision == "int8" and fp32_bytes is not None:
            fp32_session = _OrtRunner(fp32_bytes, threads)
            runners.append(lambda: fp32_session(x))
        # one thread: each runtime computes on the calling thread, whose CPU clock a busy host does not inflate
        clock = "thread" if threads == 1 else "wall"
        timed = measure_interleaved(runners, replace(policy, clock=clock))
        result.latency, result.torch_latency = timed[0], timed[1]
        result.fp32_file_latency = timed[2] if len(timed) > 2 else None
    return result
