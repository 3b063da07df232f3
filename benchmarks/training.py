"""Training benchmark: seed networks and what surgery costs in accuracy. Prints and writes CSV.

    .venv/bin/python benchmarks/training.py [--digits-epochs 15] [--fm-epochs 2] [--fm-limit 20000]
                                            [--finetune-steps 50] [--out results/benchmarks]

(a) seed: Small trained from scratch at 32 px on digits and on Fashion-MNIST (the apt package's IDX files;
    skipped if absent): test accuracy after N epochs, training images/s.
(b) surgery: on each seed, a few proposals (one per group kind, with SE and residual sets): holdout and
    test accuracy right after surgery, after a BN refresh, and after a short fine-tune of T steps.

Runs on 1 thread (the box has 2 cores and is shared); the load average is recorded with the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnv3_search import build_model, load_spec, shrink  # noqa: E402
from mnv3_search.data import FASHION_MNIST_DIR, Dataset, load_dataset  # noqa: E402
from mnv3_search.fileio import write_csv  # noqa: E402
from mnv3_search.spec.spaces import resolve_spec_path  # noqa: E402
from mnv3_search.train import evaluate, fine_tune, refresh_bn, train_epochs  # noqa: E402

PROPOSALS = [("exp10", 288), ("exp4", 48), ("out9-11", 64), ("out4-6", 24), ("last_conv", 288), ("hidden", 512)]


def seed_network(dataset: Dataset, epochs: int, batch_size: int, lr: float, seed: int) -> tuple[object, dict]:
    spec = replace(load_spec(resolve_spec_path("small")), num_classes=dataset.num_classes)
    torch.manual_seed(seed)
    model = build_model(spec)
    result = train_epochs(model, dataset, epochs, batch_size=batch_size, lr=lr, warmup=20, seed=seed)
    row = {"part": "seed", "dataset": dataset.name, "train_images": len(dataset.train), "epochs": epochs,
           "steps": result.steps, "group": "", "keep": "", "stage": "trained",
           "holdout_accuracy": result.accuracy, "test_accuracy": evaluate(model, dataset, dataset.test),
           "seconds": round(result.seconds, 1), "images_per_s": round(result.images_per_s, 1)}
    return (spec, model), row


def surgery_rows(dataset: Dataset, spec, model, steps: int, batch_size: int, seed: int) -> list[dict]:
    rows = []
    parent_sd = model.state_dict()
    for name, keep in PROPOSALS:
        child_spec, child_sd = shrink(spec, parent_sd, name, keep)
        child = build_model(child_spec)
        child.load_state_dict(child_sd, strict=True)
        base = {"part": "surgery", "dataset": dataset.name, "train_images": len(dataset.train), "epochs": "",
                "group": name, "keep": keep}

        def score(stage: str, steps_done: int = 0, seconds: float = 0.0, ips: float = 0.0, test: bool = False) -> None:
            rows.append({**base, "stage": stage, "steps": steps_done,
                         "holdout_accuracy": evaluate(child, dataset, dataset.holdout),
                         "test_accuracy": evaluate(child, dataset, dataset.test) if test else None,
                         "seconds": round(seconds, 1), "images_per_s": round(ips, 1)})

        score("after surgery")  # the parent's BN statistics, inherited as they are
        t = time.perf_counter()
        refresh_bn(child, dataset, num_batches=10, seed=seed)
        score("after BN refresh", seconds=time.perf_counter() - t)
        result = fine_tune(child, dataset, steps, lr=0.01, batch_size=batch_size, seed=seed)
        score("after fine-tune", result.steps, result.seconds, result.images_per_s, test=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits-epochs", type=int, default=15)
    parser.add_argument("--fm-epochs", type=int, default=2)
    parser.add_argument("--fm-limit", type=int, default=20000, help="training images of Fashion-MNIST used")
    parser.add_argument("--fm-holdout", type=float, default=0.05, help="holdout fraction of Fashion-MNIST's 60k")
    parser.add_argument("--finetune-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    runs = [("digits", args.digits_epochs, None, 0.1)]
    if Path(FASHION_MNIST_DIR).is_dir():
        runs.append(("fashion-mnist", args.fm_epochs, args.fm_limit, args.fm_holdout))
    else:
        print(f"skipping Fashion-MNIST: {FASHION_MNIST_DIR} missing (apt-get install dataset-fashion-mnist)")
    rows = []
    for source, epochs, limit, holdout in runs:
        dataset = load_dataset(source, resolution=args.resolution, holdout=holdout, seed=args.seed, limit=limit)
        (spec, model), row = seed_network(dataset, epochs, args.batch_size, 0.1, args.seed)
        rows.append(row)
        print(f"seed Small on {source} ({row['train_images']} images, {epochs} epochs, {row['steps']} steps): "
              f"test {100 * row['test_accuracy']:.2f}%, holdout {100 * row['holdout_accuracy']:.2f}%, "
              f"{row['seconds']} s, {row['images_per_s']} images/s", flush=True)
        for r in surgery_rows(dataset, spec, model, args.finetune_steps, args.batch_size, args.seed):
            rows.append(r)
            test = "" if r["test_accuracy"] is None else f"  test {100 * r['test_accuracy']:6.2f}%"
            print(f"  {r['group']:>9} -> {r['keep']:<4} {r['stage']:<17} holdout {100 * r['holdout_accuracy']:6.2f}%"
                  f"{test}", flush=True)
    frame = pd.DataFrame(rows)
    frame["threads"] = args.threads
    frame["load_average"] = round(os.getloadavg()[0], 2)
    out = Path(args.out) / "training.csv"
    write_csv(frame, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
