"""How close to its measurements can a table's calibration get? The floor under `benchmarks/latency.py`'s figures.

    .venv/bin/python benchmarks/latency_floor.py [--run results/benchmarks] [--companions 10] [--draws 5]

Reads the per-check CSVs a `benchmarks/latency.py` run wrote (latency_check_TARGET_MODEL_CONDITION_REPEAT.csv:
the seed and its random variants, raw block sums and whole-network times measured together) and asks, per
target, model and condition, two questions the table's own figures cannot answer:

- noise: how far does a variant's measured share of the seed move between repeats minutes apart (max / min - 1
  over the repeats, median over variants), and do the table's per-variant errors repeat (correlation across
  repeats: near 0 is noise, near 1 a bias a better calibration could remove)?
- floor: every calibration form of `mnv3_search.latency.calibration` (plain, two-term, overhead, three-term, and
  the one `choose_calibration` keeps) fitted on the seed and `--companions` of the check's own variants, then
  predicting the other variants relative to the seed, (a) in the same measurement (an oracle no table has: its
  calibration is minutes old) and (b) on another repeat's measurement (what a table faces). `--draws` random
  companion sets per pair. If (a) misses the goal (seed-relative MAPE <= 2 %), no calibration of these forms
  reaches it on this host.

Nothing is timed: it runs in seconds on a loaded machine. Rows go to RUN/latency_floor.csv.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnv3_search.latency.calibration import MODELS, Point, choose_calibration, fit_model  # noqa: E402
from mnv3_search.model.counts import spec_params  # noqa: E402
from mnv3_search.prune.variants import variant_specs  # noqa: E402
from mnv3_search.spec.spaces import resolve_spec_path  # noqa: E402
from mnv3_search.spec.yaml_io import load_spec  # noqa: E402

CHECK = re.compile(r"latency_check_(?P<target>.+)_(?P<model>large|small)_(?P<condition>quiet|loaded)"
                   r"_(?P<repeat>\d+)\.csv")
CHOSEN = "chosen"


def param_counts(model: str, variants: int) -> np.ndarray:
    """The seed's and `latency.py`'s variants' parameter counts (the two-term fit's memory term), in CSV order."""
    spec = load_spec(resolve_spec_path(model))
    specs = [spec, *variant_specs(spec, variants, seed=0)]
    return np.array([spec_params(s) for s in specs])


def seed_relative_errors(coefficients: tuple[float, float, float], frame: pd.DataFrame, params: np.ndarray,
                         test: np.ndarray) -> np.ndarray:
    a, b, c = coefficients
    predicted = a * frame.raw_ms.to_numpy() + b * params / 1e6 + c
    ratio = predicted / predicted[0]
    return 100.0 * (ratio[test] / frame.measured_ratio.to_numpy()[test] - 1.0)


def fits(fit_frame: pd.DataFrame, params: np.ndarray, fit: np.ndarray) -> dict[str, tuple[float, float, float]]:
    points: list[Point] = [(float(fit_frame.raw_ms[i]), int(params[i]), float(fit_frame.measured_ms[i]))
                           for i in fit]
    out = {name: fit_model(points, name) if name != "plain" else (points[0][2] / points[0][0], 0.0, 0.0)
           for name in MODELS}
    choice = choose_calibration(points)
    out[CHOSEN] = (choice.a, choice.b_ms_per_mparam, choice.c_ms)
    return out


def analyse(frames: list[pd.DataFrame], params: np.ndarray, companions: int, draws: int,
            rng: np.random.Generator) -> list[dict]:
    variants = len(frames[0]) - 1
    ratios = np.array([f.measured_ratio.to_numpy()[1:] for f in frames])
    errors = np.array([f.relative_error_pct.to_numpy()[1:] for f in frames])
    pairs = list(itertools.combinations(range(len(frames)), 2))
    rows = [{"metric": "ratio_spread_median_pct", "value": 100 * float(np.median(ratios.max(0) / ratios.min(0) - 1))},
            {"metric": "table_error_correlation", "value": float(np.mean([np.corrcoef(errors[i], errors[j])[0, 1]
                                                                         for i, j in pairs]))}]
    for mode, combos in (("same", [(i, i) for i in range(len(frames))]),
                         ("other", list(itertools.permutations(range(len(frames)), 2)))):
        results: dict[str, list[np.ndarray]] = {}
        for (i, j), _ in itertools.product(combos, range(draws)):
            fit = np.concatenate([[0], 1 + rng.choice(variants, companions, replace=False)])
            test = np.setdiff1d(np.arange(1, variants + 1), fit)
            for name, coefficients in fits(frames[i], params, fit).items():
                results.setdefault(name, []).append(seed_relative_errors(coefficients, frames[j], params, test))
        for name, errs in results.items():
            rows += [{"metric": f"{mode}_{name}_mape_pct", "value": float(np.mean([np.abs(e).mean() for e in errs]))},
                     {"metric": f"{mode}_{name}_within10_pct",
                      "value": float(np.mean([100 * (np.abs(e) <= 10).mean() for e in errs]))}]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="results/benchmarks", help="latency.py's --out folder")
    parser.add_argument("--companions", type=int, default=10, help="variants a calibration is fitted on (the "
                        "table's own calibration uses 10 companions)")
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()
    run = Path(args.run)
    groups: dict[tuple[str, str, str], dict[int, Path]] = {}
    for path in run.glob("latency_check_*.csv"):
        match = CHECK.fullmatch(path.name)
        if match:
            key = (match["target"], match["model"], match["condition"])
            groups.setdefault(key, {})[int(match["repeat"])] = path
    if not groups:
        sys.exit(print(f"latency_floor.py: no latency_check_*.csv in {run}; run benchmarks/latency.py --out {run} "
                       "first", file=sys.stderr) or 2)
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    counts: dict[tuple[str, int], np.ndarray] = {}
    for (target, model, condition), paths in sorted(groups.items()):
        frames = [pd.read_csv(paths[r]) for r in sorted(paths)]
        if len(frames) < 2:
            print(f"{target} {model} {condition}: one repeat, no comparison across repeats; skipped")
            continue
        n = len(frames[0]) - 1
        params = counts.setdefault((model, n), param_counts(model, n))
        found = analyse(frames, params, args.companions, args.draws, rng)
        rows += [{"target": target, "model": model, "condition": condition, **r} for r in found]
        v = {r["metric"]: r["value"] for r in found}
        forms = " · ".join(f"{name} {v[f'same_{name}_mape_pct']:.1f}/{v[f'other_{name}_mape_pct']:.1f}"
                           for name in (*MODELS, CHOSEN))
        print(f"{target:17s} {model:5s} {condition:6s} ratio moves {v['ratio_spread_median_pct']:.1f}% between "
              f"repeats, table errors correlate {v['table_error_correlation']:+.2f}; MAPE fitted in the same / "
              f"another measurement: {forms}")
    out = run / "latency_floor.csv"
    pd.DataFrame(rows).to_csv(out, index=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
