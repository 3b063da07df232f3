"""Latency table benchmark, per backend (and precision): build cost, seed-relative accuracy quiet and loaded.

    .venv/bin/python benchmarks/latency.py [--targets onnxruntime,torch] [--models large,small] [--variants 30]
                                           [--repeats 3] [--sections build,check] [--out results/benchmarks]

For each target (`backend` or `backend:precision`; the list is one argument, so a new backend or INT8 is one
more item):

build  a fresh table with what `netadapt` needs for each model (`lut build`: every single-axis width in steps
       of 8, then the calibration on the seed and its companions): entries, wall seconds and CPU-minutes of
       this process (the issue's budget: 15 CPU-minutes per backend and precision), and the calibration's own
       held-out error.
check  `--variants` random channel variants of each model spanning a quarter to all of the seed's channels
       (`prune.variants.variant_specs`, seed 0), predicted from the table and timed beside the seed, `--repeats`
       times quiet and as often beside a CPU-bound competitor on the other core (this process pinned to core 0,
       the competitor to core 1, where the machine allows). Seed-relative MAPE / worst / share within +-10 % /
       mean signed error (what NetAdapt decides on; the goal: MAPE <= 2 %, 100 % within +-10 %), the raw block
       sum's figures beside them, the variants' measured shares of the seed, and the absolute MAPE with the
       host's drift since calibration beside it (absolute levels drift; ratios of networks timed together
       hold). Figures are printed as median [min-max] over the repeats.
repeat whole-model repeatability over `--processes` separate processes (the old section a).

Everything runs on 1 thread, batch 1, 224 px unless --resolution says otherwise. The host is shared: the load
average is recorded with every figure. Rows go to OUT/latency.csv (one per target, model, condition, repeat and
metric) and a printed summary to OUT/latency.txt.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnv3_search.fileio import atomic_write_text, write_csv  # noqa: E402
from mnv3_search.latency import (Backend, InterleavedPolicy, LatencyTable, build_table, check_table,  # noqa: E402
                                 heldout_text, make_backend, measure_interleaved, summarize_errors)
from mnv3_search.model.build import build_model  # noqa: E402
from mnv3_search.prune.variants import calibration_companions, netadapt_keys, variant_specs  # noqa: E402
from mnv3_search.spec.arch import ArchSpec  # noqa: E402
from mnv3_search.spec.spaces import resolve_spec_path  # noqa: E402
from mnv3_search.spec.yaml_io import load_spec  # noqa: E402

COMPETITOR = "while True:\n    pass\n"
CHECK_METRICS = ("rel_mape_pct", "rel_worst_pct", "rel_within_10_pct", "rel_bias_pct", "raw_rel_mape_pct",
                 "raw_rel_bias_pct", "smallest_ratio", "largest_ratio", "abs_mape_pct", "drift_pct", "reliable")


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def make_target(target: str, threads: int = 1) -> Backend:
    """`backend` or `backend:precision`; FP32 is every backend's default. A precision the installed backends do
    not take is one clear line and exit 2."""
    name, _, precision = target.partition(":")
    precision = precision or "fp32"
    if precision == "fp32":
        return make_backend(name, threads)
    if "precision" not in inspect.signature(make_backend).parameters:
        sys.exit(print(f"latency.py: target {target!r}: this mnv3-search has no precision other than fp32",
                       file=sys.stderr) or 2)
    return make_backend(name, threads, precision=precision)  # type: ignore[call-arg]


def _spec(model: str, resolution: Optional[int]) -> ArchSpec:
    spec = load_spec(resolve_spec_path(model))
    return spec.with_overrides(resolution=resolution) if resolution else spec


def build(target: str, table: LatencyTable, specs: dict[str, ArchSpec]) -> list[dict]:
    rows = []
    for model, spec in specs.items():
        report = build_table(table, spec, netadapt_keys(spec, 8), calibration_companions(spec))
        cal = report.calibration
        held = cal.heldout_pct[cal.model] if cal.heldout_pct else float("nan")
        print(f"[{target}] build {model}: {report.entries_needed} entries ({report.entries_measured} measured) in "
              f"{report.seconds:.0f} s wall, {report.cpu_seconds / 60:.2f} CPU-min; calibration {cal.model} on "
              f"{cal.networks} networks, held-out seed-relative error {held:.1f}% ({heldout_text(cal)}); "
              f"load {_load()}", flush=True)
        for metric, value in (("entries", report.entries_needed), ("entries_measured", report.entries_measured),
                              ("wall_seconds", report.seconds), ("cpu_minutes", report.cpu_seconds / 60),
                              ("heldout_pct", held)):
            rows.append({"target": target, "model": model, "section": "build", "condition": "", "repeat": 0,
                         "metric": metric, "value": value, "detail": f"{cal.model}; load {_load()}"})
    return rows


# the cores this process may use at start: pinning itself to the first must not hide the second
CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def _pin(pid: int, core: int) -> bool:
    """Pin a process to one of `CORES` where there are two or more (returns whether it did)."""
    if len(CORES) < 2:
        return False
    os.sched_setaffinity(pid, {CORES[core % len(CORES)]})
    return True


def check(target: str, table: LatencyTable, specs: dict[str, ArchSpec], variants: int, repeats: int,
          out: Path) -> list[dict]:
    rows: list[dict] = []
    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    pinned = _pin(0, 0)
    try:
        for model, spec in specs.items():
            networks = variant_specs(spec, variants, seed=0)
            companions = calibration_companions(spec)
            for repeat in range(1, repeats + 1):
                for condition in ("quiet", "loaded"):
                    competitor = None
                    if condition == "loaded":
                        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR])
                        if pinned:
                            _pin(competitor.pid, 1)
                        time.sleep(0.5)
                    try:
                        t0 = time.perf_counter()
                        report = check_table(table, spec, networks, companions)
                    finally:
                        if competitor is not None:
                            competitor.kill()
                            competitor.wait()
                    s = summarize_errors(report.rows)
                    values = {"rel_mape_pct": s.rel_mape_pct, "rel_worst_pct": s.rel_worst_pct,
                              "rel_within_10_pct": s.rel_within_10_pct, "rel_bias_pct": s.rel_bias_pct,
                              "raw_rel_mape_pct": s.raw_rel_mape_pct, "raw_rel_bias_pct": s.raw_rel_bias_pct,
                              "smallest_ratio": s.smallest_ratio, "largest_ratio": s.largest_ratio,
                              "abs_mape_pct": s.mape_pct, "drift_pct": report.drift_pct,
                              "reliable": float(report.reliable)}
                    print(f"[{target}] {model} {condition:6s} #{repeat}: seed-relative MAPE {s.rel_mape_pct:.2f}% "
                          f"(raw sum {s.raw_rel_mape_pct:.2f}%), worst {s.rel_worst_pct:.2f}%, within ±10% "
                          f"{s.rel_within_10_pct:.0f}%, mean signed {s.rel_bias_pct:+.2f}% (raw sum "
                          f"{s.raw_rel_bias_pct:+.2f}%); variants at {100 * s.smallest_ratio:.0f}-"
                          f"{100 * s.largest_ratio:.0f}% of the seed; absolute MAPE {s.mape_pct:.1f}% with drift "
                          f"{report.drift_pct:+.1f}% since calibration; "
                          f"{'reliable' if report.reliable else 'UNRELIABLE'}; {time.perf_counter() - t0:.0f} s, "
                          f"load {_load()}", flush=True)
                    detail = f"{s.count} variants, pinned {pinned}, load {_load()}"
                    rows += [{"target": target, "model": model, "section": "check", "condition": condition,
                              "repeat": repeat, "metric": metric, "value": values[metric], "detail": detail}
                             for metric in CHECK_METRICS]
                    frame = pd.DataFrame([{**r.__dict__, "relative_error_pct": r.relative_error_pct,
                                           "raw_relative_error_pct": r.raw_relative_error_pct} for r in report.rows])
                    name = f"latency_check_{target.replace(':', '-')}_{model}_{condition}_{repeat}.csv"
                    write_csv(frame, out / name)
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)
    return rows


def worker(targets: list[str], models: list[str]) -> None:
    """One process of `repeat`: each model on each target, interleaved; JSON on stdout."""
    policy = InterleavedPolicy(passes=30, runs_per_pass=5, warmup_runs=5)
    result = {}
    for target in targets:
        backend = make_target(target)
        specs = [load_spec(resolve_spec_path(m)) for m in models]
        runners = [backend.runner(build_model(s), (1, 3, s.resolution, s.resolution)) for s in specs]
        for model, m in zip(models, measure_interleaved(runners, policy)):
            result[f"{target}/{model}"] = {"median_ms": m.median_ms, "p25_ms": m.p25_ms}
    print(json.dumps(result))


def repeatability(targets: list[str], models: list[str], processes: int) -> list[dict]:
    runs = []
    for i in range(processes):
        out = subprocess.run([sys.executable, __file__, "--worker", "--targets", ",".join(targets), "--models",
                              ",".join(models)], check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  process {i + 1}/{processes}: " + ", ".join(f"{k} {v['median_ms']:.2f}/{v['p25_ms']:.2f}"
                                                           for k, v in runs[-1].items()), flush=True)
    rows = []
    for key in runs[0]:
        target, model = key.split("/")
        for stat in ("median_ms", "p25_ms"):
            values = [r[key][stat] for r in runs]
            rows.append({"target": target, "model": model, "section": "repeat", "condition": "", "repeat": 0,
                         "metric": f"spread_{stat}", "value": max(values) / min(values) - 1,
                         "detail": " ".join(f"{v:.3f}" for v in values)})
    return rows


def summary(frame: pd.DataFrame) -> str:
    """One line per target, model and condition: median [min-max] over the repeats of each check figure."""
    lines = []
    checks = frame[frame["section"] == "check"]
    for (target, model, condition), group in checks.groupby(["target", "model", "condition"], sort=False):
        def fig(metric: str, fmt: str = "{:.2f}") -> str:
            values = group[group["metric"] == metric]["value"].tolist()
            return (fmt.format(statistics.median(values)) + " [" + fmt.format(min(values)) + "-"
                    + fmt.format(max(values)) + "]")
        n = group["repeat"].nunique()
        lines.append(f"{target:14s} {model:6s} {condition:6s} n={n}: MAPE {fig('rel_mape_pct')}%, worst "
                     f"{fig('rel_worst_pct')}%, within ±10% {fig('rel_within_10_pct', '{:.0f}')}%, signed "
                     f"{fig('rel_bias_pct', '{:+.2f}')}%; raw sum MAPE {fig('raw_rel_mape_pct')}% signed "
                     f"{fig('raw_rel_bias_pct', '{:+.2f}')}%; absolute MAPE {fig('abs_mape_pct', '{:.1f}')}% at drift "
                     f"{fig('drift_pct', '{:+.1f}')}%")
    for _, r in frame[frame["section"] == "build"].iterrows():
        if r["metric"] in ("cpu_minutes", "heldout_pct"):
            lines.append(f"{r['target']:14s} {r['model']:6s} build {r['metric']}: {r['value']:.2f}")
    for _, r in frame[frame["section"] == "repeat"].iterrows():
        lines.append(f"{r['target']:14s} {r['model']:6s} {r['metric']}: {100 * r['value']:.1f}% ({r['detail']})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--targets", default="onnxruntime",
                        help="Comma list of backend[:precision], e.g. onnxruntime,torch or onnxruntime:int8.")
    parser.add_argument("--models", default="large,small", help="Shipped specs to build and check.")
    parser.add_argument("--sections", default="build,check", help="Any of build, check, repeat.")
    parser.add_argument("--variants", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="Checks per condition (quiet, loaded).")
    parser.add_argument("--processes", type=int, default=5, help="Processes of the repeat section.")
    parser.add_argument("--resolution", type=int, help="Input size; default: each spec's (224).")
    parser.add_argument("--keep-table", action="store_true",
                        help="Reuse OUT's tables instead of building fresh ones (build then measures nothing new).")
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.worker:
        worker(targets, models)
        return
    sections = set(args.sections.split(","))
    unknown = sections - {"build", "check", "repeat"}
    if unknown:
        sys.exit(print(f"latency.py: unknown section(s) {', '.join(sorted(unknown))}; use build, check, repeat",
                       file=sys.stderr) or 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = {m: _spec(m, args.resolution) for m in models}
    rows: list[dict] = []
    started = time.perf_counter()
    print(f"load average at start: {_load()}", flush=True)
    for target in targets:
        backend = make_target(target)  # refuses an unknown target before anything is measured
        path = out / f"latency_table_{target.replace(':', '-')}.json"
        if "build" in sections and not args.keep_table:
            path.unlink(missing_ok=True)
        table = LatencyTable.open(path, backend, 1, InterleavedPolicy())
        if "build" in sections:
            rows += build(target, table, specs)
        if "check" in sections:
            rows += check(target, table, specs, args.variants, args.repeats, out)
    if "repeat" in sections:
        rows += repeatability(targets, models, args.processes)
    frame = pd.DataFrame(rows)
    text = summary(frame) if rows else ""
    print(text)
    frame = pd.concat([frame, pd.DataFrame([{"target": "", "model": "", "section": "meta", "condition": "",
                                             "repeat": 0, "metric": "total_seconds",
                                             "value": time.perf_counter() - started,
                                             "detail": f"load average at end {_load()}"}])])
    write_csv(frame, out / "latency.csv")
    atomic_write_text(out / "latency.txt", text + "\n")
    print(f"wrote {out / 'latency.csv'} (load average at end: {_load()})")


if __name__ == "__main__":
    main()
