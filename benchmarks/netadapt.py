"""NetAdapt vs the width multiplier, and what the pruner saves.

    python benchmarks/netadapt.py                      # Fashion-MNIST, Small, 50 % of the seed's latency
    python benchmarks/netadapt.py --data digits --limit 1000 --seed-epochs 10   # quick

1. A NetAdapt run (library API) on Small: seed trained on the data, then adapted to `--budget` of the seed's
   latency on this machine (ONNX Runtime, 1 thread, 224 px), then the long fine-tune.
2. The width-multiplier baseline: the widest multiplier (paper semantics, steps of 0.05) whose measured
   latency is at most the NetAdapt network's, timed interleaved with it and the seed. It is trained from
   scratch for as many epochs as the seed and then given the same long fine-tune.
3. The pruner: for the first `--check-iterations` iterations, every proposal is evaluated again in full (no
   pruner) from the same parent. Fine-tune steps spent with and without the pruner, and whether the full
   evaluation picks the same proposal.

Prints the figures and writes results/benchmarks/netadapt.csv (one row per figure).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pandas as pd
import torch

from mnv3_search import build_model, load_spec
from mnv3_search.latency.measure import make_backend, torch_threads
from mnv3_search.latency.table import LatencyTable
from mnv3_search.netadapt import RunConfig, run_netadapt
from mnv3_search.netadapt.evaluate import Evaluator, load_run_dataset
from mnv3_search.netadapt.runfolder import RunFolder
from mnv3_search.netadapt.study import ITERATION_ATTR, claim
from mnv3_search.prune.groups import proposal_groups
from mnv3_search.report.frames import write_csv
from mnv3_search.spec.spaces import resolve_spec_path
from mnv3_search.train import evaluate, train_epochs

OUT = Path("results/benchmarks")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--limit", type=int, default=20000, help="training images")
    p.add_argument("--holdout", type=float, default=0.05)
    p.add_argument("--budget", default="50%")
    p.add_argument("--schedule", default="0.05,0.95", help="first cut, decay (reaching 50 %% with the official "
                                                          "2.5 %%/0.96 takes ~40 iterations)")
    p.add_argument("--seed-epochs", type=int, default=2)
    p.add_argument("--long-epochs", type=int, default=2)
    p.add_argument("--short-steps", type=int, default=20)
    p.add_argument("--reports", type=int, default=4)
    p.add_argument("--check-iterations", type=int, default=3)
    p.add_argument("--out", default=str(OUT / "netadapt-run"))
    return p.parse_args()


class ScratchRun(RunFolder):
    """The run folder for parents, a scratch folder for the re-evaluated proposals' weights."""

    def __init__(self, path: Path, scratch: Path) -> None:
        super().__init__(path)
        self.scratch = scratch

    def trial_checkpoint(self, number: int) -> Path:
        return self.scratch / f"{number:05d}.pt"


def full_evaluation(run_dir: Path, config: RunConfig, iteration: int) -> tuple[pd.DataFrame, str, int, int]:
    """Every proposal of `iteration` fine-tuned in full; returns (rows, choice, steps in full, steps pruned)."""
    run = RunFolder(run_dir)
    proposals = pd.read_csv(run.proposals_csv)
    mine = proposals[proposals["iteration"] == iteration]
    rows = run.read_iterations()
    parent = rows[iteration - 1]
    seed_spec, _ = RunFolder.load(run.seed_checkpoint)
    groups = proposal_groups(seed_spec, config.step)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    parent_rel = "seed.pt" if iteration == 1 else f"iterations/{iteration - 1:03d}.pt"
    for _, p in mine.iterrows():
        study.enqueue_trial({"group": p["group"], "channels": int(p["channels"])},
                            user_attrs={ITERATION_ATTR: iteration, "parent": parent_rel})
    evaluator = Evaluator(ScratchRun(run_dir, OUT / "scratch"), config, [g.name for g in groups],
                          max(g.channels for g in groups))
    while (trial := claim(study)) is not None:
        evaluator.evaluate(study, trial)
    full = pd.DataFrame([{"group": t.params["group"], "channels": t.params["channels"], "accuracy": t.value}
                         for t in study.trials])
    merged = mine.merge(full, on=["group", "channels"])
    current = parent["predicted_latency_ms"]
    merged["score"] = (merged["accuracy"] - parent["holdout_accuracy"]) / (current - merged["predicted_latency_ms"])
    best = merged.sort_values(["score", "trial"], ascending=[False, True]).iloc[0]
    every = max(1, config.short_steps // config.reports)
    spent = int(sum(config.short_steps if s == "COMPLETE" else r * every
                    for s, r in zip(mine["state"], mine["reports"])))
    return merged, f"{best['group']}={int(best['channels'])}", len(mine) * config.short_steps, spent


def width_baseline(config: RunConfig, final_spec, run_dir: Path) -> dict:
    """Widest multiplier no slower than the NetAdapt network (measured interleaved), trained like the seed."""
    base = load_spec(resolve_spec_path(config.spec_path)).with_overrides(
        resolution=config.resolution, num_classes=final_spec.num_classes)
    table = LatencyTable.open(run_dir / "lut.json", make_backend("onnxruntime", 1))
    widths = [round(1.0 - 0.05 * i, 2) for i in range(14)]
    candidates = [replace(base, width=w, name=base.name) for w in widths]
    measured = table.measure_networks([final_spec, base] + candidates)
    final_ms, seed_ms = measured[0].p25_ms, measured[1].p25_ms
    chosen = next(((w, m.p25_ms) for w, m in zip(widths, measured[2:]) if m.p25_ms <= final_ms),
                  (widths[-1], measured[-1].p25_ms))
    width, width_ms = chosen
    dataset = load_run_dataset(config)
    torch.manual_seed(config.seed)
    model = build_model(replace(base, width=width))
    start = time.perf_counter()
    train_epochs(model, dataset, config.seed_epochs, batch_size=config.batch_size, lr=config.lr, seed=config.seed)
    train_epochs(model, dataset, config.long_epochs, batch_size=config.batch_size, lr=config.lr * 0.1,
                 seed=config.seed)
    return {"width": width, "width_ms": width_ms, "netadapt_ms": final_ms, "seed_ms": seed_ms,
            "width_test_accuracy": evaluate(model, dataset, dataset.test),
            "width_train_seconds": time.perf_counter() - start}


def main() -> None:
    args = parse()
    OUT.mkdir(parents=True, exist_ok=True)
    config = RunConfig(spec_path="small", budget=args.budget, schedule=args.schedule, data=args.data,
                       limit=args.limit, holdout=args.holdout, seed_epochs=args.seed_epochs,
                       long_epochs=args.long_epochs, short_steps=args.short_steps, reports=args.reports)
    start = time.perf_counter()
    result = run_netadapt(config, out=args.out)
    netadapt_seconds = time.perf_counter() - start
    run_dir = Path(args.out)
    iterations = pd.read_csv(run_dir / "iterations.csv")
    print(f"NetAdapt: {result.iterations} iterations in {netadapt_seconds:.0f} s; predicted "
          f"{result.final_value:.3f} ms vs seed {result.seed_value:.3f} ms; measured {result.measured_ms:.3f} vs "
          f"{result.seed_measured_ms:.3f} ms; test accuracy {100 * result.test_accuracy:.2f} %")
    with torch_threads(1):
        baseline = width_baseline(config, result.final_spec, run_dir)
    print(f"width multiplier {baseline['width']}: {baseline['width_ms']:.3f} ms (NetAdapt {baseline['netadapt_ms']:.3f} "
          f"ms, seed {baseline['seed_ms']:.3f} ms, timed together); test accuracy "
          f"{100 * baseline['width_test_accuracy']:.2f} %")
    rows = [
        {"figure": "netadapt_iterations", "value": result.iterations},
        {"figure": "netadapt_seconds", "value": netadapt_seconds},
        {"figure": "seed_holdout_accuracy", "value": iterations["holdout_accuracy"].iloc[0]},
        {"figure": "netadapt_test_accuracy", "value": result.test_accuracy},
        {"figure": "netadapt_latency_ms", "value": baseline["netadapt_ms"]},
        {"figure": "seed_latency_ms", "value": baseline["seed_ms"]},
        {"figure": "netadapt_vs_seed_latency_ratio", "value": baseline["netadapt_ms"] / baseline["seed_ms"]},
        {"figure": "width_multiplier", "value": baseline["width"]},
        {"figure": "width_latency_ms", "value": baseline["width_ms"]},
        {"figure": "width_test_accuracy", "value": baseline["width_test_accuracy"]},
        {"figure": "width_vs_netadapt_latency_ratio", "value": baseline["width_ms"] / baseline["netadapt_ms"]},
    ]
    same, full_steps, spent_steps = 0, 0, 0
    checked = min(args.check_iterations, result.iterations)
    with torch_threads(1):
        for iteration in range(1, checked + 1):
            merged, full_choice, full, spent = full_evaluation(run_dir, config, iteration)
            chosen = iterations.loc[iterations["iteration"] == iteration, "proposal"].item()
            same += chosen == full_choice
            full_steps, spent_steps = full_steps + full, spent_steps + spent
            print(f"iteration {iteration}: pruned run chose {chosen}, full evaluation {full_choice}; fine-tune steps "
                  f"{spent} with the pruner vs {full} in full")
    rows += [
        {"figure": "pruner_checked_iterations", "value": checked},
        {"figure": "pruner_steps_spent", "value": spent_steps},
        {"figure": "full_steps", "value": full_steps},
        {"figure": "pruner_step_saving", "value": 1 - spent_steps / full_steps if full_steps else None},
        {"figure": "pruner_same_choice", "value": same},
    ]
    frame = pd.DataFrame(rows)
    write_csv(frame, OUT / "netadapt.csv")
    print(frame.to_string(index=False))
    print(f"wrote {OUT / 'netadapt.csv'}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
