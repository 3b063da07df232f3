"""What does an INT8 network need from its calibration? Test accuracy of the quantized file against its FP32
network, per calibration-set size, draw of the images and way of finding ranges.

    .venv/bin/python benchmarks/calibration.py RUN_DIR [RUN_DIR ...] [--counts 32,128,512] [--draws 0,1,2]
                                               [--methods minmax,percentile,entropy]

Each RUN_DIR is a finished `netadapt` run folder (final.pt, run.json): its network is quantized as
`--precision int8` quantizes it (ONNX Runtime static QDQ, quantize.py) on `count` training images of the run's
own data drawn by seed `draw` (quantize.calibration_images), with activation ranges found by each of
`--methods` (ONNX Runtime's MinMax, which the tool uses, Percentile or Entropy), and the quantized file and
the FP32 network are scored on the run's test split. Why: `--precision int8` calibrates on 32 images, and the
premise benchmark's INT8 files lost 3.6 / 0.1 / 0.9 points against FP32 on three seeds; this says whether
the set's size, its draw or the way ranges are found is to blame. Rows go to
results/benchmarks/calibration.csv; the table printed gives per method and count the loss (INT8 - FP32,
points) as the median over networks and draws with its range, and per network the spread over draws.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnv3_search import build_model  # noqa: E402
from mnv3_search.fileio import write_csv  # noqa: E402
from mnv3_search.latency import onnx_bytes, quantize_onnx  # noqa: E402
from mnv3_search.latency.backends.onnxfile import CALIBRATION_METHODS  # noqa: E402
from mnv3_search.netadapt import RunConfig  # noqa: E402
from mnv3_search.netadapt.evaluate import load_run_dataset  # noqa: E402
from mnv3_search.netadapt.runfolder import RunFolder  # noqa: E402
from mnv3_search.quantize import calibration_images, onnx_predictions, torch_predictions  # noqa: E402

OUT = Path("results/benchmarks")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished netadapt run folders (final.pt, run.json)")
    p.add_argument("--counts", default="32,128,512", help="calibration-set sizes")
    p.add_argument("--draws", default="0,1,2", help="seeds drawing the calibration images")
    p.add_argument("--methods", default="minmax", help=f"of {', '.join(CALIBRATION_METHODS)}")
    args = p.parse_args()
    args.counts = [int(c) for c in args.counts.split(",")]
    args.draws = [int(d) for d in args.draws.split(",")]
    args.methods = args.methods.split(",")
    unknown = [m for m in args.methods if m not in CALIBRATION_METHODS]
    if unknown:
        raise SystemExit(f"error: --methods {','.join(unknown)}: use {', '.join(CALIBRATION_METHODS)}")
    missing = [str(r) for r in args.runs if not (r / "final.pt").is_file() or not (r / "run.json").is_file()]
    if missing:
        raise SystemExit(f"error: not a finished run folder (final.pt, run.json): {', '.join(missing)}")
    return args


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    rows = []
    for run in args.runs:
        config = RunConfig.from_json(json.loads((run / "run.json").read_text())["config"], str(run / "run.json"))
        dataset = load_run_dataset(config)
        spec, state = RunFolder.load(run / "final.pt")
        model = build_model(spec).eval()
        model.load_state_dict(state)
        labels = dataset.test.labels.numpy()
        fp32 = float(np.mean(torch_predictions(model, dataset, dataset.test) == labels))
        size = dataset.resolution
        exported = onnx_bytes(model, (1, 3, size, size), dynamic=True)
        for method in args.methods:
            for count in args.counts:
                for draw in args.draws:
                    t0 = time.perf_counter()
                    int8 = quantize_onnx(exported, calibration_images(dataset, count, seed=draw), method)
                    accuracy = float(np.mean(onnx_predictions(int8, dataset, dataset.test) == labels))
                    rows.append({"run": str(run), "method": method, "count": count, "draw": draw,
                                 "fp32": 100 * fp32, "int8": 100 * accuracy, "loss": 100 * (accuracy - fp32),
                                 "seconds": time.perf_counter() - t0})
                    print(f"{run}: {method}, {count} images, draw {draw}: INT8 {100 * accuracy:.2f} % vs FP32 "
                          f"{100 * fp32:.2f} % ({100 * (accuracy - fp32):+.2f} points, {rows[-1]['seconds']:.0f} s)",
                          flush=True)
    frame = pd.DataFrame(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    write_csv(frame, OUT / "calibration.csv")
    print(f"\nINT8 - FP32 test accuracy, points ({len(args.runs)} networks x {len(args.draws)} draws):")
    for (method, count), g in frame.groupby(["method", "count"]):
        spread = g.groupby("run")["loss"].agg(lambda x: x.max() - x.min())
        print(f"  {method:10s} {count:4d} images: median {g['loss'].median():+.2f} (range {g['loss'].min():+.2f} to "
              f"{g['loss'].max():+.2f}); spread over draws per network: median {spread.median():.2f}, "
              f"worst {spread.max():.2f}")
    print(f"wrote {OUT / 'calibration.csv'}")


if __name__ == "__main__":
    main()
