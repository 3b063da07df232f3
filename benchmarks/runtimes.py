"""Deployment runtimes and INT8 on this CPU: conversion cost, latency ratios, INT8 accuracy. Prints figures.

    .venv/bin/python benchmarks/runtimes.py [--models small large] [--passes 30] [--accuracy-steps 200]

(a) conversion: for each model at 224 px, each installed backend (onnxruntime, executorch, openvino) and
    precision, the seconds to turn the module into what the runtime runs (ONNX export + INT8 quantization,
    ExecuTorch lowering, NNCF), timed on this process's CPU clock and on the wall clock.
(b) latency: all of them timed together, interleaved (one thread, batch 1, the calling thread's CPU clock:
    every runtime computes on the caller with one thread), p25 and the ratio to ONNX Runtime FP32 of the same
    model. Ratios of networks timed together, not absolute levels, are what to read on a shared host.
(c) accuracy: Small trained `--accuracy-steps` steps at 32 px on Fashion-MNIST (20,000 training images), then
    quantized by the tool's INT8 path (ONNX Runtime QDQ, 32 calibration training images) and scored on the
    10,000 test images beside FP32.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnv3_search.latency import InterleavedPolicy, available_backends, make_backend, measure_interleaved  # noqa: E402
from mnv3_search.model.build import build_model  # noqa: E402
from mnv3_search.spec.spaces import resolve_spec_path  # noqa: E402
from mnv3_search.spec.yaml_io import load_spec  # noqa: E402

BACKENDS = ("onnxruntime", "executorch", "openvino")


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def latency(models: list[str], passes: int) -> None:
    for name in models:
        spec = load_spec(resolve_spec_path(name)).with_overrides(num_classes=10)
        torch.manual_seed(0)
        model = build_model(spec).eval()
        shape = (1, 3, spec.resolution, spec.resolution)
        runners, labels = [], []
        for backend in (b for b in BACKENDS if b in available_backends()):
            for precision in ("fp32", "int8"):
                c0, w0 = time.process_time(), time.perf_counter()
                runners.append(make_backend(backend, 1, precision).runner(model, shape))
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                labels.append(f"{backend} {precision}")
                print(f"{name} {backend} {precision}: conversion {cpu:.1f} s CPU, {wall:.1f} s wall "
                      f"(load {_load()})", flush=True)
        measured = measure_interleaved(runners, InterleavedPolicy(passes=passes, clock="thread"))
        base = measured[0].p25_ms
        print(f"\n{name} at {spec.resolution} px, 1 thread, batch 1, {passes} interleaved passes x 5 runs, thread "
              f"CPU clock (load {_load()})")
        print(f"{'runtime':24s} {'p25 ms':>8s} {'median':>8s} {'/ ORT FP32':>10s}")
        for label, m in zip(labels, measured):
            print(f"{label:24s} {m.p25_ms:8.3f} {m.median_ms:8.3f} {m.p25_ms / base:10.3f}")
        print(flush=True)


def accuracy(steps: int) -> None:
    from mnv3_search.data import load_dataset
    from mnv3_search.quantize import int8_accuracy
    from mnv3_search.train import train

    dataset = load_dataset("fashion-mnist", resolution=32, limit=20000)
    spec = load_spec(resolve_spec_path("small")).with_overrides(num_classes=10)
    torch.manual_seed(0)
    model = build_model(spec)
    t0 = time.perf_counter()
    train(model, dataset, steps, batch_size=128, seed=0)
    trained = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores, data = int8_accuracy(model.eval(), dataset)
    print(f"Small, {steps} steps at 32 px on Fashion-MNIST ({trained:.0f} s); INT8 (ONNX Runtime QDQ, 32 calibration "
          f"images) quantized and scored in {time.perf_counter() - t0:.0f} s on {scores.images:,} test images: FP32 "
          f"{100 * scores.torch_accuracy:.2f}%, INT8 {100 * scores.file_accuracy:.2f}% "
          f"({100 * (scores.file_accuracy - scores.torch_accuracy):+.2f} points), same class on "
          f"{100 * scores.agreement:.1f}%; file {len(data) / 1e6:.2f} MB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small", "large"])
    parser.add_argument("--passes", type=int, default=30)
    parser.add_argument("--accuracy-steps", type=int, default=200, help="0: skip (c)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    latency(args.models, args.passes)
    if args.accuracy_steps:
        accuracy(args.accuracy_steps)


if __name__ == "__main__":
    main()
