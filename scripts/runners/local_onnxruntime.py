#!/usr/bin/env python3
"""A `--runner` that times an ONNX file with ONNX Runtime on this machine, printing the runner protocol.

    mnv3-search profile small --runner 'python scripts/runners/local_onnxruntime.py {model} --runs {runs}'

Prints `device: NAME` (--device, default "local-onnxruntime") and then one line per timed run, its latency
in milliseconds, after --warmup untimed runs. With one thread ONNX Runtime computes on the calling thread, so
each run is timed on that thread's CPU clock (a busy host's waiting is not counted); with more, the wall clock.
It is the template for a real device's runner: copy the file there (e.g. `adb push`), run the same loop, print
the same lines. Exit status 2 and one line on stderr when the file cannot be loaded.
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the ONNX file to time")
    parser.add_argument("--runs", type=int, default=20, help="timed runs (one line each)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--device", default="local-onnxruntime", help="the name printed as 'device: NAME'")
    args = parser.parse_args()

    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # any load failure is the caller's problem to see, in one line
        print(f"local_onnxruntime: cannot load {args.model}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    spec = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in spec.shape]
    feed = {spec.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    clock = time.thread_time_ns if args.threads == 1 else time.perf_counter_ns
    print(f"device: {args.device}")
    for _ in range(args.warmup):
        session.run(None, feed)
    for _ in range(args.runs):
        start = clock()
        session.run(None, feed)
        print(f"{(clock() - start) / 1e6:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
