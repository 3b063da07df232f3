"""Deployable files: ONNX and TorchScript with batch norm folded into the convolutions, checked against PyTorch.

Folding: every conv -> BN pair of the network (stem, expansion, depthwise, projection, last conv) becomes
one conv with a bias (`torch.nn.utils.fusion.fuse_conv_bn_eval`, exact up to float rounding), and the BN
becomes an Identity. Both formats are exported from the folded module, so neither file holds a
BatchNormalization node. (For reference: torch's TorchScript-based ONNX exporter in eval mode folds
Conv+BN by itself too, in its ONNX peephole pass, and `do_constant_folding` precomputes constant
subgraphs; `bn_nodes_unfolded_onnx` lets a test check that. ONNX Runtime would also fuse them at session
load. Folding first makes the file itself the deployable form, whichever runtime reads it.)
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .errors import UserError
from .fileio import PathLike, atomic_path
from .latency import (InterleavedPolicy, Measurement, OnnxRuntimeBackend, make_backend, measure_interleaved, onnx_bytes,
                      torch_threads)

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
    tolerance: float  # ATOL x max(1, output_scale): float32 rounding grows with the outputs' magnitude
    latency: Optional[Measurement] = None  # the exported file, timed
    torch_latency: Optional[Measurement] = None  # the unfolded eager model, timed interleaved with it


class _OrtRunner:
    def __init__(self, path: Path, threads: int) -> None:
        backend = make_backend("onnxruntime", threads)
        assert isinstance(backend, OnnxRuntimeBackend)  # what make_backend("onnxruntime") builds
        self.session = backend.session(path.read_bytes())

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
                 policy: InterleavedPolicy = InterleavedPolicy(passes=20, min_passes=5)) -> ExportResult:
    """Fold BN, write `out` atomically in `fmt`, reload it, compare outputs with `model` (atol 1e-4) and,
    unless `measure` is False, time the file interleaved with the eager model."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    out = Path(out)
    model = model.eval()
    folded, folded_pairs = _fold_bn(model)
    with atomic_path(out) as tmp:
        if fmt == "onnx":
            data = onnx_bytes(folded, input_shape)
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
    tolerance = ATOL * max(1.0, scale)
    if error > tolerance:
        raise UserError(f"{out}: the exported model's outputs differ from PyTorch's by {error:.2e} (> {tolerance:.1e}"
                        f" for outputs up to {scale:.3g}); the file was written but should not be deployed")
    result = ExportResult(out, fmt, tuple(input_shape), folded_pairs, bn_left, error, scale, tolerance)
    if measure:
        x = rng.standard_normal(input_shape, dtype=np.float32)
        eager = make_backend("torch", threads).runner(model, input_shape)
        result.latency, result.torch_latency = measure_interleaved([lambda: exported(x), eager], policy)
    return result
