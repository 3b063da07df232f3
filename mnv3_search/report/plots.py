"""Reports of NetAdapt run folders: a summary, PNG plots (matplotlib, Agg backend) and a Pareto plot of many runs.

Plots of one run (written atomically into the run folder, or another folder):
  iterations.png   the resource NetAdapt cut (predicted latency, MACs or params) and holdout accuracy per iteration
  proposals.png    every proposal's resource vs holdout accuracy; pruned ones hollow, the chosen ones marked
  widths.png       per-block channel widths (expansion and output) of the seed vs the final network
A folder of runs gives pareto.png: each finished run's final latency (measured, else predicted by the table;
MACs when some run has no latency) vs test accuracy, the non-dominated runs joined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import matplotlib
import matplotlib.ticker
import pandas as pd

from ..budget import LATENCY, MACS, PARAMS, parse_budget
from ..errors import UserError
from ..fileio import PathLike, atomic_path
from ..netadapt.runfolder import RunFolder, RunResult
from ..spec.arch import ArchSpec
from ..spec.yaml_io import load_spec

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - pyplot must come after use("Agg") (no display needed)

RESOURCE_COLUMN = {LATENCY: "predicted_latency_ms", MACS: "macs", PARAMS: "params"}
RESOURCE_LABEL = {LATENCY: "predicted latency (ms)", MACS: "MACs (M)", PARAMS: "params (M)"}
RESOURCE_SCALE = {LATENCY: 1.0, MACS: 1e-6, PARAMS: 1e-6}


@dataclass
class RunData:
    """What a run folder holds, read once."""

    path: Path
    run: dict
    iterations: pd.DataFrame
    proposals: pd.DataFrame
    resource: str
    result: Optional[RunResult] = None  # None while the run has not finished
    seed_spec: Optional[ArchSpec] = None
    final_spec: Optional[ArchSpec] = None
    summary: list[tuple[str, str, str]] = field(default_factory=list)  # (figure, seed, final)

    @property
    def name(self) -> str:
        return self.path.resolve().name


def is_run_folder(path: Path) -> bool:
    """A run with at least its seed row: what a report can draw."""
    return RunFolder.is_run(path) and RunFolder(path).iterations_csv.is_file()


def read_run(path: PathLike) -> RunData:
    """Read run.json, iterations.csv, proposals.csv and the seed/final specs; one clear line if it is not a run."""
    path = Path(path)
    if not is_run_folder(path):
        raise UserError(f"{path}: not a NetAdapt run folder (needs run.json and iterations.csv) and holds no run "
                        f"folders; give results/<run> or a folder of runs")
    folder = RunFolder(path)
    run = folder.read_run_json() or {}
    iterations = folder.iterations_frame()  # checked: a truncated or damaged table is one line, not a plot
    proposals = folder.proposals_frame() if folder.proposals_csv.is_file() else pd.DataFrame()
    budget = (run.get("config") or {}).get("budget", "")
    resource = parse_budget(budget).resource if budget else LATENCY
    data = RunData(path, run, iterations, proposals, resource, result=folder.read_result())
    if folder.seed_checkpoint.is_file():
        data.seed_spec = RunFolder.load(folder.seed_checkpoint)[0]
    if RunFolder(path).final_yaml.is_file():
        data.final_spec = load_spec(RunFolder(path).final_yaml)
    data.summary = _summary(data)
    return data


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "ms":
        return f"{value:.3f} ms"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    return f"{int(value):,}"


def _summary(data: RunData) -> list[tuple[str, str, str]]:
    it, res = data.iterations, data.result
    seed = it.iloc[0] if len(it) else pd.Series(dtype=object)
    last = it.iloc[-1] if len(it) else pd.Series(dtype=object)
    rows = [
        ("budget", (data.run.get("config") or {}).get("budget", "-"), ""),
        ("iterations", "", str(len(it) - 1 if len(it) else 0)),
        ("params", _fmt(seed.get("params"), "int"), _fmt(last.get("params"), "int")),
        ("MACs", _fmt(seed.get("macs"), "int"), _fmt(last.get("macs"), "int")),
    ]
    if data.resource == LATENCY:
        rows.append(("predicted latency", _fmt(res.seed_resource if res else seed.get("predicted_latency_ms"), "ms"),
                     _fmt(res.final_resource if res else last.get("predicted_latency_ms"), "ms")))
    rows.append(("measured latency (paired)", _fmt(res.seed_measured_latency_ms if res else None, "ms"),
                 _fmt(res.measured_latency_ms if res else None, "ms")))
    rows.append(("holdout accuracy", _fmt(seed.get("holdout_accuracy"), "pct"),
                 _fmt(last.get("holdout_accuracy"), "pct")))
    rows.append(("test accuracy", "", _fmt(res.test_accuracy if res else None, "pct")))
    if len(data.proposals):
        pruned = int((data.proposals["state"] == "PRUNED").sum())
        rows.append(("proposals (pruned early)", "", f"{len(data.proposals)} ({pruned})"))
    return rows


def _save(fig: "plt.Figure", target: Path) -> Path:
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return target


def plot_iterations(data: RunData, target: Path) -> Path:
    it = data.iterations
    column, scale = RESOURCE_COLUMN[data.resource], RESOURCE_SCALE[data.resource]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    values = it[column].astype(float) * scale
    if data.resource == LATENCY and values.isna().iloc[0] and data.result is not None:
        values.iloc[0] = float(data.result.seed_resource)
    ax.plot(it["iteration"], values, "o-", color="tab:blue", label=RESOURCE_LABEL[data.resource])
    measured = it["measured_latency_ms"].astype(float) if "measured_latency_ms" in it else None
    if data.resource == LATENCY and measured is not None and measured.notna().any():
        ax.plot(it["iteration"], measured, "s", color="tab:cyan", label="measured (paired)")
    ax.set_xlabel("iteration")
    ax.set_ylabel(RESOURCE_LABEL[data.resource], color="tab:blue")
    target_value = data.result.target if data.result is not None else None
    if target_value is not None:
        ax.axhline(float(target_value) * scale, color="tab:blue", ls=":", lw=1, label="budget")
    acc = ax.twinx()
    acc.plot(it["iteration"], 100 * it["holdout_accuracy"].astype(float), "^-", color="tab:red",
             label="holdout accuracy")
    acc.set_ylabel("holdout accuracy (%)", color="tab:red")
    handles = ax.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
    ax.legend(handles, [str(h.get_label()) for h in handles], loc="best", fontsize=8)
    ax.set_title(f"{data.name}: per iteration")
    locator = ax.xaxis.get_major_locator()
    if isinstance(locator, matplotlib.ticker.MaxNLocator):  # a linear axis' AutoLocator is one
        locator.set_params(integer=True)
    return _save(fig, target)


def plot_proposals(data: RunData, target: Path) -> Path:
    props = data.proposals
    column, scale = RESOURCE_COLUMN[data.resource], RESOURCE_SCALE[data.resource]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if len(props):
        x = props[column].astype(float) * scale
        y = 100 * props["holdout_accuracy"].astype(float)
        chosen = props["chosen"].astype(str).str.lower() == "true"
        pruned = props["state"] == "PRUNED"
        done = ~pruned & ~chosen
        ax.scatter(x[done], y[done], s=18, c=props["iteration"][done], cmap="viridis", label="proposal")
        ax.scatter(x[pruned], y[pruned], s=18, facecolors="none", edgecolors="grey", label="pruned early")
        ax.scatter(x[chosen], y[chosen], s=90, marker="*", color="tab:red", label="chosen", zorder=3)
        for _, row in props[chosen].iterrows():
            ax.annotate(f"{int(row['iteration'])}", (float(row[column]) * scale, 100 * float(row["holdout_accuracy"])),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(RESOURCE_LABEL[data.resource])
    ax.set_ylabel("holdout accuracy after short fine-tune (%)")
    ax.set_title(f"{data.name}: every proposal (chosen: ★ with its iteration)")
    if len(props):
        ax.legend(loc="best", fontsize=8)
    else:  # --method knapsack: one shape per round, no proposals
        ax.text(0.5, 0.5, "no proposals in this run", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, target)


def block_widths(spec: ArchSpec) -> tuple[list[str], list[int], list[int]]:
    """Labels, expansion widths and output widths per block: stem, bneck 1..N, last conv, hidden."""
    spec = spec.scaled()
    labels = ["stem"] + [f"b{i}" for i in range(1, len(spec.blocks) + 1)] + ["last", "hidden"]
    exp = [0] + [b.exp for b in spec.blocks] + [0, 0]
    out = [spec.stem.out] + [b.out for b in spec.blocks] + [spec.last_conv, spec.hidden]
    return labels, exp, out


def plot_widths(data: RunData, target: Path) -> Optional[Path]:
    if data.seed_spec is None or data.final_spec is None:
        return None
    labels, seed_exp, seed_out = block_widths(data.seed_spec)
    _, final_exp, final_out = block_widths(data.final_spec)
    fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    xs = range(len(labels))
    for ax, seed, final, what in ((axes[0], seed_exp, final_exp, "expansion"), (axes[1], seed_out, final_out,
                                                                                    "output")):
        ax.bar([x - 0.2 for x in xs], seed, width=0.4, color="lightgrey", label="seed")
        ax.bar([x + 0.2 for x in xs], final, width=0.4, color="tab:blue", label="final")
        ax.set_ylabel(f"{what} channels")
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend(fontsize=8)
    axes[1].set_xticks(list(xs), labels, rotation=45, fontsize=8)
    axes[0].set_title(f"{data.name}: channel widths, seed vs final")
    return _save(fig, target)


def report_run(path: PathLike, out: Optional[PathLike] = None) -> tuple[RunData, list[Path]]:
    """Read a run folder and write its PNGs into `out` (default: the run folder)."""
    data = read_run(path)
    folder = Path(out) if out else data.path
    written = [plot_iterations(data, folder / "iterations.png"), plot_proposals(data, folder / "proposals.png")]
    widths = plot_widths(data, folder / "widths.png")
    if widths:
        written.append(widths)
    return data, written


def runs_frame(runs: list[RunData]) -> pd.DataFrame:
    """One row per finished run: final latency (measured, else predicted), MACs, params, test accuracy."""
    rows = []
    for data in runs:
        res = data.result
        if res is None or res.test_accuracy is None:
            continue
        last = data.iterations.iloc[-1]
        predicted = last.get("predicted_latency_ms")
        rows.append({
            "run": data.name, "budget": (data.run.get("config") or {}).get("budget"),
            "measured_latency_ms": res.measured_latency_ms,
            "predicted_latency_ms": None if predicted is None or pd.isna(predicted) else float(predicted),
            "macs": last.get("macs") if res.final_macs is None else res.final_macs,
            "params": last.get("params") if res.final_params is None else res.final_params,
            "test_accuracy": float(res.test_accuracy),
        })
    return pd.DataFrame(rows, columns=["run", "budget", "measured_latency_ms", "predicted_latency_ms", "macs",
                                       "params", "test_accuracy"])


def pareto_mask(x: list[float], y: list[float]) -> list[bool]:
    """Non-dominated points when x is minimised and y maximised."""
    return [not any((x2 <= x1 and y2 >= y1) and (x2 < x1 or y2 > y1) for x2, y2 in zip(x, y))
            for x1, y1 in zip(x, y)]


def plot_pareto(frame: pd.DataFrame, target: Path) -> tuple[Path, str]:
    """Final latency (measured where every run has it, else predicted; else MACs) vs test accuracy."""
    if frame["measured_latency_ms"].notna().all():
        column, label, scale = "measured_latency_ms", "measured latency, paired with its seed (ms)", 1.0
    elif frame["predicted_latency_ms"].notna().all():
        column, label, scale = "predicted_latency_ms", "predicted latency (ms)", 1.0
    else:
        column, label, scale = "macs", "MACs (M)", 1e-6
    x = [float(v) * scale for v in frame[column]]
    y = [100 * float(v) for v in frame["test_accuracy"]]
    front = pareto_mask(x, y)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter(x, y, color=["tab:red" if f else "tab:blue" for f in front], zorder=3)
    for xi, yi, name in zip(x, y, frame["run"]):
        ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    pts = sorted((xi, yi) for xi, yi, f in zip(x, y, front) if f)
    if len(pts) > 1:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color="tab:red", lw=1, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{len(frame)} runs: accuracy vs {label.split(',')[0].split(' (')[0]}")
    return _save(fig, target), column


def find_runs(folder: PathLike) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_dir() and is_run_folder(p))
