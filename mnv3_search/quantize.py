"""INT8 networks for deployment: post-training static quantization calibrated on real training images, and the
accuracy of the quantized file itself on a test split.

Latency does not depend on calibration (the quantized graph's operators do not change with the ranges found), so
the latency backends calibrate on random inputs; accuracy does, so a deployable INT8 network is calibrated on
`CALIBRATION_IMAGES` images drawn from the training split by a fixed seed (never holdout or test images).

The INT8 file is ONNX with QDQ nodes (ONNX Runtime's static quantization, `latency.quantize_onnx`: activations
u8, weights s8 per channel), exported with free batch, height and width so that one file is both the
deployable network (timed at the deployment size) and the one scored on the test images (at the size the
network was trained at).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from .data import Dataset, Split, batches
from .latency import OnnxRuntimeBackend, onnx_bytes, quantize_onnx

# benchmarks/calibration.py (six Small networks on Fashion-MNIST, 3 draws each): INT8 - FP32 test accuracy with
# MinMax ranges, median (worst) over networks and draws: 32 images -0.80 (-5.57) points, 128 -0.63 (-4.11), 512
# -0.48 (-2.48), 2048 no better; Percentile ranges +0.1 on average (within the draws). ONNX Runtime keeps
# every activation of every image while it calibrates: 512 images of Small cost 0.18 GB at 32 px, 0.48 at 224.
CALIBRATION_IMAGES = 512
CALIBRATION_SEED = 0  # the same images for every run on the same data, whatever its --seed


def calibration_images(dataset: Dataset, count: int = CALIBRATION_IMAGES,
                       seed: int = CALIBRATION_SEED) -> list[np.ndarray]:
    """`count` training images (normalised, 1 x 3 x H x W float32 each), drawn by `seed`."""
    n = len(dataset.train)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=generator)[:min(count, n)]
    x = dataset.inputs(dataset.train.images[chosen])
    return [x[i:i + 1].contiguous().numpy() for i in range(x.shape[0])]


def int8_onnx(model: nn.Module, dataset: Dataset, resolution: Optional[int] = None,
              count: int = CALIBRATION_IMAGES) -> bytes:
    """`model` as a deployable INT8 ONNX file (free batch and size), calibrated on `dataset`'s training images.
    `resolution` is only the size the export traces at (default: the dataset's)."""
    size = resolution or dataset.resolution
    fp32 = onnx_bytes(model.eval(), (1, 3, size, size), dynamic=True)
    return quantize_onnx(fp32, calibration_images(dataset, count))


def onnx_predictions(model_bytes: bytes, dataset: Dataset, split: Split, threads: int = 1,
                     batch_size: int = 256) -> np.ndarray:
    """Top-1 class of every image of `split` by an ONNX file with a free batch dimension (ONNX Runtime, CPU)."""
    session = OnnxRuntimeBackend(threads).session(model_bytes)
    out = [np.argmax(session.run(None, {"input": x.contiguous().numpy()})[0], axis=1)
           for x, _ in batches(dataset, split, batch_size)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def torch_predictions(model: nn.Module, dataset: Dataset, split: Split, batch_size: int = 500) -> np.ndarray:
    """Top-1 class of every image of `split` by the PyTorch model (FP32, eval mode)."""
    model.eval()
    out = [model(x).argmax(dim=1).numpy() for x, _ in batches(dataset, split, batch_size)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class FileAccuracy:
    """A deployable file's test accuracy beside the FP32 PyTorch network's, on the same images."""

    torch_accuracy: float  # the FP32 PyTorch network
    file_accuracy: float  # the file (INT8: the quantized network)
    agreement: float  # share of images where the file and PyTorch predict the same class
    images: int

    def as_dict(self) -> dict:
        return {"torch_accuracy": self.torch_accuracy, "file_accuracy": self.file_accuracy,
                "agreement": self.agreement, "images": self.images}


def compare_predictions(torch_top1: np.ndarray, file_top1: np.ndarray, labels: np.ndarray) -> FileAccuracy:
    n = len(labels)
    if n == 0:
        return FileAccuracy(0.0, 0.0, 1.0, 0)
    return FileAccuracy(float(np.mean(torch_top1 == labels)), float(np.mean(file_top1 == labels)),
                        float(np.mean(torch_top1 == file_top1)), n)


def int8_accuracy(model: nn.Module, dataset: Dataset, split: Optional[Split] = None,
                  threads: int = 1) -> tuple[FileAccuracy, bytes]:
    """Quantize `model` on `dataset`'s training images and score both precisions on `split` (default: test);
    returns the scores and the INT8 file's bytes."""
    split = dataset.test if split is None else split
    data = int8_onnx(model, dataset)
    labels = split.labels.numpy()
    scores = compare_predictions(torch_predictions(model, dataset, split),
                                 onnx_predictions(data, dataset, split, threads), labels)
    return scores, data
