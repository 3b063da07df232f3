"""What successive halving saves, and whether it picks what full evaluation picks.

    python benchmarks/pruner.py                         # Small, Fashion-MNIST, 32 px, 10 iterations
    python benchmarks/pruner.py --replay-only           # the table again from the finished iterations
    python benchmarks/pruner.py --iterations 3 --limit 1000 --seed-epochs 1   # quick look

One NetAdapt run (library API, MACs budget so nothing depends on timing noise) evaluates every proposal in
full (`evaluation="full"`) and records each proposal's holdout accuracy and loss at every step count a
halving rung would stop at (short_steps/4, /2, /1 for 3 rungs). Training is deterministic and a halving rung
continues its predecessor's checkpoint exactly (tests/test_netadapt.py checks both), so these are the
figures the halving run sees. Each iteration's halving decisions are then replayed offline with the run's own
selection rule (netadapt.selection.rank): rung by rung, the better half goes on. Reported per setting
(2 .. --rungs rungs): fine-tune steps spent against full evaluation, how many iterations pick the same proposal,
and the holdout accuracy lost where they differ (full evaluation's pick minus halving's, both at
short_steps).

Prints a table and writes results/benchmarks/pruner.csv (one row per iteration and setting).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import optuna
import pandas as pd
import torch

from mnv3_search import load_spec
from mnv3_search.model.counts import spec_macs
from mnv3_search.netadapt import BudgetUnreachable, RunConfig, run_netadapt
from mnv3_search.netadapt.runfolder import RunFolder
from mnv3_search.netadapt.selection import Candidate, rank, survivors, tolerance
from mnv3_search.netadapt.study import make_storage
from mnv3_search.fileio import write_csv
from mnv3_search.spec.spaces import resolve_spec_path

OUT = Path("results/benchmarks")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="small")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--limit", type=int, default=2000, help="training images (the holdout is 1,000 more)")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--short-steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed-epochs", type=int, default=2)
    p.add_argument("--select", default="ratio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rungs", type=int, default=3, help="rungs recorded (replays use 2..rungs)")
    p.add_argument("--out", nargs="+", default=[str(OUT / "pruner-run")],
                   help="run folder; with --replay-only, one or more (their iterations are pooled)")
    p.add_argument("--replay-only", action="store_true", help="replay the finished iterations of --out, no training")
    return p.parse_args()


def replay(proposals: list[dict], rung_steps: list[int], select: str) -> tuple[str, int]:
    """Synchronous successive halving over one iteration's recorded metrics: (choice, steps spent)."""
    entrants = [p["group"] for p in proposals]
    by_group = {p["group"]: p for p in proposals}
    spent, start, ranked = 0, 0, []
    for i, stop in enumerate(rung_steps):
        spent += len(entrants) * (stop - start)
        first = by_group[entrants[0]]
        ranked = rank([Candidate(g, *by_group[g]["metrics"][stop], by_group[g]["resource"]) for g in entrants],
                      select, first["parent_accuracy"], first["parent_resource"], first["tie_tolerance"])
        if i < len(rung_steps) - 1:
            entrants = [r.candidate.group for r in survivors(ranked)]
        start = stop
    return ranked[0].candidate.group, spent


def replay_run(run: RunFolder, recorded: list[int], args: argparse.Namespace) -> list[dict]:
    """One row per finished iteration of `run` and rung setting."""
    study = optuna.load_study(study_name=run.path.resolve().name, storage=make_storage(run.default_storage_url))
    iterations: dict[int, list[dict]] = {}
    images = int(run.read_run_json()["holdout_images"])
    same_rule = True  # a run made with an earlier tie tolerance is replayed with today's rule
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        a = t.user_attrs
        tie = tolerance(a["parent_accuracy"], images)
        same_rule = same_rule and abs(tie - a["tie_tolerance"]) < 1e-12
        iterations.setdefault(int(a["iteration"]), []).append({
            "group": t.params["group"], "resource": float(a["resource"]),
            "metrics": {int(step): (acc, loss) for step, acc, loss in a["metrics"]},
            "parent_accuracy": a["parent_accuracy"], "parent_resource": a["parent_resource"], "tie_tolerance": tie})
    chosen = {r.iteration: r.group for r in run.read_iterations()[1:]}
    rows = []
    for it, proposals in sorted(iterations.items()):
        if it not in chosen:
            continue  # an iteration the run did not finish
        full_choice, full_steps = replay(proposals, recorded[-1:], args.select)
        assert full_choice == chosen[it] or not same_rule, (it, full_choice, chosen[it])
        final = {p["group"]: p["metrics"][recorded[-1]][0] for p in proposals}
        for rungs in range(2, len(recorded) + 1):
            choice, steps = replay(proposals, recorded[-rungs:], args.select)
            rows.append({"run": run.path.name, "iteration": it, "rungs": rungs, "proposals": len(proposals),
                         "full_choice": full_choice, "halving_choice": choice, "same": choice == full_choice,
                         "full_steps": full_steps, "halving_steps": steps,
                         "accuracy_lost": final[full_choice] - final[choice]})
    return rows


def main() -> None:
    args = parse()
    config_kwargs = dict(data=args.data, limit=args.limit, short_steps=args.short_steps, batch_size=args.batch_size,
                         seed_epochs=args.seed_epochs, long_epochs=0, select=args.select, seed=args.seed,
                         threads=args.threads, evaluation="full", rungs=args.rungs,
                         max_iterations=args.iterations)
    seed_spec = load_spec(resolve_spec_path(args.spec)).with_overrides(num_classes=10)
    budget = f"{spec_macs(seed_spec) * 0.3 / 1e6:.3f}M-macs"  # far enough that --iterations ends the run
    config = RunConfig(spec_path=args.spec, budget=budget, **config_kwargs)
    started = time.perf_counter()
    if not args.replay_only:
        try:
            run_netadapt(config, out=args.out[0])
        except BudgetUnreachable:
            pass  # stopped by max_iterations, as intended
    seconds = time.perf_counter() - started
    recorded = config.rung_steps()  # [s/4, s/2, s] for 3 rungs
    rows = []
    for folder in args.out:
        rows += replay_run(RunFolder(folder), recorded, args)
    frame = pd.DataFrame(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    write_csv(frame, OUT / "pruner.csv")
    holdout = RunFolder(args.out[0]).read_run_json()["holdout_images"]
    print(f"{args.spec}, {args.data} (limit {args.limit}, holdout {holdout} images), short_steps {args.short_steps}, "
          f"batch {args.batch_size}, select {args.select}: {len(frame) // max(1, len(recorded) - 1)} iterations "
          f"over {frame['run'].nunique()} run(s), {frame['proposals'].mean():.1f} proposals each on average"
          + ("" if args.replay_only
             else f"; full-evaluation run {seconds:.0f} s on {torch.get_num_threads()} thread(s)"))
    print(f"{'rungs':>5} {'steps at':>16} {'steps saved':>12} {'same choice':>12} {'acc. lost (mean / max)':>24}")
    for rungs, group in frame.groupby("rungs"):
        saved = 1 - group["halving_steps"].sum() / group["full_steps"].sum()
        lost = group["accuracy_lost"]
        print(f"{rungs:>5} {str(recorded[-rungs:]):>16} {100 * saved:>11.1f}% "
              f"{int(group['same'].sum()):>5} of {len(group):<4} "
              f"{100 * lost.mean():>10.2f} / {100 * lost.max():.2f} pt")


if __name__ == "__main__":
    main()
