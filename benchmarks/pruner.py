"""What successive halving saves, and whether it picks what full evaluation picks.

    python benchmarks/pruner.py                         # Small, Fashion-MNIST, 32 px, 10 iterations
    python benchmarks/pruner.py --seed 1 --out results/benchmarks/pruner-run-s1   # another run to pool
    python benchmarks/pruner.py --replay-only --out results/benchmarks/pruner-run results/benchmarks/pruner-run-s1
    python benchmarks/pruner.py --iterations 3 --limit 1000 --seed-epochs 1   # quick look

One NetAdapt run (library API, MACs budget so nothing depends on timing noise) evaluates every proposal in
full (`evaluation="full"`) and records each proposal's holdout accuracy and loss at short_steps/8, /4, /2
and /1 (the geometric ladder with 4 rungs: every step count the settings below score at). Training is
deterministic and a halving rung continues its predecessor's checkpoint exactly (tests/netadapt/test_netadapt.py
checks both), so these are the figures a halving run sees. Each iteration's halving decisions are then
replayed offline with the run's own selection rule (netadapt.selection.rank, survivors) for every setting
in SETTINGS (ladder, rungs, keep): rung by rung, the best `keep` fraction goes on. Reported per setting:
fine-tune steps spent against full evaluation, how many iterations pick the same proposal, and the holdout
accuracy lost where they differ (full evaluation's pick minus halving's, both at short_steps).

Prints a table and writes results/benchmarks/pruner.csv (one row per iteration and setting).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
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

# (label, ladder, rungs, keep): the default first, then the one it replaced, then neighbours
SETTINGS = [("default", "early", 3, 0.6), ("before", "geometric", 3, 0.5), ("", "geometric", 2, 0.5),
            ("", "geometric", 4, 0.5), ("", "early", 2, 0.6), ("", "early", 3, 0.5)]


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
    p.add_argument("--rungs", type=int, default=4, help="geometric rungs recorded (4: /8, /4, /2, /1)")
    p.add_argument("--out", nargs="+", default=[str(OUT / "pruner-run")],
                   help="run folder; with --replay-only, one or more (their iterations are pooled)")
    p.add_argument("--replay-only", action="store_true", help="replay the finished iterations of --out, no training")
    return p.parse_args()


def replay(proposals: list[dict], rung_steps: list[int], select: str, keep: float) -> tuple[str, int]:
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
            entrants = [r.candidate.group for r in survivors(ranked, keep)]
        start = stop
    return ranked[0].candidate.group, spent


def setting_steps(config: RunConfig, ladder: str, rungs: int) -> list[int]:
    """The step counts a halving run with this ladder (and the full run's short_steps) scores at."""
    return replace(config, ladder=ladder, rungs=rungs).rung_steps()


def replay_run(run: RunFolder) -> list[dict]:
    """One row per finished iteration of `run` and setting (SETTINGS) whose step counts the run recorded."""
    study = optuna.load_study(study_name=run.path.resolve().name, storage=make_storage(run.default_storage_url))
    config = run.resume_config()
    recorded = config.rung_steps()
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
        full_choice, full_steps = replay(proposals, recorded[-1:], config.select, 1.0)
        assert full_choice == chosen[it] or not same_rule, (it, full_choice, chosen[it])
        final = {p["group"]: p["metrics"][recorded[-1]][0] for p in proposals}
        for label, ladder, rungs, keep in SETTINGS:
            steps_at = setting_steps(config, ladder, rungs)
            if not set(steps_at) <= set(recorded):
                continue  # this run did not score at those steps
            choice, steps = replay(proposals, steps_at, config.select, keep)
            rows.append({"run": run.path.name, "iteration": it, "setting": label, "ladder": ladder, "rungs": rungs,
                         "keep": keep, "steps_at": " ".join(map(str, steps_at)), "proposals": len(proposals),
                         "full_choice": full_choice, "halving_choice": choice, "same": choice == full_choice,
                         "full_steps": full_steps, "halving_steps": steps,
                         "accuracy_lost": final[full_choice] - final[choice]})
    return rows


def main() -> None:
    args = parse()
    config_kwargs = dict(data=args.data, limit=args.limit, short_steps=args.short_steps, batch_size=args.batch_size,
                         seed_epochs=args.seed_epochs, long_epochs=0, select=args.select, seed=args.seed,
                         threads=args.threads, evaluation="full", ladder="geometric", rungs=args.rungs,
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
    rows = []
    for folder in args.out:
        rows += replay_run(RunFolder(folder))
    frame = pd.DataFrame(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    write_csv(frame, OUT / "pruner.csv")
    first = RunFolder(args.out[0])
    holdout, made = first.read_run_json()["holdout_images"], first.resume_config()
    iterations = frame.groupby("run")["iteration"].nunique().sum()
    print(f"{made.spec_path}, {made.data} (limit {made.limit}, holdout {holdout} images), short_steps "
          f"{made.short_steps}, batch {made.batch_size}, select {made.select}: {iterations} iterations over "
          f"{frame['run'].nunique()} run(s), {frame.groupby(['run', 'iteration'])['proposals'].first().mean():.1f} "
          f"proposals each on average"
          + ("" if args.replay_only
             else f"; full-evaluation run {seconds:.0f} s on {torch.get_num_threads()} thread(s)"))
    print(f"{'setting':>8} {'ladder':>9} {'rungs':>5} {'keep':>5} {'steps at':>12} {'steps saved':>12} "
          f"{'same choice':>12} {'acc. lost (mean / max)':>24}")
    for (ladder, rungs, keep), group in frame.groupby(["ladder", "rungs", "keep"], sort=False):
        saved = 1 - group["halving_steps"].sum() / group["full_steps"].sum()
        lost = group["accuracy_lost"]
        print(f"{group['setting'].iloc[0]:>8} {ladder:>9} {rungs:>5} {keep:>5.2f} {group['steps_at'].iloc[0]:>12} "
              f"{100 * saved:>11.1f}% {int(group['same'].sum()):>5} of {len(group):<4} "
              f"{100 * lost.mean():>10.2f} / {100 * lost.max():.2f} pt")


if __name__ == "__main__":
    main()
