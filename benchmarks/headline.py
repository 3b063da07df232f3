"""Which shape search beats the width multiplier, by how much, and where? Paired per seed, with intervals.

    python benchmarks/headline.py --setting flat --seeds 0,1,2,3,4 --parts train    # one process per seed is fine
    python benchmarks/headline.py --setting flat --seeds 0,1,2,3,4 --parts report   # times every network together

MobileNetV3-Small on Fashion-MNIST (or four of its classes); latency at 224 px on ONNX Runtime, 1 thread. The
work folder, results/benchmarks/headline-TAG/ (TAG: the setting and any knob changed: flat-shortsteps16),
holds settings.json and per seed seedN/{seed.pt, loop/, knapsack-BUDGET/ (run folders), nets/NAME.{json,pt}}
(every trained network and its record), laid out as the exp-hybrid branch's script laid it out, so the
folders it wrote report here. Every record also goes to benchmarks/records/headline-TAG.jsonl, which is
committed: the work folder does not outlive the machine, the ledger does, so seeds trained in different
sessions report together (timing needs the specs, not the weights) and a trained network is never trained
again (`--parts ledger` adds a work folder's records the ledger lacks). Settings (`--setting`):

- flat: Fashion-MNIST, 20,000 images at 32 px, 1,040 steps per network: the curve every earlier figure sat on
  (width 0.1 -> 1.0 spans 2.7 points), on which 1.3x means little.
- steep: the steepest candidate found for the issue's steep setting (width 0.5 at least 3 points below 1.0),
  not yet one: flat's protocol on fashion-mnist-tops (Fashion-MNIST's four upper-body classes, where its
  errors are) trained at 64 px. Pilot (2026-12-07, seeds 0-2, width 1.0 minus 0.5, points [95 %]): 64 px,
  1,040 steps +2.46 [+0.13, +4.78] (3.30 / 2.62 / 1.45); at 32 px +0.94 [-0.66, +2.54] (1,040 steps), +1.04
  [-0.29, +2.38] (2,000), +1.25 (4,000, seed 0). A width 1.0 network costs ~6 min of one core at 64 px. Six
  widths x 3 seeds at 64 px: steep only between 44 and 79 % of the full network's latency (+2.4 points),
  flat below 44 % (docs/benchmarks.md#looking-for-a-steep-setting-2026-12-07).
- smoke: minutes; every part and the report on a few hundred images, to check the script, not to quote.

Per seed (`--parts train` is seed, search, retrain, widths, finetune; each result cached in the work folder,
so a killed run resumes):

- seed: the full network trained `seed_epochs` on the run's own training split (what `netadapt` trains).
- search: from that same trained seed, every method of `--methods` finds one shape per `--budgets` share of
  the seed's measured latency, each with its own channel importance (`--importance auto`: L2 for the loop,
  Taylor for the knapsack and the hybrid). The NetAdapt loop (`loop`) runs one chain to the smallest budget: a
  larger budget's shape is the chain's first iteration measured within it (the loop would have stopped there);
  so does `hybrid` (`--method hybrid`, `--methods loop,knapsack,hybrid`: the loop with the knapsack's cut of
  several groups as one more proposal per iteration). `knapsack` (`--method knapsack`) runs once per budget.
- retrain: every shape trained from scratch for `train_steps`, the same recipe and steps as every width.
- widths: `--widths` multipliers (paper semantics) trained from scratch for `train_steps`.
- finetune: the pretrained path at `--finetune-budget`: the loop's adapted weights fine-tuned
  `finetune_steps` against the same seed shrunk uniformly (every group by one fraction, L1 channel selection:
  prune/importance.py's Magnitude(1); three fractions around the budget) and the knapsack's cut of the seed
  (Taylor channels), each fine-tuned for the same steps after the seed (the adapted path's chosen short
  fine-tunes + `finetune_steps`).

`--parts report` times every distinct network of `--methods`, the widths and the fine-tune comparison
interleaved in this one process (`--repeats` timings, CPU time of the inference thread, p25; each network's
share of the seed's latency is the median over timings), fits the width curve (one non-decreasing curve over
every width and seed plus a per-seed offset: mnv3_search/report/widthcurve.py) and prints per method and
budget the paired per-seed gap (accuracy minus the seed's own width curve at the network's measured latency)
and latency ratio (the curve's latency at equal accuracy over the network's), each with a 95 % t interval,
method against method likewise, the issue's goal per budget, and the fine-tune comparison. CSV under
results/benchmarks/, the plot under docs/.
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
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnv3_search import build_model, load_spec, proposal_groups, spec_from_dict, spec_to_yaml  # noqa: E402
from mnv3_search.data import Dataset, load_dataset  # noqa: E402
from mnv3_search.fileio import write_csv  # noqa: E402
from mnv3_search.latency import (InterleavedPolicy, LatencyTable, make_backend, measure_interleaved,  # noqa: E402
                                 thread_clock_ok)
from mnv3_search.model.counts import spec_macs  # noqa: E402
from mnv3_search.model.weights import read_checkpoint, save_state  # noqa: E402
from mnv3_search.netadapt import BudgetUnreachable, RunConfig, run_netadapt  # noqa: E402
from mnv3_search.prune.groups import find_group  # noqa: E402
from mnv3_search.prune.importance import Magnitude  # noqa: E402
from mnv3_search.prune.surgery import shrink  # noqa: E402
from mnv3_search.prune.variants import uniform_variant  # noqa: E402
from mnv3_search.report.widthcurve import fit_width_curve, paired_interval, ratio_interval  # noqa: E402
from mnv3_search.spec.arch import ArchSpec  # noqa: E402
from mnv3_search.spec.spaces import resolve_spec_path  # noqa: E402
from mnv3_search.train import evaluate, refresh_bn, to_memory_format, train, train_epochs  # noqa: E402

OUT = Path("results/benchmarks")
RECORDS = Path(__file__).resolve().parent / "records"  # committed: what each trained network scored


@dataclasses.dataclass(frozen=True)
class Setting:
    """One training protocol. `train_steps` is every from-scratch network's budget (widths and shapes alike)."""

    limit: int
    train_resolution: int
    seed_epochs: int
    short_steps: int
    schedule: str
    train_steps: int
    finetune_steps: int
    data: str = "fashion-mnist"
    holdout: int = 1000
    batch_size: int = 64
    lr: float = 0.1
    short_lr: float = 0.005


FLAT = Setting(limit=20000, train_resolution=32, seed_epochs=1, short_steps=32, schedule="0.05,1.0",
               train_steps=1040, finetune_steps=312)
SETTINGS = {
    # the curve every earlier figure sat on: width 0.1 -> 1.0 spans 2.7 points
    "flat": FLAT,
    # a candidate steep curve (module doc: its pilot): flat on the four classes Fashion-MNIST confuses, at 64 px
    "steep": dataclasses.replace(FLAT, data="fashion-mnist-tops", train_resolution=64),
    # minutes: every part and the report on a few hundred images, to check the script, not to quote
    "smoke": Setting(limit=600, train_resolution=32, seed_epochs=1, short_steps=8, schedule="0.1,1.0",
                     train_steps=30, finetune_steps=10, holdout=200),
}
# iterative: one chain per seed to the smallest budget, by `--method` (hybrid: the loop with the knapsack's cut of
# several groups as one more proposal per iteration)
CHAINS = {"loop": "netadapt", "hybrid": "hybrid"}
ONE_SHOT = ("knapsack",)  # one run per budget
FINETUNE_METHODS = ("loop-ft", "knapsack-ft", "uniform-ft")  # the fine-tune comparison's records (finetune)
# a setting's fields a flag overrides (each joins the tag)
KNOBS = ("seed_epochs", "short_steps", "schedule", "train_steps", "limit", "data", "train_resolution")
STEP = 8  # channel step of every cut (RunConfig.step's default)
UNIFORM_SHARES = (-0.08, 0.0, 0.08)  # fine-tune mode: uniform shrinks predicted at the budget and either side


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="flat")
    p.add_argument("--parts", default="train",
                   help="train (= seed,search,retrain,widths,finetune), ledger and/or report")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--methods", default="loop,knapsack", help=f"of {', '.join([*CHAINS, *ONE_SHOT])}")
    p.add_argument("--budgets", default="60,50,40,35", help="shares of the seed's measured latency, %%")
    p.add_argument("--widths", default="0.25,0.35,0.45,0.55,0.65,0.75,0.85,1.0")
    p.add_argument("--finetune-budget", type=float, default=50.0)
    for knob in ("seed-epochs", "short-steps", "train-steps", "limit", "train-resolution"):
        p.add_argument(f"--{knob}", type=int, default=None, help="override the setting's (joins the tag)")
    for knob in ("schedule", "data"):
        p.add_argument(f"--{knob}", default=None, help="override the setting's (joins the tag)")
    p.add_argument("--passes", type=int, default=60, help="interleaved timing passes (x 5 runs) per timing")
    p.add_argument("--repeats", type=int, default=3, help="timings of every network in the report")
    p.add_argument("--plot", default=None, help="PNG (default docs/headline-SETTING[-TAG].png)")
    args = p.parse_args()
    changed = {k: getattr(args, k) for k in KNOBS if getattr(args, k) is not None}
    args.setting_name = args.setting
    args.setting = dataclasses.replace(SETTINGS[args.setting], **changed)
    args.tag = "-".join([args.setting_name] + [f"{k.replace('_', '')}{str(v).replace(',', '_')}"
                                               for k, v in sorted(changed.items())])
    args.work = OUT / f"headline-{args.tag}"
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.methods = args.methods.split(",")
    unknown = [m for m in args.methods if m not in CHAINS and m not in ONE_SHOT]
    if unknown:
        p.error(f"unknown methods {unknown}")
    args.budgets = sorted((float(b) for b in args.budgets.split(",")), reverse=True)
    args.widths = sorted(float(w) for w in args.widths.split(","))
    parts = set(args.parts.split(","))
    if "train" in parts:
        parts |= {"seed", "search", "retrain", "widths", "finetune"}
    args.parts = parts
    args.plot = Path(args.plot) if args.plot else Path("docs") / f"headline-{args.tag}.png"
    return args


def log(*items: Any) -> None:
    print(time.strftime("%H:%M:%S"), *items, flush=True)


# -- folders and records -------------------------------------------------------------------------------------


def seed_dir(args: argparse.Namespace, seed: int) -> Path:
    return args.work / f"seed{seed}"


def net_json(args: argparse.Namespace, seed: int, name: str) -> Path:
    return seed_dir(args, seed) / "nets" / f"{name}.json"


def ledger_path(args: argparse.Namespace) -> Path:
    """The committed record of every network this setting has trained, one JSON line each. The work folder
    (checkpoints, run folders) is not committed and does not outlive the machine; the ledger does, so seeds
    trained in different sessions report together (the report times specs, it needs no weights)."""
    return RECORDS / f"headline-{args.tag}.jsonl"


def ledger(args: argparse.Namespace) -> dict[tuple[int, str], dict[str, Any]]:
    """(seed, name) -> record, from the ledger lines made under this setting (a setting redefined since keeps
    its old lines, which no longer count); a name recorded twice keeps its last line."""
    path = ledger_path(args)
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    mine = dataclasses.asdict(args.setting)
    return {(int(r["seed"]), r["name"]): r for r in records if r.get("setting") == mine}


def recorded(args: argparse.Namespace, seed: int, name: str) -> bool:
    """Trained already, in this work folder or in a session whose ledger was committed."""
    return net_json(args, seed, name).exists() or (seed, name) in ledger(args)


def fill_ledger(args: argparse.Namespace) -> None:
    """Append the work folder's records the ledger lacks (a folder trained before the ledger existed)."""
    have = ledger(args)
    missing = [p for s in args.seeds for p in sorted((seed_dir(args, s) / "nets").glob("*.json"))
               if (s, p.stem) not in have]
    append_ledger(args, [json.loads(p.read_text()) for p in missing])
    log(f"ledger {ledger_path(args)}: {len(missing)} records added")


def append_ledger(args: argparse.Namespace, records: list[dict[str, Any]]) -> None:
    """One line per record, with the setting it was trained under (one write per line: appends from two
    processes do not mix)."""
    if not records:
        return
    ledger_path(args).parent.mkdir(parents=True, exist_ok=True)
    with ledger_path(args).open("a") as out:
        for record in records:
            out.write(json.dumps({**record, "setting": dataclasses.asdict(args.setting)}) + "\n")


def save_net(args: argparse.Namespace, seed: int, name: str, spec: ArchSpec, model: torch.nn.Module,
             record: dict[str, Any]) -> None:
    path = net_json(args, seed, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state(to_memory_format(model, torch.contiguous_format).state_dict(), spec, path.with_suffix(".pt"))
    full = {**record, "seed": seed, "name": name, "spec": spec_to_yaml(spec)}
    path.write_text(json.dumps(full, indent=1) + "\n")
    append_ledger(args, [full])
    log(f"seed {seed} {name}: test {100 * record['test_accuracy']:.2f} % after {record['steps']} steps "
        f"({record['train_seconds']:.0f} s)")


def check_settings(args: argparse.Namespace) -> None:
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / "settings.json"
    mine = dataclasses.asdict(args.setting)
    if path.exists() and json.loads(path.read_text()) != mine:
        raise SystemExit(f"{args.work} holds a benchmark with other settings: {path.read_text()}")
    path.write_text(json.dumps(mine, indent=1) + "\n")


def dataset(args: argparse.Namespace, seed: int) -> Dataset:
    """The splits a `netadapt` run with this seed uses (holdout carved by the seed, then the limit)."""
    s = args.setting
    return load_dataset(s.data, resolution=s.train_resolution, holdout=s.holdout, seed=seed, limit=s.limit)


def small_spec(num_classes: int, width: float = 1.0) -> ArchSpec:
    """MobileNetV3-Small at `width` (paper semantics): the seed at 1.0, the width curve's networks below."""
    return load_spec(resolve_spec_path("small")).with_overrides(width=width, num_classes=num_classes).scaled()


def base_spec(ds: Dataset, width: float = 1.0) -> ArchSpec:
    return small_spec(ds.num_classes, width)


def lut_path(args: argparse.Namespace) -> Path:
    """The latency table of every run of the data's class count: a table keeps one calibration per seed name,
    so runs of 10 and 4 classes (Small's seed either way) sharing one would calibrate it again in turn."""
    data = args.setting.data
    return OUT / ("headline-lut.json" if data == "fashion-mnist" else f"headline-lut-{data}.json")


def run_config(args: argparse.Namespace, seed: int, budget: str, **extra: Any) -> RunConfig:
    s = args.setting
    return RunConfig("small", budget, schedule=s.schedule, data=s.data, train_resolution=s.train_resolution,
                     limit=s.limit, holdout=s.holdout, batch_size=s.batch_size, short_steps=s.short_steps,
                     short_lr=s.short_lr, seed_epochs=s.seed_epochs, long_epochs=0, lr=s.lr, seed=seed,
                     weights=str(seed_dir(args, seed) / "seed.pt"), final="fine-tune",
                     lut=str(lut_path(args)), **extra)


def on_event(seed: int, what: str):
    def emit(kind: str, **info: Any) -> None:
        if kind == "chosen":
            log(f"seed {seed} {what} iteration {info['iteration']}: {info['proposal']}, holdout "
                f"{100 * info['holdout_accuracy']:.2f} %, {info['proposals']} proposals, {info['wall_seconds']:.0f} s")
        elif kind in ("confirm", "knapsack", "disagreement"):
            log(f"seed {seed} {what} {kind} {info}")
    return emit


# -- training parts ------------------------------------------------------------------------------------------


def train_seed(args: argparse.Namespace, seed: int) -> None:
    """The seed network every method of this seed starts from, trained as `netadapt` trains it."""
    path = seed_dir(args, seed) / "seed.pt"
    if path.exists():
        return
    ds = dataset(args, seed)
    torch.manual_seed(seed)
    model = to_memory_format(build_model(base_spec(ds)), torch.channels_last)
    t0 = time.perf_counter()
    train_epochs(model, ds, args.setting.seed_epochs, batch_size=args.setting.batch_size, lr=args.setting.lr,
                 seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state({k: v.contiguous() for k, v in model.state_dict().items()}, base_spec(ds), path)
    log(f"seed {seed}: seed network trained in {time.perf_counter() - t0:.0f} s, test "
        f"{100 * evaluate(model, ds, ds.test):.2f} %")


def chain_iterations(folder: Path, budgets: list[float]) -> dict[float, int]:
    """Per budget, the chain's first iteration whose latency measured beside the seed is within it; the
    smallest budget takes the chain's end once the run finished (it stopped there on a measurement)."""
    path = folder / "iterations.csv"
    if not path.exists():
        return {}
    rows = pd.read_csv(path)
    share = rows["measured_latency_ms"] / rows["seed_measured_latency_ms"]
    found = {}
    for budget in budgets:
        meets = rows[(share <= budget / 100) & (rows["iteration"] > 0)]
        if not meets.empty:
            found[budget] = int(meets["iteration"].min())
    if (folder / "final.yaml").exists():
        found[min(budgets)] = int(rows["iteration"].max())
    return found


def search(args: argparse.Namespace, seed: int) -> None:
    for method in args.methods:
        t0 = time.perf_counter()
        if method in CHAINS:
            folder = seed_dir(args, seed) / method
            if not (folder / "final.yaml").exists():
                config = run_config(args, seed, f"{min(args.budgets):g}%", method=CHAINS[method])
                try:
                    run_netadapt(config, out=str(folder), on_event=on_event(seed, method))
                except BudgetUnreachable as exc:  # keep what the chain reached
                    log(f"seed {seed} {method}: {exc}")
                log(f"seed {seed} {method} chain: {time.perf_counter() - t0:.0f} s")
            continue
        for budget in args.budgets:
            t0 = time.perf_counter()
            folder = seed_dir(args, seed) / f"{method}-{budget:g}"
            if not (folder / "final.yaml").exists():
                config = run_config(args, seed, f"{budget:g}%", method=method)
                try:
                    run_netadapt(config, out=str(folder), on_event=on_event(seed, f"{method} {budget:g} %"))
                except BudgetUnreachable as exc:
                    log(f"seed {seed} {method} {budget:g} %: {exc}")
                log(f"seed {seed} {method} {budget:g} %: {time.perf_counter() - t0:.0f} s")


def shapes(args: argparse.Namespace, seed: int) -> dict[tuple[str, float], tuple[ArchSpec, Path, int]]:
    """(method, budget) -> (shape, its checkpoint as the search left it, chain iteration or 0)."""
    found = {}
    for method in args.methods:
        if method in CHAINS:
            folder = seed_dir(args, seed) / method
            for budget, iteration in chain_iterations(folder, args.budgets).items():
                path = folder / "iterations" / f"{iteration:03d}.pt"
                found[(method, budget)] = (read_checkpoint(path)[0], path, iteration)
        else:
            for budget in args.budgets:
                path = seed_dir(args, seed) / f"{method}-{budget:g}" / "final.pt"
                if path.exists():
                    found[(method, budget)] = (read_checkpoint(path)[0], path, 0)
    return found


def from_scratch(args: argparse.Namespace, seed: int, name: str, spec: ArchSpec, ds: Dataset,
                 record: dict[str, Any]) -> None:
    """Trained from a fresh initialisation exactly as every width is: the shape alone is compared."""
    torch.manual_seed(seed)
    model = to_memory_format(build_model(spec), torch.channels_last)
    t0 = time.perf_counter()
    steps = args.setting.train_steps
    train(model, ds, steps, lr=args.setting.lr, batch_size=args.setting.batch_size, seed=seed)
    save_net(args, seed, name, spec, model, {**record, "steps": steps, "mode": "retrain",
                                             "test_accuracy": evaluate(model, ds, ds.test),
                                             "train_seconds": time.perf_counter() - t0})


def retrain(args: argparse.Namespace, seed: int) -> None:
    ds = None
    for (method, budget), (spec, _, iteration) in sorted(shapes(args, seed).items()):
        name = f"{method}-{budget:g}"
        if not recorded(args, seed, name):
            ds = ds or dataset(args, seed)
            from_scratch(args, seed, name, spec, ds, {"method": method, "budget": budget, "iteration": iteration})


def widths(args: argparse.Namespace, seed: int) -> None:
    ds = None
    for width in sorted(args.widths, reverse=True):
        name = f"width-{width:.2f}"
        if not recorded(args, seed, name):
            ds = ds or dataset(args, seed)
            from_scratch(args, seed, name, base_spec(ds, width), ds, {"method": "width", "width": width})


# -- the pretrained path ---------------------------------------------------------------------------------------


def uniform_shrink(seed_spec: ArchSpec, state: dict[str, torch.Tensor], fraction: float
                   ) -> tuple[ArchSpec, dict[str, torch.Tensor]]:
    """Every group cut to the allowed width nearest `fraction` of its own (`uniform_variant`), keeping the
    channels whose producing filters have the largest L1 norm (Magnitude(1), summed over a coupled set's
    producers): the uniform baseline AMC and MetaPruning compare with."""
    shape = uniform_variant(seed_spec, fraction, STEP)
    l1 = Magnitude(1)
    spec, sd = seed_spec, dict(state)
    for seed_group in proposal_groups(seed_spec, STEP):
        keep = find_group(shape, seed_group.name, STEP).channels
        group = find_group(spec, seed_group.name, STEP)
        if keep != group.channels:
            spec, sd = shrink(spec, sd, group, keep, STEP, l1.channel_scores(spec, sd, group))
    return spec, sd


def fine_tuned(args: argparse.Namespace, seed: int, name: str, spec: ArchSpec, state: dict[str, torch.Tensor],
               steps: int, ds: Dataset, record: dict[str, Any], refresh: bool) -> None:
    """`steps` of the library's final fine-tune recipe (cosine from lr/10), after a BN refresh for a fresh cut."""
    model = to_memory_format(build_model(spec), torch.channels_last)
    model.load_state_dict(state, strict=True)
    if refresh:
        refresh_bn(model, ds, num_batches=10, seed=seed)
    t0 = time.perf_counter()
    train(model, ds, steps, lr=args.setting.lr * 0.1, batch_size=args.setting.batch_size, seed=seed)
    save_net(args, seed, name, spec, model, {**record, "steps": steps, "mode": "fine-tune",
                                             "test_accuracy": evaluate(model, ds, ds.test),
                                             "train_seconds": time.perf_counter() - t0})


def uniform_fractions(args: argparse.Namespace, seed_spec: ArchSpec) -> list[float]:
    """Fractions whose uniform shrink the latency table puts nearest the budget and either side of it."""
    # the runs' table (they calibrated it on this seed): the entries it lacks are timed now
    table = LatencyTable.open(lut_path(args), make_backend("onnxruntime", 1))
    seed_ms = table.predict(seed_spec).calibrated_ms
    grid = [round(float(f), 3) for f in np.arange(0.3, 0.96, 0.025)]
    share = {f: table.predict(uniform_variant(seed_spec, f, STEP)).calibrated_ms / seed_ms for f in grid}
    wanted = [args.finetune_budget / 100 + d for d in UNIFORM_SHARES]
    return sorted({min(grid, key=lambda f: abs(share[f] - w)) for w in wanted})


def finetune(args: argparse.Namespace, seed: int) -> None:
    budget = args.finetune_budget
    found = shapes(args, seed)
    if ("loop", budget) not in found:
        log(f"seed {seed}: no loop network at {budget:g} % yet; finetune skipped")
        return
    ds = dataset(args, seed)
    seed_spec, seed_state = read_checkpoint(seed_dir(args, seed) / "seed.pt")
    spec, path, iteration = found[("loop", budget)]
    path_steps = iteration * args.setting.short_steps  # the chosen proposals' short fine-tunes along the path
    steps = args.setting.finetune_steps
    if not recorded(args, seed, f"loop-ft-{budget:g}"):
        fine_tuned(args, seed, f"loop-ft-{budget:g}", spec, read_checkpoint(path)[1], steps, ds,
                   {"method": "loop-ft", "budget": budget, "iteration": iteration}, refresh=False)
    total = steps + path_steps
    if ("knapsack", budget) in found and not recorded(args, seed, f"knapsack-ft-{budget:g}"):
        kspec, kpath, _ = found[("knapsack", budget)]
        fine_tuned(args, seed, f"knapsack-ft-{budget:g}", kspec, read_checkpoint(kpath)[1], total, ds,
                   {"method": "knapsack-ft", "budget": budget}, refresh=True)
    for fraction in uniform_fractions(args, seed_spec):
        name = f"uniform-ft-{fraction:.3f}"
        if not recorded(args, seed, name):
            uspec, ustate = uniform_shrink(seed_spec, seed_state, fraction)
            fine_tuned(args, seed, name, uspec, ustate, total, ds,
                       {"method": "uniform-ft", "budget": budget, "fraction": fraction}, refresh=True)


# -- report --------------------------------------------------------------------------------------------------


def time_networks(args: argparse.Namespace, specs: list[ArchSpec]) -> list[float]:
    """p25 of the inference thread's CPU time per network, all timed interleaved (ONNX Runtime, 1 thread):
    on a shared machine wall-clock inflates the larger networks (preempted more often), CPU time does not."""
    backend = make_backend("onnxruntime", 1)
    if not thread_clock_ok(backend):
        raise SystemExit("ONNX Runtime does not infer on the calling thread here: its CPU time is not the latency")
    policy = InterleavedPolicy(passes=args.passes, runs_per_pass=5, seed=0, clock="thread")
    runners = [backend.runner(build_model(s).eval(), (1, 3, s.resolution, s.resolution)) for s in specs]
    return [m.p25_ms for m in measure_interleaved(runners, policy)]


def latency_shares(args: argparse.Namespace, frame: pd.DataFrame) -> tuple[pd.Series, str]:
    """Each network's latency as a share of the full network's, median over `--repeats` interleaved timings."""
    specs = {y: load_spec_text(y) for y in frame["spec"].unique()}
    full = spec_to_yaml(full_spec({s.num_classes for s in specs.values()}))
    specs.setdefault(full, load_spec_text(full))
    order = list(specs)
    log(f"timing {len(order)} distinct networks interleaved, {args.repeats} times")
    timings = []
    for repeat in range(args.repeats):
        timings.append(time_networks(args, [specs[k] for k in order]))
        log(f"  timing {repeat + 1}: full network {timings[-1][order.index(full)]:.3f} ms (CPU time p25)")
    t = np.array(timings)
    shares = t / t[:, [order.index(full)]]
    spread = (shares.max(axis=0) - shares.min(axis=0)) * 100
    level = t[:, order.index(full)]
    note = (f"shares' spread over {args.repeats} timings: median {np.median(spread):.1f} points, worst "
            f"{spread.max():.1f}; full network {level.min():.3f}-{level.max():.3f} ms (drift "
            f"{100 * (level.max() / level.min() - 1):.0f} %)")
    share = dict(zip(order, np.median(shares, axis=0)))
    return frame["spec"].map(share), note


def load_spec_text(text: str) -> ArchSpec:
    return spec_from_dict(yaml.safe_load(text), "<record>")


def full_spec(num_classes: set[int]) -> ArchSpec:
    """The full network the shares are of: the seed's shape (width 1.0) for the records' class count, which
    the data decides (10 for Fashion-MNIST, 4 for fashion-mnist-tops)."""
    if len(num_classes) != 1:
        raise SystemExit(f"the networks recorded disagree on the class count: {sorted(num_classes)}")
    return small_spec(num_classes.pop())


def report(args: argparse.Namespace) -> None:
    found = {k: r for k, r in ledger(args).items() if k[0] in args.seeds}
    for s in args.seeds:  # the work folder's own files win over the ledger (a ledger may lag a copied folder)
        for p in sorted((seed_dir(args, s) / "nets").glob("*.json")):
            r = json.loads(p.read_text())
            found[(int(r["seed"]), r["name"])] = r
    records = [found[k] for k in sorted(found)]
    if not records:
        raise SystemExit(f"nothing trained in {args.work}")
    frame = pd.DataFrame(records)
    # a work folder may hold other methods' networks than --methods names: left out, not timed
    wanted = frame["method"].isin([*args.methods, "width", *FINETUNE_METHODS])
    if not wanted.all():
        left = frame.loc[~wanted, "method"].value_counts()
        log("left out (not in --methods): " + ", ".join(f"{n} {m} networks" for m, n in left.items()))
        frame = frame[wanted].reset_index(drop=True)
    frame["share"], timing_note = latency_shares(args, frame)
    frame["accuracy"] = 100 * frame["test_accuracy"]
    widths_ = frame[frame["method"] == "width"]
    curve = fit_width_curve([(int(r.seed), float(r.share), float(r.accuracy)) for r in widths_.itertuples()])
    frame["curve_accuracy"] = [curve.accuracy_at(r.share, int(r.seed)) for r in frame.itertuples()]
    frame["gap"] = frame["accuracy"] - frame["curve_accuracy"]
    top = float(curve.latency[-1])
    frame["ratio"] = [curve.latency_at(r.accuracy, int(r.seed)) / r.share for r in frame.itertuples()]
    above = frame["accuracy"] > [curve.accuracy[-1] + curve.offsets.get(int(s), 0.0) for s in frame["seed"]]
    # above the whole curve: at least as fast as the full network's latency over this one's (a lower bound)
    frame.loc[above, "ratio"] = top / frame.loc[above, "share"]
    frame["ratio_censored"] = above
    frame["macs"] = [spec_macs(load_spec_text(y)) for y in frame["spec"]]
    suffix = args.tag
    columns = ["method", "budget", "width", "fraction", "seed", "mode", "iteration", "steps", "share", "macs",
               "accuracy", "curve_accuracy", "gap", "ratio", "ratio_censored", "train_seconds"]
    frame = frame.reindex(columns=columns + ["spec"])
    write_csv(frame[columns].sort_values(["method", "budget", "seed"]), OUT / f"headline-{suffix}.csv")
    print(f"\nsetting {args.tag}: {dataclasses.asdict(args.setting)}; seeds {args.seeds}")
    print(f"latency: {timing_note}")
    print("\nwidth curve (fitted, the average seed): " + ", ".join(
        f"{100 * x:.0f} % -> {y:.2f}" for x, y in zip(curve.latency, curve.accuracy)))
    print("seed offsets: " + ", ".join(f"{s}: {v:+.2f}" for s, v in sorted(curve.offsets.items())))
    for width, g in widths_.groupby("width"):
        print(f"  width {width:.2f}: {100 * g['share'].iloc[0]:.1f} % of the full network, "
              f"{g['accuracy'].mean():.2f} +- {g['accuracy'].std(ddof=1):.2f} % (n={len(g)})")
    summary = []
    retrained = frame[(frame["mode"] == "retrain") & (frame["method"] != "width")]
    print("\nper method and budget (retrained shapes; gap: points over the seed's own width curve at the measured "
          "latency; ratio (x): the curve's latency at equal accuracy / the network's; mean [95 % interval] over "
          "seeds):")
    for (method, budget), g in retrained.groupby(["method", "budget"]):
        gap, ratio = paired_interval(g["gap"].tolist()), ratio_interval(g["ratio"].tolist())
        met = (gap.mean >= 1.0 or ratio.mean >= 1.3) and gap.low > 0
        summary.append({"method": method, "budget": budget, "seeds": len(g), "share": g["share"].mean(),
                        "accuracy": g["accuracy"].mean(), "gap": gap.mean, "gap_low": gap.low, "gap_high": gap.high,
                        "ratio": ratio.mean, "ratio_low": ratio.low, "ratio_high": ratio.high,
                        "censored": int(g["ratio_censored"].sum()), "goal_met": met})
        censored = int(g["ratio_censored"].sum())
        bound = f" ({censored} above the whole curve: lower bounds)" if censored else ""
        print(f"  {method:9s} {budget:4g} %: measured {100 * g['share'].mean():.1f} % ({100 * g['share'].min():.1f}-"
              f"{100 * g['share'].max():.1f}), {g['accuracy'].mean():.2f} %, gap {gap.text()} points, ratio "
              f"{ratio.text('.2f')}{bound} -> goal {'MET' if met else 'missed'}")
    print("\nmethod against method (paired per seed: difference of gaps, points):")
    methods = sorted(retrained["method"].unique())
    for budget in args.budgets:
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                pa = retrained[(retrained["method"] == a) & (retrained["budget"] == budget)].set_index("seed")["gap"]
                pb = retrained[(retrained["method"] == b) & (retrained["budget"] == budget)].set_index("seed")["gap"]
                both = pa.index.intersection(pb.index)
                print(f"  {budget:4g} %: {a} - {b}: {paired_interval((pa[both] - pb[both]).tolist()).text()}")
    finetune_report(frame, args)
    write_csv(pd.DataFrame(summary), OUT / f"headline-{suffix}-summary.csv")
    plot(frame, curve, args)
    log(f"wrote {OUT / f'headline-{suffix}.csv'}, {OUT / f'headline-{suffix}-summary.csv'}, {args.plot}")


def finetune_report(frame: pd.DataFrame, args: argparse.Namespace) -> None:
    """The adapted (and knapsack-cut) fine-tuned networks against the same seed shrunk uniformly and fine-tuned
    for the same steps: per seed, the uniform shrinks' line (linear between fractions) at the network's latency."""
    ft = frame[frame["mode"] == "fine-tune"]
    if ft.empty:
        return
    print(f"\nfine-tune mode at {args.finetune_budget:g} % (points over the seed's uniform shrinks at equal "
          "latency, paired per seed):")
    for method in ("loop-ft", "knapsack-ft"):
        diffs, shares = [], []
        for seed, g in ft.groupby("seed"):
            uniform = g[g["method"] == "uniform-ft"].sort_values("share")
            mine = g[g["method"] == method]
            if len(uniform) < 2 or mine.empty:
                continue
            x, y = uniform["share"].to_numpy(), uniform["accuracy"].to_numpy()
            at = float(np.interp(mine["share"].iloc[0], x, y, left=math.nan, right=math.nan))
            diffs.append(mine["accuracy"].iloc[0] - at)
            shares.append(mine["share"].iloc[0])
        if diffs:
            print(f"  {method}: {paired_interval(diffs).text()} points at {100 * np.mean(shares):.1f} % "
                  f"(uniform fractions measured {100 * ft[ft['method'] == 'uniform-ft']['share'].min():.1f}-"
                  f"{100 * ft[ft['method'] == 'uniform-ft']['share'].max():.1f} %)")


def plot(frame: pd.DataFrame, curve: Any, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    w = frame[frame["method"] == "width"]
    ax.scatter(100 * w["share"], w["accuracy"], s=10, color="0.6", label="width multiplier (each seed)")
    ax.plot(100 * curve.latency, curve.accuracy, "-", color="0.3", label="width curve (monotone fit, mean seed)")
    colors = {"loop": "tab:red", "knapsack": "tab:orange", "hybrid": "tab:purple"}
    for method, g in frame[(frame["mode"] == "retrain") & (frame["method"] != "width")].groupby("method"):
        agg = g.groupby("budget").agg(x=("share", "mean"), y=("accuracy", "mean"), ye=("accuracy", "std"))
        ax.errorbar(100 * agg["x"], agg["y"], yerr=agg["ye"].fillna(0), fmt="o", capsize=3,
                    color=colors.get(method), label=f"{method}, shape retrained (mean +- std)")
    ax.set_xlabel("latency, % of the full network (ONNX Runtime, 1 thread, 224 px, measured together)")
    ax.set_ylabel(f"{args.setting.data} test accuracy, % ({frame['seed'].nunique()} seeds)")
    ax.set_title(f"MobileNetV3-Small, setting {args.tag}: shape search vs width multiplier, equal training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    check_settings(args)
    log(f"work folder {args.work}; seeds {args.seeds}; methods {args.methods}; parts {sorted(args.parts)}")
    for seed in args.seeds:
        if "seed" in args.parts:
            train_seed(args, seed)
        if "search" in args.parts:
            search(args, seed)
        if "retrain" in args.parts:
            retrain(args, seed)
        if "widths" in args.parts:
            widths(args, seed)
        if "finetune" in args.parts:
            finetune(args, seed)
    if "ledger" in args.parts:
        fill_ledger(args)
    if "report" in args.parts:
        report(args)


if __name__ == "__main__":
    main()
