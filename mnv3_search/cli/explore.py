"""`mnv3-search explore`: thin over mnv3_search.explore, rendered with rich."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click
from rich import box
from rich.console import Console
from rich.table import Table

from .common import stdout_console
from .options import device_option, use_device
from .settings import config_options
from ..explore import ExploreConfig, run_explore


@click.command()
@click.argument("spec", metavar="SPACE")
@click.option("--budget", required=True, help="15ms, 800us, 90% (of the space's first-choice network's predicted "
              "latency), 50M-macs, 2M-params.")
@config_options(ExploreConfig, "trials", "multi_objective")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Folder (default results/explore-<space>).")
@click.option("--storage", help="Optuna storage URL or *.journal file (default: study.journal in --out).")
@config_options(ExploreConfig, "data", "threads")
@device_option()
def explore(spec: str, budget: str, out_dir: Optional[str], storage: Optional[str], device: str,
            **settings: Any) -> None:
    """Search the choices written in a YAML space (cells holding lists) under a budget, with Optuna.

    \b
    Each trial samples a network; one the latency table predicts over budget is rejected without training
    (recorded as an Optuna constraint), the others train briefly and are scored on the holdout, pruned early
    when hopeless. Writes trials.csv, best.yaml (or pareto/trial-NNNN.yaml), explore.json, study.journal.
    Run the same command again to resume.

    \b
    Examples:
      mnv3-search explore search_spaces/examples/small_choices.yaml --budget 90% --trials 20
      mnv3-search explore my_space.yaml --budget 40M-macs --trials 50 --multi-objective --out results/pareto
    """
    err = Console(stderr=True)
    use_device(device)  # each trial's training
    config = ExploreConfig(spec_path=spec, budget=budget, **settings)  # every other option is a setting
    out = Path(out_dir or Path("results") / f"explore-{Path(spec).stem}")

    def on_trial(info: dict[str, Any]) -> None:
        acc = info.get("holdout_accuracy")
        lat = info.get("predicted_latency_ms")
        err.print(f"trial {info['trial']}: {'REJECTED (over budget)' if info.get('rejected') else info['state']}"
                  + (f", predicted {lat:.3f} ms" if lat is not None else "")
                  + f", {info.get('macs', 0) / 1e6:.2f}M MACs"
                  + (f", holdout {100 * acc:.1f}%" if acc is not None else ""),
                  highlight=False)

    result = run_explore(config, out, storage, on_trial)
    frame = result.trials
    chosen = frame[frame["pareto"]]
    title = "Pareto front" if config.multi_objective else "best feasible trial"
    table = Table(title=f"{title} of {len(frame)} trials",
                  header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("trial", "holdout", "predicted ms", "MACs", "params", "YAML"):
        table.add_column(name, justify="right" if name not in ("YAML",) else "left", no_wrap=True)
    files = dict(result.chosen)
    for row in chosen.to_dict("records"):
        lat = row["predicted_latency_ms"]
        table.add_row(str(row["trial"]), f"{100 * row['holdout_accuracy']:.1f}%",
                      "-" if lat is None or lat != lat else f"{lat:.3f}", f"{row['macs'] / 1e6:.2f}M",
                      f"{int(row['params']):,}", str(files.get(row["trial"], "")))
    console = stdout_console()
    console.print(table)
    rejected = int((frame["state"] == "REJECTED").sum())
    pruned = int((frame["state"] == "PRUNED").sum())
    console.print(f"budget {result.budget_value:.4g} ({result.resource}); {rejected} rejected by prediction, "
                  f"{pruned} pruned early; all trials in {out / 'trials.csv'}", highlight=False)
