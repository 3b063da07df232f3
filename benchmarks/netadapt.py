"""Is an adapted network better than simply picking a smaller width multiplier at the same latency?

    python benchmarks/netadapt.py --quick                         # pilot: 1 seed, 6,000 images, 2 budgets
    python benchmarks/netadapt.py --seeds 0 --parts train         # one seed's training (one process per seed)
    python benchmarks/netadapt.py --seeds 0 --parts latency       # or one part per process: latency, widths,
                                                                  # macs (waits for latency's seed), scratch
    python benchmarks/netadapt.py --seeds 0,1,2 --parts report    # time every final network together, report

MobileNetV3-Small on Fashion-MNIST (training at `--train-resolution`, latency at 224 px, ONNX Runtime,
1 thread, p25 of interleaved runs). For every seed (`--parts train`, each part cached in the work folder, so a \
killed run
resumes and seeds can train in parallel processes):

1. latency: one NetAdapt chain (library API, latency table) down to the smallest `--budgets` share of the
   seed's latency. The larger budgets are the first iterations of the same chain whose latency, measured
   beside the seed by the loop (predicted by the table for chains from before the loop timed every
   iteration), meets them (the loop would have stopped there: same seed, same schedule, same choices). Every budget's
   network gets the same long fine-tune (`--long-epochs`, cosine from lr/10, as the library's).
2. widths: MobileNetV3-Small at each `--widths` multiplier, trained from scratch (one cosine run from
   `--lr`) for exactly as many SGD steps as the deepest NetAdapt network sees on its path: seed epochs +
   the short fine-tunes of the proposals it is built from (the schedule's iterations to the smallest
   budget) + the long fine-tune (printed; so the widths need not wait for the chain).
3. macs: the same loop guided by exact MAC counts (`NNN-macs` at the same shares of the seed's MACs),
   starting from the same trained seed.
4. scratch: each latency-guided final architecture trained from scratch like a width multiplier: is it
   the shape, or the inherited weights? A seed whose own chain exists in the work folder (it ran part latency
   as a search seed) retrains that chain's shapes, the others the first search seed's (`chain_folder`;
   `scratch-chain0`: seeds 1-3's retrains of seed 0's shapes, from the benchmark that searched once, kept
   beside the per-seed chains).
5. knapsack: the library's `--method knapsack` (HALP-style, prune/knapsack.py: Taylor importance on a search
   seed's trained seed, its own for a seed in `--search-seeds`, a knapsack over the latency table's price of
   every group width, the shape timed beside the seed until the measurement meets the budget) at the same
   shares, trained from scratch like the widths: does one global ranking find shapes as good as NetAdapt's
   proposals? (`knapsack-chain0`: seeds 1-3's retrains of seed 0's shapes; `knapsack-table`: networks
   of an earlier version that trusted the table alone, reported when the work folder holds them; likewise
   `netadapt-table1` / `scratch-table1`: the chain of the table before its per-call term and anchors;
   `netadapt-ladder1` / `scratch-ladder1`: the chain made with the earlier halving ladder, /4, /2, /1 keeping
   half, before the default became /8, /4, /1 keeping 60 %.)
6. `--small-holdout-chain` (an item-5 experiment, with `--holdout-images` above 1,000): is the loop's pick a
   coin toss that a finer signal would fix? Beside the latency chain, which then ranks proposals on
   `--holdout-images` (e.g. 5,000: one standard error 0.5 point instead of 1.1), a second chain from the same
   trained seed ranks on the first 1,000 of those images (a subset the seed never trained on); its shapes
   are retrained as `scratch-holdout1k` beside `scratch`.

`--parts report` builds every final network of every seed and times them interleaved in this one
process, recording wall-clock and the inference thread's CPU time (`--clock`, default cpu: on a loaded
shared machine wall-clock inflates the larger networks many times over); per seed, the width curve (accuracy \
against measured latency, linear between widths) gives the
accuracy gap at equal latency and the latency ratio at equal accuracy of each NetAdapt, MACs-guided and
scratch network; mean +- std over seeds. Writes results/benchmarks/netadapt[-TAG].csv (one row per
network and seed), netadapt[-TAG]-summary.csv and the plot docs/netadapt-vs-width.png (`--plot`).

Settings that shape item-5 experiments (`--short-steps`, `--short-lr`, `--train-resolution`,
`--schedule`) go into the work folder's name (`--tag`), so variants never mix.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnv3_search import build_model, load_spec, proposal_groups, spec_to_yaml  # noqa: E402
from mnv3_search.data import Dataset, load_dataset  # noqa: E402
from mnv3_search.errors import UserError  # noqa: E402
from mnv3_search.latency import InterleavedPolicy, make_backend, measure_interleaved, torch_threads  # noqa: E402
from mnv3_search.model.counts import spec_macs, spec_params  # noqa: E402
from mnv3_search.model.weights import read_checkpoint, save_state  # noqa: E402
from mnv3_search.netadapt import RunConfig, run_netadapt  # noqa: E402
from mnv3_search.fileio import write_csv  # noqa: E402
from mnv3_search.spec.arch import ArchSpec  # noqa: E402
from mnv3_search.spec.spaces import resolve_spec_path  # noqa: E402
from mnv3_search.train import evaluate, steps_per_epoch, train, train_epochs  # noqa: E402

OUT = Path("results/benchmarks")
PLOT = Path("docs/netadapt-vs-width.png")
SMALL_HOLDOUT_IMAGES = 1000  # item-5 experiment: the second chain ranks on the first 1,000 holdout images
SMALL_HOLDOUT = "holdout1k"  # its guide is netadapt-holdout1k, its retrained shapes scratch-holdout1k
METHODS = ("netadapt", "macs", "scratch", "macs-scratch", "knapsack", "knapsack-table", "netadapt-table1",
           "scratch-table1", "netadapt-ladder1", "scratch-ladder1", "scratch-chain0", "knapsack-chain0",
           f"netadapt-{SMALL_HOLDOUT}", f"scratch-{SMALL_HOLDOUT}")
LABELS = {"netadapt": "NetAdapt (latency table), fine-tuned", "macs": "NetAdapt guided by MACs, fine-tuned",
          "scratch": "NetAdapt (latency table), shape retrained", "macs-scratch": "guided by MACs, shape retrained",
          "knapsack": "--method knapsack (Taylor x latency table, timed), shape retrained",
          "knapsack-table": "knapsack by the table alone (earlier run), shape retrained", "width": "width multiplier",
          "netadapt-table1": "NetAdapt, earlier table (no per-call term), fine-tuned",
          "scratch-table1": "NetAdapt, earlier table (no per-call term), shape retrained",
          "netadapt-ladder1": "NetAdapt, earlier halving ladder (/4, /2, /1, keep half), fine-tuned",
          "scratch-ladder1": "NetAdapt, earlier halving ladder (/4, /2, /1, keep half), shape retrained",
          "scratch-chain0": "NetAdapt, seed 0's chain's shapes retrained on seeds 1-3 (search once)",
          "knapsack-chain0": "--method knapsack, seed 0's shapes retrained on seeds 1-3 (search once)",
          f"netadapt-{SMALL_HOLDOUT}": "NetAdapt ranking on 1,000 holdout images, fine-tuned",
          f"scratch-{SMALL_HOLDOUT}": "NetAdapt ranking on 1,000 holdout images, shape retrained"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="pilot: 1 seed, 6,000 images, 2 budgets, 3 widths")
    p.add_argument("--parts", default="train,report", help="train (per seed: latency,widths,macs,scratch,"
                   "macs-scratch,knapsack) and/or report; or single parts: latency, widths, macs, scratch, knapsack")
    p.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; quick: 0)")
    p.add_argument("--search-seeds", default=None, help="seeds whose own chains run (default: all --seeds); the "
                   "other seeds retrain the first search seed's shapes from scratch (search once, train many)")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--limit", type=int, default=None, help="training images (default 20000; quick 6000)")
    p.add_argument("--holdout-images", type=int, default=None, help="holdout carved from the training set "
                   "(default 1,000: one image is 0.1 point; quick 500)")
    p.add_argument("--small-holdout-chain", action="store_true", help="item 5: beside the latency chain (ranking "
                   "proposals on --holdout-images, e.g. 5000), a second latency chain from the same trained seed "
                   "that ranks on the first 1,000 of those images (a subset: never trained on), its shapes "
                   f"retrained as scratch-{SMALL_HOLDOUT}: does a finer selection signal find better shapes?")
    p.add_argument("--budgets", default=None, help="shares of the seed's latency in %% (default 75,50,35; quick 80,60)")
    p.add_argument("--widths", default=None, help="width multipliers (default 0.25,0.35,0.5,0.75,1.0; "
                                                 "quick 0.4,0.7,1.0)")
    p.add_argument("--schedule", default=None, help="first cut, decay, as shares of the seed's "
                   "resource (default 0.05,1.0: 13 iterations to 35 %%, smaller cuts where no group can make one; "
                   "quick 0.1,1.0)")
    p.add_argument("--seed-epochs", type=int, default=1)
    p.add_argument("--long-epochs", type=int, default=1)
    p.add_argument("--short-steps", type=int, default=32)
    p.add_argument("--short-lr", type=float, default=0.005)
    p.add_argument("--reports", type=int, default=2, help="holdout evaluations per proposal (if the library has it)")
    p.add_argument("--train-resolution", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--passes", type=int, default=60, help="interleaved timing passes in the report")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timings of every network in the report; "
                   "latency = the median share of the seed over them (shares drift less than absolute levels)")
    p.add_argument("--time-chains", choices=("first", "all", "none"), default="first", help="whose chain "
                   "iterations the report times for its guide-vs-measurement table: the first search seed's "
                   "(default), every seed's or none (only the final networks: a report in half the time)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="latency in the report: p25 of the "
                   "inference thread's CPU time (default: robust on a loaded shared machine) or of wall-clock time")
    p.add_argument("--finish-only", action="store_true", help="do not run or resume the chains: long fine-tune "
                   "the budgets they have reached so far (when time runs out)")
    p.add_argument("--tag", default=None, help="name of this variant (default: quick / full, plus changed settings)")
    p.add_argument("--plot", default=None, help=f"PNG path (default {PLOT}; quick: results/benchmarks/...-quick.png)")
    args = p.parse_args()
    quick = args.quick
    args.seeds = [int(s) for s in (args.seeds or ("0" if quick else "0,1,2")).split(",")]
    args.search_seeds = [int(s) for s in args.search_seeds.split(",")] if args.search_seeds else list(args.seeds)
    args.limit = args.limit or (6000 if quick else 20000)
    default_holdout = 500 if quick else 1000
    args.holdout_images = args.holdout_images or default_holdout
    default_schedule = "0.1,1.0" if quick else "0.05,1.0"
    args.schedule = args.schedule or default_schedule
    args.budgets = sorted((float(b) for b in (args.budgets or ("80,60" if quick else "75,50,35")).split(",")),
                          reverse=True)
    args.widths = sorted(float(w) for w in (args.widths or ("0.4,0.7,1.0" if quick else
                                                            "0.25,0.35,0.5,0.75,1.0")).split(","))
    if args.tag is None:
        changed = [f"{name}{getattr(args, name.replace('-', '_'))}" for name, default in
                   (("short-steps", 32), ("short-lr", 0.005), ("train-resolution", 32), ("schedule", default_schedule),
                    ("holdout-images", default_holdout))
                   if getattr(args, name.replace("-", "_")) != default]
        args.tag = "-".join(["quick" if quick else "full"] + [c.replace(",", "_") for c in changed])
    args.work = OUT / f"netadapt-work-{args.tag}"
    args.plot = Path(args.plot) if args.plot else (PLOT if args.tag == "full" else OUT / f"netadapt-{args.tag}.png")
    parts = set(args.parts.split(","))
    if "train" in parts:
        parts |= {"latency", "widths", "macs", "scratch", "macs-scratch", "knapsack"}
    args.parts = parts
    if args.small_holdout_chain and args.holdout_images <= SMALL_HOLDOUT_IMAGES:
        p.error("--small-holdout-chain compares against 1,000 holdout images: give --holdout-images above 1000")
    args.guides = ["netadapt"] + ([f"netadapt-{SMALL_HOLDOUT}"] if args.small_holdout_chain else [])
    return args


def log(*items: Any) -> None:
    print(time.strftime("%H:%M:%S"), *items, flush=True)


# -- settings and data --------------------------------------------------------------------------------------


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What must be equal for two processes to share a work folder."""
    keys = ("data", "limit", "holdout_images", "budgets", "widths", "schedule", "seed_epochs", "long_epochs",
            "short_steps", "short_lr", "reports", "train_resolution", "batch_size", "lr")
    return {k: getattr(args, k) for k in keys}


def check_settings(args: argparse.Namespace) -> None:
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / "settings.json"
    mine = settings(args)
    if path.exists():
        theirs = json.loads(path.read_text())
        # budgets above the chain's smallest are earlier iterations of the same chains, and every width is trained
        # on its own: both may be added to a work folder (the chains' budget, min(budgets), may not change)
        extendable = {"budgets": lambda a, b: min(a) == min(b), "widths": lambda a, b: True}
        diffs = [f"{k}: {theirs.get(k)!r} -> {v!r}" for k, v in mine.items() if theirs.get(k) != v
                 and not (k in extendable and theirs.get(k) and extendable[k](theirs[k], v))]
        if diffs:
            raise SystemExit(f"{args.work} holds a benchmark with other settings ({'; '.join(diffs)}); use --tag")
        merged = {**theirs, **{k: sorted(set(theirs[k]) | set(mine[k]), reverse=k == "budgets")
                               for k in extendable}}
        if merged != theirs:
            path.write_text(json.dumps(merged, indent=1) + "\n")
    else:
        path.write_text(json.dumps(mine, indent=1) + "\n")


_TRAIN_SIZE: dict[str, int] = {}


def holdout_fraction(args: argparse.Namespace) -> float:
    """`--holdout-images` as the fraction of the source's training set that the library carves."""
    if args.data not in _TRAIN_SIZE:
        _TRAIN_SIZE[args.data] = len(load_dataset(args.data, resolution=8, holdout=0.0).train)
    return args.holdout_images / _TRAIN_SIZE[args.data]


def dataset(args: argparse.Namespace, seed: int) -> Dataset:
    """The same splits the NetAdapt run of this seed uses (load_dataset with the run's settings)."""
    return load_dataset(args.data, resolution=args.train_resolution, holdout=holdout_fraction(args), seed=seed,
                        limit=args.limit)


def run_config(args: argparse.Namespace, seed: int, budget: str, **extra: Any) -> RunConfig:
    """A RunConfig from the stable fields; holdout and reports only where this library version has them."""
    known = {f.name for f in dataclasses.fields(RunConfig)}
    kw: dict[str, Any] = dict(spec_path="small", budget=budget, schedule=args.schedule, data=args.data,
                              train_resolution=args.train_resolution, limit=args.limit,
                              short_steps=args.short_steps, short_lr=args.short_lr, seed_epochs=args.seed_epochs,
                              long_epochs=0, lr=args.lr, seed=seed, batch_size=args.batch_size, **extra)
    for name, value in (("holdout", holdout_fraction(args)), ("reports", args.reports)):
        if name in known:
            kw[name] = value
        else:
            log(f"note: this library's RunConfig has no {name!r}; its default is used")
    try:
        return RunConfig(**kw)
    except UserError:  # a library that wants a long fine-tune: ours is done here anyway
        kw["long_epochs"] = 1
        return RunConfig(**kw)


def seed_spec(num_classes: int) -> ArchSpec:
    return load_spec(resolve_spec_path("small")).with_overrides(num_classes=num_classes).scaled()


def seed_dir(args: argparse.Namespace, seed: int) -> Path:
    return args.work / f"seed{seed}"


def net_path(args: argparse.Namespace, seed: int, name: str) -> Path:
    return seed_dir(args, seed) / "nets" / f"{name}.pt"


def save_net(args: argparse.Namespace, seed: int, name: str, spec: ArchSpec, model: torch.nn.Module,
             record: dict[str, Any]) -> None:
    path = net_path(args, seed, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state(model.state_dict(), spec, path)
    path.with_suffix(".json").write_text(json.dumps({**record, "seed": seed, "name": name}, indent=1) + "\n")
    log(f"seed {seed} {name}: test accuracy {100 * record['test_accuracy']:.2f} % after {record['total_steps']} "
        f"steps ({record['train_seconds']:.0f} s)")


def done(args: argparse.Namespace, seed: int, name: str) -> bool:
    return net_path(args, seed, name).with_suffix(".json").exists()


def on_event(seed: int, guide: str):
    def emit(kind: str, **info: Any) -> None:
        if kind == "chosen":
            log(f"seed {seed} {guide} iteration {info['iteration']}: {info['proposal']} -> resource "
                f"{info['resource']:.4g}, holdout {100 * info['holdout_accuracy']:.2f} %, {info['proposals']} "
                f"proposals ({info['pruned']} pruned), {info['wall_seconds']:.0f} s")
        elif kind in ("seed_training", "confirm", "disagreement", "calibrating", "resume", "already_finished",
                      "knapsack"):
            log(f"seed {seed} {guide} {kind} {info}")
    return emit


# -- one chain ------------------------------------------------------------------------------------------------


def budget_iterations(rows: pd.DataFrame, column: str, shares: list[float], finished: bool) -> dict[float, int]:
    """Per budget share, the first iteration that meets it; the smallest share takes the chain's end when the run
    finished (the loop stopped there after confirming by measurement). A row timed beside the seed (the loop
    times every iteration of a latency chain) is judged by its measured share, others by `column`."""
    seed_value = float(rows.loc[rows["iteration"] == 0, column].iloc[0])
    share = rows[column] / seed_value
    if "measured_latency_ms" in rows and "seed_measured_latency_ms" in rows:
        measured = rows["measured_latency_ms"] / rows["seed_measured_latency_ms"]
        share = measured.where(measured.notna(), share)
    found = {}
    for budget in shares:
        meets = rows[(share <= budget / 100) & (rows["iteration"] > 0)]
        if not meets.empty:
            found[budget] = int(meets["iteration"].min())
    if finished:
        found[min(shares)] = int(rows["iteration"].max())
    return found


def guide_column(guide: str) -> str:
    """The iterations.csv column a chain was guided by: the table's prediction for latency chains, else MACs."""
    return "predicted_latency_ms" if guide.startswith("netadapt") else "macs"


def chain_budgets(args: argparse.Namespace, folder: Path, guide: str) -> dict[float, int] | None:
    """The iteration of a chain's folder that stands for each budget (see `budget_iterations`); None before
    the chain has finished an iteration. Used by the fine-tuned and the retrained networks alike."""
    if not (folder / "iterations.csv").exists():
        return None
    rows = pd.read_csv(folder / "iterations.csv")
    return budget_iterations(rows, guide_column(guide), args.budgets, (folder / "final.yaml").exists())


def chain(args: argparse.Namespace, seed: int, guide: str) -> None:
    """One NetAdapt chain to the smallest budget, then the long fine-tune of every budget's network."""
    folder = seed_dir(args, seed) / guide
    smallest = min(args.budgets)
    if guide == "netadapt":
        config = run_config(args, seed, f"{smallest:g}%", lut=str(OUT / "netadapt-lut.json"))
    else:
        weights = seed_dir(args, seed) / "netadapt" / "seed.pt"
        waited = time.perf_counter()
        while not weights.exists():  # the latency chain (another process) trains it
            if time.perf_counter() - waited > 3600:
                log(f"seed {seed} {guide}: the latency chain's seed.pt is missing; run part latency first")
                return
            time.sleep(10)
        if guide == "macs":
            macs = spec_macs(read_checkpoint(weights)[0])
            config = run_config(args, seed, f"{math.floor(smallest / 100 * macs)}-macs", weights=str(weights))
        else:  # the same latency chain ranking on the first 1,000 images of the same permutation's holdout
            config = dataclasses.replace(
                run_config(args, seed, f"{smallest:g}%", lut=str(OUT / "netadapt-lut.json"), weights=str(weights)),
                holdout=SMALL_HOLDOUT_IMAGES)
    start = time.perf_counter()
    if not args.finish_only:
        try:
            run_netadapt(config, out=str(folder), on_event=on_event(seed, guide))
        except UserError as exc:  # budget unreachable: keep what was reached
            log(f"seed {seed} {guide}: {exc}")
        log(f"seed {seed} {guide} chain: {time.perf_counter() - start:.0f} s")
    chosen = chain_budgets(args, folder, guide)
    if chosen is None:
        log(f"seed {seed} {guide}: no iteration finished yet")
        return
    proposals = pd.read_csv(folder / "proposals.csv") if (folder / "proposals.csv").exists() else None
    ds = None
    for share, iteration in sorted(chosen.items(), reverse=True):
        name = f"{guide}-{share:g}"
        if done(args, seed, name):
            continue
        ds = ds or dataset(args, seed)
        spec, state = read_checkpoint(folder / "iterations" / f"{iteration:03d}.pt")
        model = build_model(spec)
        model.load_state_dict(state, strict=True)
        t0 = time.perf_counter()
        train_epochs(model, ds, args.long_epochs, batch_size=args.batch_size, lr=args.lr * 0.1, seed=seed)
        per_epoch = steps_per_epoch(ds, args.batch_size)
        path_steps = iteration * args.short_steps
        all_steps = int(proposals.loc[proposals["iteration"] <= iteration, "steps"].fillna(0).sum()) \
            if proposals is not None else None
        record = {"method": guide, "budget": share, "iteration": iteration, "width": None,
                  "total_steps": (args.seed_epochs + args.long_epochs) * per_epoch + path_steps,
                  "path_short_steps": path_steps, "all_short_steps": all_steps,
                  "holdout_accuracy": evaluate(model, ds, ds.holdout), "test_accuracy": evaluate(model, ds, ds.test),
                  "train_seconds": time.perf_counter() - t0}
        save_net(args, seed, name, spec, model, record)


def expected_path(args: argparse.Namespace) -> int:
    """Iterations the schedule needs to reach the smallest budget (each cut as the schedule's share of the
    seed's resource); the width multipliers get this path's training, so they need not wait for the chain.
    The report shows each network's actual path."""
    first, decay = (float(v) for v in args.schedule.split(","))
    need, cut, n = 1 - min(args.budgets) / 100, 0.0, 0
    while cut < need - 1e-9:
        cut += first * decay ** n
        n += 1
    return n


def equal_steps(args: argparse.Namespace, ds: Dataset, iterations: int) -> int:
    per_epoch = steps_per_epoch(ds, args.batch_size)
    total = (args.seed_epochs + args.long_epochs) * per_epoch + iterations * args.short_steps
    log(f"equal training: seed {args.seed_epochs} epochs x {per_epoch} steps + {iterations} iterations x "
        f"{args.short_steps} short steps + long {args.long_epochs} x {per_epoch} = {total} steps = "
        f"{total / per_epoch:.3f} epochs of {len(ds.train)} images (batch {args.batch_size})")
    return total


def from_scratch(args: argparse.Namespace, seed: int, name: str, spec: ArchSpec, steps: int, ds: Dataset,
                 extra: dict[str, Any]) -> None:
    torch.manual_seed(seed)
    model = build_model(spec)
    t0 = time.perf_counter()
    train(model, ds, steps, lr=args.lr, batch_size=args.batch_size, seed=seed)
    save_net(args, seed, name, spec, model, {
        **extra, "iteration": None, "total_steps": steps, "holdout_accuracy": evaluate(model, ds, ds.holdout),
        "test_accuracy": evaluate(model, ds, ds.test), "train_seconds": time.perf_counter() - t0})


def widths(args: argparse.Namespace, seed: int) -> None:
    iterations = expected_path(args)
    ds = dataset(args, seed)
    steps = equal_steps(args, ds, iterations)
    for width in sorted(args.widths, reverse=True):
        name = f"width-{width:.2f}"
        if not done(args, seed, name):
            spec = load_spec(resolve_spec_path("small")).with_overrides(width=width,
                                                                         num_classes=ds.num_classes).scaled()
            from_scratch(args, seed, name, spec, steps, ds, {"method": "width", "budget": None, "width": width})


def chain_folder(args: argparse.Namespace, seed: int, guide: str) -> Path:
    """The chain whose shapes seed `seed` retrains: its own, else the first search seed's."""
    own = seed_dir(args, seed) / guide
    return own if (own / "iterations.csv").exists() else seed_dir(args, args.search_seeds[0]) / guide


def scratch(args: argparse.Namespace, seed: int, guide: str = "netadapt") -> None:
    """Each budget's architecture of a chain (from its iteration checkpoint, so this can run beside the
    chain), re-initialised and trained like a width multiplier: is it the shape, or the inherited weights?"""
    folder = chain_folder(args, seed, guide)
    method = {"netadapt": "scratch", "macs": "macs-scratch"}.get(guide, guide.replace("netadapt", "scratch"))
    chosen = chain_budgets(args, folder, guide)
    if chosen is None:
        log(f"seed {seed} {method}: the {guide} chain has no iteration yet")
        return
    ds = dataset(args, seed)
    steps = equal_steps(args, ds, expected_path(args))
    for share, iteration in sorted(chosen.items(), reverse=True):
        name = f"{method}-{share:g}"
        if not done(args, seed, name):
            spec, _ = read_checkpoint(folder / "iterations" / f"{iteration:03d}.pt")
            from_scratch(args, seed, name, spec, steps, ds, {"method": method, "budget": share, "width": None,
                                                             "source_iteration": iteration,
                                                             "source_chain": str(folder)})


def knapsack_shapes(args: argparse.Namespace, search: int) -> dict[float, ArchSpec]:
    """One shape per budget from the library's `--method knapsack` (prune/knapsack.py: Taylor importance on
    seed `search`'s trained seed, a knapsack over the latency table, the shape timed beside the seed and
    corrected until the measurement meets the budget), run without a final training: seeds retrain the shapes
    from scratch like the widths. Each budget's run folder is kept, so a rerun reuses its shape."""
    weights = seed_dir(args, search) / "netadapt" / "seed.pt"
    if not weights.exists():
        raise SystemExit(f"{weights} is missing: run --parts latency for seed {search} first")
    shapes = {}
    for share in sorted(args.budgets, reverse=True):
        folder = seed_dir(args, search) / f"knapsack-{share:g}"
        if not (folder / "final.yaml").exists():
            t0 = time.perf_counter()
            config = run_config(args, search, f"{share:g}%", lut=str(OUT / "netadapt-lut.json"), weights=str(weights),
                                method="knapsack", final="fine-tune")
            result = run_netadapt(config, out=str(folder), on_event=on_event(search, f"knapsack {share:g} %"))
            log(f"seed {search} knapsack {share:g} %: measured {result.measured_latency_ms:.3f} ms vs seed "
                f"{result.seed_measured_latency_ms:.3f} ms after {result.iterations} rounds "
                f"({time.perf_counter() - t0:.0f} s)")
        shapes[share] = load_spec(folder / "final.yaml")
        log(f"seed {search} knapsack {share:g} %: {shape_change(shapes[share], seed_spec(shapes[share].num_classes))}")
    return shapes


def knapsack(args: argparse.Namespace, seed: int) -> None:
    """Each budget's knapsack shape trained from scratch like a width multiplier: a seed in `--search-seeds`
    retrains the shapes of its own search (Taylor importance from its own trained seed), the others the first
    search seed's (`knapsack-chain0` on seeds 1-3: seed 0's shapes, from the benchmark that searched once)."""
    search = seed if seed in args.search_seeds else args.search_seeds[0]
    shapes = knapsack_shapes(args, search)
    ds = dataset(args, seed)
    steps = equal_steps(args, ds, expected_path(args))
    for share, spec in sorted(shapes.items(), reverse=True):
        name = f"knapsack-{share:g}"
        if not done(args, seed, name):
            from_scratch(args, seed, name, spec, steps, ds, {"method": "knapsack", "budget": share, "width": None,
                                                             "source_search_seed": search})


# -- report ---------------------------------------------------------------------------------------------------


def time_networks(args: argparse.Namespace, specs: list[ArchSpec]) -> tuple[list[float], list[float]]:
    """Every distinct network timed interleaved in this process (ONNX Runtime, 1 thread, 224 px): the p25 of
    wall-clock time (the library's protocol) and the p25 of the inference thread's CPU time.

    With one ONNX Runtime thread the inference runs on the calling thread, so its CPU time is what the
    network costs without the time the thread waited for a core: on a shared, loaded machine wall-clock
    times of the larger networks are inflated many times over (they are preempted more often), CPU times
    are not."""
    backend = make_backend("onnxruntime", 1)
    policy = InterleavedPolicy(passes=args.passes, runs_per_pass=5, seed=0)
    cpu: list[list[float]] = [[] for _ in specs]

    def timed(run: Any, bucket: list[float]) -> Any:
        def wrapped() -> None:
            t0 = time.thread_time_ns()
            run()
            bucket.append((time.thread_time_ns() - t0) / 1e6)
        return wrapped

    with torch_threads(1):
        runners = [timed(backend.runner(build_model(s).eval(), (1, 3, s.resolution, s.resolution)), bucket)
                   for s, bucket in zip(specs, cpu)]
        measured = measure_interleaved(runners, policy)
    cpu_p25 = [float(np.percentile(b[policy.warmup_runs:], 25)) for b in cpu]
    return [m.p25_ms for m in measured], cpu_p25


def curve_accuracy(curve: pd.DataFrame, latency: float) -> float:
    """The width curve's accuracy at `latency` (linear between neighbouring widths; NaN outside the curve)."""
    x, y = curve["latency_ms"].to_numpy(), curve["test_accuracy"].to_numpy()
    if latency < x.min() or latency > x.max():
        return math.nan
    return float(np.interp(latency, x, y))


def curve_latency(curve: pd.DataFrame, accuracy: float) -> float:
    """The latency at which the width curve first reaches `accuracy` (linear between widths; NaN if never or
    already below its narrowest point)."""
    x, y = curve["latency_ms"].to_numpy(), curve["test_accuracy"].to_numpy()
    if accuracy < y[0]:
        return math.nan
    for i in range(1, len(x)):
        if y[i] >= accuracy:
            if y[i] == y[i - 1]:
                return float(x[i])
            return float(x[i - 1] + (accuracy - y[i - 1]) / (y[i] - y[i - 1]) * (x[i] - x[i - 1]))
    return math.nan


def shape_change(spec: ArchSpec, base: ArchSpec) -> str:
    """Which channel groups the network cut, as seed -> now (NetAdapt's group names)."""
    before = {g.name: g.channels for g in proposal_groups(base, 8)}
    after = {g.name: g.channels for g in proposal_groups(spec, 8)}
    return ", ".join(f"{name} {before[name]}->{after[name]}" for name in before
                     if name in after and after[name] != before[name])


def mean_std(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "n/a"
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.2f} +- {std:.2f}" + ("" if len(values) > 1 else " (1 seed)")


def report(args: argparse.Namespace) -> None:
    records = []
    for seed in args.seeds:
        for path in sorted((seed_dir(args, seed) / "nets").glob("*.json")):
            records.append(json.loads(path.read_text()))
    if not records:
        raise SystemExit(f"nothing trained in {args.work} for seeds {args.seeds}")
    frame = pd.DataFrame(records)
    specs: dict[str, ArchSpec] = {}
    keys = []
    for r in records:
        spec, _ = read_checkpoint(net_path(args, r["seed"], r["name"]))
        key = spec_to_yaml(spec)
        specs.setdefault(key, spec)
        keys.append(key)
    base = seed_spec(specs[keys[0]].num_classes)
    specs.setdefault(spec_to_yaml(base), base)
    chain_steps: list[tuple[int, str, int, float, str]] = []  # (seed, guide, iteration, predicted share, key)
    for seed in {"all": args.seeds, "first": args.search_seeds[:1], "none": []}[args.time_chains]:
        for guide in (*args.guides, "macs"):
            folder = seed_dir(args, seed) / guide
            if not (folder / "iterations.csv").exists():
                continue
            rows = pd.read_csv(folder / "iterations.csv")
            column = guide_column(guide)
            first = float(rows.loc[rows["iteration"] == 0, column].iloc[0])
            for _, row in rows[rows["iteration"] > 0].iterrows():
                spec, _ = read_checkpoint(folder / "iterations" / f"{int(row['iteration']):03d}.pt")
                key = spec_to_yaml(spec)
                specs.setdefault(key, spec)
                chain_steps.append((seed, guide, int(row["iteration"]), float(row[column]) / first, key))
    order = list(specs)
    log(f"timing {len(order)} distinct networks interleaved ({args.passes} passes x 5 runs each), "
        f"{args.repeats} times")
    base_index = order.index(spec_to_yaml(base))
    walls_r, cpus_r = [], []
    for repeat in range(args.repeats):
        w, c = time_networks(args, [specs[k] for k in order])
        walls_r.append(w)
        cpus_r.append(c)
        log(f"  timing {repeat + 1}/{args.repeats}: seed CPU-time p25 {c[base_index]:.3f} ms, "
            f"wall {w[base_index]:.3f} ms")
    # each network's share of the seed per timing, median over timings, scaled by the seed's median level
    shares = np.array(cpus_r) / np.array(cpus_r)[:, [base_index]]
    spread = (shares.max(axis=0) - shares.min(axis=0)) * 100
    print(f"  seed-relative CPU-time shares across the {args.repeats} timings: median spread "
          f"{np.median(spread):.1f} points, worst {spread.max():.1f} points; seed's absolute level "
          f"{min(c[base_index] for c in cpus_r):.3f}-{max(c[base_index] for c in cpus_r):.3f} ms")
    wall = list(np.median(np.array(walls_r), axis=0))
    cpu = list(np.median(shares, axis=0) * float(np.median([c[base_index] for c in cpus_r])))
    latencies = dict(zip(order, cpu if args.clock == "cpu" else wall))
    walls, cpus = dict(zip(order, wall)), dict(zip(order, cpu))
    seed_ms = latencies[spec_to_yaml(base)]
    log(f"seed architecture: wall-clock p25 {walls[spec_to_yaml(base)]:.3f} ms, CPU-time p25 "
        f"{cpus[spec_to_yaml(base)]:.3f} ms; latency below = {args.clock}")
    print("\nthe chains' guide vs measurement (share of the seed: the table's prediction or MACs, against wall-clock "
          "and CPU-time p25 measured here):")
    for seed, guide, iteration, share, key in chain_steps:
        print(f"  seed {seed} {guide} iteration {iteration}: guide {100 * share:.1f} %, wall-clock "
              f"{100 * walls[key] / walls[spec_to_yaml(base)]:.1f} %, "
              f"CPU time {100 * cpus[key] / cpus[spec_to_yaml(base)]:.1f} %")
    frame["latency_ms"] = [latencies[k] for k in keys]
    frame["wall_p25_ms"] = [walls[k] for k in keys]
    frame["cpu_p25_ms"] = [cpus[k] for k in keys]
    frame["latency_share"] = frame["latency_ms"] / seed_ms
    frame["macs"] = [spec_macs(specs[k]) for k in keys]
    frame["params"] = [spec_params(specs[k]) for k in keys]
    frame["width_curve_accuracy"] = math.nan
    frame["gap_points"] = math.nan
    frame["width_latency_at_equal_accuracy_ms"] = math.nan
    frame["latency_ratio"] = math.nan
    for seed in frame["seed"].unique():
        curve = frame[(frame["seed"] == seed) & (frame["method"] == "width")].sort_values("latency_ms")
        if len(curve) < 2:
            continue
        for i in frame.index[(frame["seed"] == seed) & (frame["method"] != "width")]:
            lat, acc = frame.at[i, "latency_ms"], frame.at[i, "test_accuracy"]
            at = curve_accuracy(curve, lat)
            width_ms = curve_latency(curve, acc)
            frame.at[i, "width_curve_accuracy"] = at
            frame.at[i, "gap_points"] = 100 * (acc - at)
            frame.at[i, "width_latency_at_equal_accuracy_ms"] = width_ms
            frame.at[i, "latency_ratio"] = width_ms / lat
    frame["test_accuracy_pct"] = 100 * frame["test_accuracy"]
    columns = ["method", "budget", "width", "seed", "iteration", "total_steps", "path_short_steps", "all_short_steps",
               "latency_ms", "wall_p25_ms", "cpu_p25_ms", "latency_share", "macs", "params", "holdout_accuracy",
               "test_accuracy",
               "width_curve_accuracy", "gap_points", "width_latency_at_equal_accuracy_ms", "latency_ratio",
               "train_seconds"]
    frame = frame.reindex(columns=columns + ["test_accuracy_pct"])
    suffix = "" if args.tag == "full" else f"-{args.tag}"
    write_csv(frame[columns].sort_values(["method", "budget", "width", "seed"]), OUT / f"netadapt{suffix}.csv")
    log(f"seed (width 1.0 architecture) measured {seed_ms:.3f} ms")
    print(f"\nwidth multipliers (seeds {sorted(frame['seed'].unique())}; each trained from scratch for the deepest "
          f"NetAdapt network's total steps):")
    widths_frame = frame[frame["method"] == "width"]
    for width, g in widths_frame.groupby("width"):
        print(f"  width {width:.2f}: {g['latency_ms'].mean():.3f} ms (wall {g['wall_p25_ms'].mean():.3f}) "
              f"({100 * g['latency_share'].mean():.0f} % of the "
              f"seed), {g['macs'].iloc[0] / 1e6:.1f} M MACs, test {mean_std(g['test_accuracy_pct'])} %  (n={len(g)})")
    summary = []
    print("\nper budget (mean +- std over seeds; gap = accuracy minus the width curve's at the same measured "
          "latency; ratio = width curve's latency at the same accuracy / this network's):")
    for method in METHODS:
        for budget, g in frame[frame["method"] == method].groupby("budget"):
            row = {"method": method, "budget_pct": budget, "seeds": len(g),
                   "iteration_mean": g["iteration"].mean(), "latency_ms": g["latency_ms"].mean(),
                   "latency_ms_std": g["latency_ms"].std(ddof=1), "latency_share": g["latency_share"].mean(),
                   "macs_m": g["macs"].mean() / 1e6, "test_accuracy_pct": g["test_accuracy_pct"].mean(),
                   "test_accuracy_pct_std": g["test_accuracy_pct"].std(ddof=1),
                   "width_curve_accuracy_pct": 100 * g["width_curve_accuracy"].mean(),
                   "gap_points": g["gap_points"].mean(), "gap_points_std": g["gap_points"].std(ddof=1),
                   "gap_defined": int(g["gap_points"].notna().sum()),
                   "latency_ratio": g["latency_ratio"].mean(), "latency_ratio_std": g["latency_ratio"].std(ddof=1),
                   "ratio_defined": int(g["latency_ratio"].notna().sum())}
            summary.append(row)
            print(f"  {method:8s} {budget:g} %: {mean_std(g['latency_ms'])} ms ({100 * row['latency_share']:.0f} % "
                  f"of seed), {row['macs_m']:.1f} M MACs, test {mean_std(g['test_accuracy_pct'])} %, width curve "
                  f"there {mean_std(100 * g['width_curve_accuracy'])} %, gap {mean_std(g['gap_points'])} points, "
                  f"latency ratio {mean_std(g['latency_ratio'])}x (defined for {row['ratio_defined']}/{len(g)})")
    print("\nwhat the adapted networks cut (seed -> final channels), first seed:")
    first = min(frame["seed"].unique())
    for i, r in enumerate(records):
        if r["seed"] == first and r["method"] in ("netadapt", "macs"):
            print(f"  {r['method']} {r['budget']:g} % (iteration {r['iteration']}): "
                  f"{shape_change(specs[keys[i]], base)}")
    summary_frame = pd.DataFrame(summary)
    write_csv(summary_frame, OUT / f"netadapt{suffix}-summary.csv")
    selection_signal(args)
    goal(summary_frame, args)
    plot(frame, seed_ms, args)
    log(f"wrote {OUT / f'netadapt{suffix}.csv'}, {OUT / f'netadapt{suffix}-summary.csv'}, {args.plot}")


def selection_signal(args: argparse.Namespace) -> None:
    """How well the proposals' holdout accuracy separates them. With halving only the proposals that reached
    an iteration's last rung were scored after the same number of steps, so the spread and the "within one
    image" count compare those finalists; an iteration with a single finalist was decided at an earlier rung."""
    print(f"\nselection signal (holdout {args.holdout_images} images, {SMALL_HOLDOUT} chains 1,000: one image = "
          f"{100 / args.holdout_images:.2f} / 0.10 points; compared among each iteration's finalists, the proposals "
          f"scored at its last rung):")
    for seed in args.seeds:
        for guide in (*args.guides, "macs"):
            one = 1 / (SMALL_HOLDOUT_IMAGES if guide.endswith(SMALL_HOLDOUT) else args.holdout_images)
            path = seed_dir(args, seed) / guide / "proposals.csv"
            if not path.exists():
                continue
            p = pd.read_csv(path)
            iterations = sorted(p["iteration"].unique())
            close, single, spread, counts = 0, 0, [], []
            for it in iterations:
                g = p[(p["iteration"] == it) & p["holdout_accuracy"].notna()]
                counts.append(len(p[p["iteration"] == it]))
                finalists = g[g["rung"] == g["rung"].max()]
                chosen = finalists[finalists["chosen"].astype(str) == "True"]
                if len(finalists) < 2:
                    single += 1
                    continue
                spread.append(100 * (finalists["holdout_accuracy"].max() - finalists["holdout_accuracy"].min()))
                if not chosen.empty:
                    others = finalists[finalists.index != chosen.index[0]]
                    close += bool(((others["holdout_accuracy"] - chosen["holdout_accuracy"].iloc[0]).abs()
                                   <= one + 1e-9).any())
            steps = p["steps"].fillna(0).sum()
            median = f"{np.median(spread):.1f} points (median of {len(spread)})" if spread else "n/a"
            print(f"  seed {seed} {guide}: {len(iterations)} iterations, {sum(counts)} proposals "
                  f"({np.mean(counts):.1f} per iteration), {int(steps)} short steps in all; {single} iterations with "
                  f"one finalist; holdout spread between finalists {median}; chosen within one image of another "
                  f"finalist in {close}/{len(spread)} iterations")


def goal(summary: pd.DataFrame, args: argparse.Namespace) -> None:
    """The issue's goal per budget: >= +1 point at equal latency or >= 1.3x faster at equal accuracy, and
    ahead of the MACs-guided network; for the fine-tuned networks and for the retrained shapes."""
    print("\ngoal (>= +1 point or >= 1.3x, and ahead of MACs-guided):")
    for mine, theirs in (("netadapt", "macs"), ("scratch", "macs-scratch"), ("knapsack", "macs-scratch"),
                         ("knapsack-table", "macs-scratch"), ("scratch-table1", "macs-scratch"),
                         ("scratch-ladder1", "macs-scratch"), ("scratch-chain0", "macs-scratch"),
                         ("knapsack-chain0", "macs-scratch"), (f"scratch-{SMALL_HOLDOUT}", "macs-scratch"),
                         (f"netadapt-{SMALL_HOLDOUT}", "macs")):
        for budget in args.budgets:
            na = summary[(summary["method"] == mine) & (summary["budget_pct"] == budget)]
            mc = summary[(summary["method"] == theirs) & (summary["budget_pct"] == budget)]
            if na.empty:
                print(f"  {mine} {budget:g} %: no network")
                continue
            gap, ratio = na["gap_points"].iloc[0], na["latency_ratio"].iloc[0]
            beats_width = (gap >= 1.0) or (ratio >= 1.3)
            ahead = "n/a" if mc.empty else ("yes" if gap > mc["gap_points"].iloc[0] else "no")
            print(f"  {LABELS[mine]} {budget:g} %: gap {gap:+.2f} points, ratio {ratio:.2f}x -> vs width "
                  f"{'MET' if beats_width else 'MISSED'}; ahead of {theirs} (gap "
                  f"{'n/a' if mc.empty else format(mc['gap_points'].iloc[0], '+.2f')}): {ahead}")


def plot(frame: pd.DataFrame, seed_ms: float, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7))
    w = frame[frame["method"] == "width"].groupby("width").agg(
        lat=("latency_ms", "mean"), acc=("test_accuracy_pct", "mean"), acc_std=("test_accuracy_pct", "std"))
    w = w.sort_values("lat")
    labels = dict(LABELS)
    if args.small_holdout_chain:  # the latency chain ranks on --holdout-images here: say so beside the 1,000 one's
        for method, stage in (("netadapt", "fine-tuned"), ("scratch", "shape retrained")):
            labels[method] = f"NetAdapt ranking on {args.holdout_images:,} holdout images, {stage}"
    ax.errorbar(w["lat"], w["acc"], yerr=w["acc_std"].fillna(0), fmt="-o", color="0.35", capsize=3,
                label=labels["width"])
    for width, r in w.iterrows():
        ax.annotate(f"{width:g}", (r["lat"], r["acc"]), textcoords="offset points", xytext=(4, -12), fontsize=8,
                    color="0.35")
    styles = {"netadapt": ("tab:red", "s"), "macs": ("tab:blue", "^"), "scratch": ("tab:green", "D"),
              "macs-scratch": ("tab:purple", "v"), "knapsack": ("tab:orange", "P"),
              "scratch-ladder1": ("tab:cyan", "o"), "scratch-chain0": ("tab:pink", "*"),
              "knapsack-chain0": ("tab:brown", "X"), f"scratch-{SMALL_HOLDOUT}": ("tab:olive", "h")}
    # the earlier table's networks (knapsack-table, scratch-table1) stay in the CSV and the goal lines, off the plot
    for method, (color, marker) in styles.items():
        g = frame[frame["method"] == method].groupby("budget").agg(
            lat=("latency_ms", "mean"), lat_std=("latency_ms", "std"), acc=("test_accuracy_pct", "mean"),
            acc_std=("test_accuracy_pct", "std"))
        if g.empty:
            continue
        ax.errorbar(g["lat"], g["acc"], xerr=g["lat_std"].fillna(0), yerr=g["acc_std"].fillna(0), fmt=marker,
                    color=color, capsize=3, linestyle="none", label=labels[method])
        for budget, r in g.iterrows():
            ax.annotate(f"{budget:g}%", (r["lat"], r["acc"]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8, color=color)
    n_seeds = frame["seed"].nunique()
    clock = "CPU time" if args.clock == "cpu" else "wall-clock"
    ax.set_xlabel(f"measured latency, ms ({clock} p25, ONNX Runtime, 1 thread, 224 px; seed {seed_ms:.2f} ms)")
    ax.set_ylabel(f"Fashion-MNIST test accuracy, % (mean +- std, {n_seeds} seed{'s' if n_seeds > 1 else ''})")
    ax.set_title("MobileNetV3-Small: NetAdapt vs the width multiplier at equal training steps")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2, fontsize=8)  # below: no point hidden
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse()
    check_settings(args)
    log(f"work folder {args.work}; settings {settings(args)}; seeds {args.seeds}; parts {sorted(args.parts)}")
    for seed in args.seeds:
        if "latency" in args.parts and seed in args.search_seeds:
            for guide in args.guides:
                chain(args, seed, guide)
        if "widths" in args.parts:
            widths(args, seed)
        if "macs" in args.parts and seed in args.search_seeds:
            chain(args, seed, "macs")
        if "scratch" in args.parts:
            for guide in args.guides:
                scratch(args, seed, guide)
        if "macs-scratch" in args.parts:
            scratch(args, seed, "macs")
        if "knapsack" in args.parts:
            knapsack(args, seed)
    if "report" in args.parts:
        report(args)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
