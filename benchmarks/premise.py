"""NetAdapt's premise, measured: does a network adapted on its own target beat one adapted on another there?

    .venv/bin/python benchmarks/premise.py [--targets onnxruntime,onnxruntime:int8,openvino] [--seeds 0,1,2]
                                           [--budget 50] [--parts search,transfer,time] [--out results/benchmarks]

Per seed, one Small seed network is trained once (the first target's run trains it; the others start from its
seed.pt), then `--method knapsack` adapts it to `--budget` % of the seed's latency on every target with that
target's own latency table (one table per target, built as the runs need it). The knapsack keeps the same
channel importance (Taylor, from the same seed) on every target, so the shapes differ only by the latency each
target prices. Every adapted network is fine-tuned alike (`--long-epochs`) and scored on the test split.

`transfer` adapts each seed once more on the first target (X), for the second (Y), as a user without Y's table
would: to the budget on X that lands on Y's budget, found by timing each result on Y and scaling X's budget by
the miss (at most TRANSFER_ROUNDS adaptations). That network meets Y's budget about as Y's own does, so on
Y the two compare at (about) equal latency: the premise's accuracy side.

`time` then times the seed and every adapted network on every target, interleaved in this one process
(`--repeats` timings; p25 of each network over the seed's, the median over timings). The premise holds on a
target Y where networks adapted on Y sit lower, as a share of the seed on Y, than those adapted elsewhere at
the same budget, at equal accuracy: printed per pair as the paired per-seed difference with a 95 % interval,
beside the FP32 test accuracy of each. Rows go to OUT/premise.csv, the summary to OUT/premise.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnv3_search.errors import UserError  # noqa: E402
from mnv3_search.fileio import atomic_write_text, write_csv  # noqa: E402
from mnv3_search.latency import InterleavedPolicy, Runner, make_backend, measure_interleaved  # noqa: E402
from mnv3_search.model.build import build_model  # noqa: E402
from mnv3_search.model.weights import read_checkpoint  # noqa: E402
from mnv3_search.netadapt import RunConfig, run_netadapt  # noqa: E402
from mnv3_search.report.widthcurve import paired_interval  # noqa: E402
from mnv3_search.spec.arch import ArchSpec  # noqa: E402


TRANSFER_ROUNDS = 3  # adaptations on X at most, each budget scaled by the last one's miss on Y
TRANSFER_TOLERANCE = 0.02  # a share on Y within 2 % of the budget is close enough (timing holds ratios to 1-2 %)


def log(*items: object) -> None:
    print(time.strftime("%H:%M:%S"), *items, flush=True)


def split_target(target: str) -> tuple[str, str]:
    name, _, precision = target.partition(":")
    return name, precision or "fp32"


def label(target: str) -> str:
    name, precision = split_target(target)
    return f"{name}-{precision}"


def run_folder(args: argparse.Namespace, seed: int, target: str) -> Path:
    return args.out / f"seed{seed}" / label(target)


def knapsack_config(args: argparse.Namespace, seed: int, target: str, budget: str,
                    weights: str | None) -> RunConfig:
    """The knapsack run on `target` with its own table: every run of this benchmark differs only in these."""
    backend, precision = split_target(target)
    return RunConfig(args.model, budget, method="knapsack", data=args.data, limit=args.limit,
                     seed_epochs=args.seed_epochs, long_epochs=args.long_epochs, final="fine-tune", weights=weights,
                     backend=backend, precision=precision, seed=seed, lut=str(args.out / f"lut-{label(target)}.json"))


def runners_on(target: str, specs: list[ArchSpec]) -> list[Runner]:
    """One runner per network on `target` (1 thread, batch 1, each spec's resolution)."""
    name, precision = split_target(target)
    backend = make_backend(name, 1, precision=precision)
    return [backend.runner(build_model(s).eval(), (1, 3, s.resolution, s.resolution)) for s in specs]


def search(args: argparse.Namespace, seed: int) -> None:
    """Every target's knapsack run of this seed; the first trains the seed the others start from."""
    first = run_folder(args, seed, args.targets[0])
    for target in args.targets:
        folder = run_folder(args, seed, target)
        if (folder / "final.yaml").exists():
            continue
        weights = None if target == args.targets[0] else str(first / "seed.pt")
        config = knapsack_config(args, seed, target, f"{args.budget:g}%", weights)
        t0 = time.perf_counter()
        result = run_netadapt(config, out=str(folder))
        log(f"seed {seed} adapted on {target}: {100 * result.measured_latency_ms / result.seed_measured_latency_ms:.1f}"
            f" % of the seed there, test {100 * result.test_accuracy:.2f} % ({time.perf_counter() - t0:.0f} s)")


def transfer_name(args: argparse.Namespace) -> str:
    return f"{args.targets[0]} for {args.targets[1]}"


def transfer_root(args: argparse.Namespace, seed: int) -> Path:
    return args.out / f"seed{seed}" / f"{label(args.targets[0])}-for-{label(args.targets[1])}"


def transfer_folder(args: argparse.Namespace, seed: int) -> Path:
    """The round whose network the transfer kept (transfer.json), or a folder that does not exist yet."""
    done = transfer_root(args, seed) / "transfer.json"
    if not done.exists():
        return transfer_root(args, seed) / "unfinished"
    return transfer_root(args, seed) / f"round{json.loads(done.read_text())['chosen']}"


def share_on(target: str, seed_spec: ArchSpec, spec: ArchSpec, passes: int) -> float:
    """`spec`'s p25 over the seed's, timed together on `target`."""
    seed_m, m = measure_interleaved(runners_on(target, [seed_spec, spec]),
                                    InterleavedPolicy(passes=passes, runs_per_pass=5, seed=0))
    return m.p25_ms / seed_m.p25_ms


def transfer(args: argparse.Namespace, seed: int) -> None:
    """What a user without the second target's table does: adapt on the first target (X) to the budget that
    lands on the second's (Y) budget, found by timing each result on Y and scaling X's budget by the miss
    (at most TRANSFER_ROUNDS adaptations; the one nearest Y's budget without exceeding it by more than the
    tolerance is kept). On Y it then compares with Y's own network at (about) equal latency."""
    x, y = args.targets[0], args.targets[1]
    root = transfer_root(args, seed)
    if (root / "transfer.json").exists():
        return
    seed_spec = read_checkpoint(run_folder(args, seed, x) / "seed.pt")[0]
    goal = args.budget / 100
    budget, shares = args.budget, []
    shape = read_checkpoint(run_folder(args, seed, x) / "final.pt")[0]  # round 0: X's own run at the budget
    for round_ in range(TRANSFER_ROUNDS + 1):
        on_y = share_on(y, seed_spec, shape, args.passes)
        shares.append({"round": round_, "budget_on_x": budget, "share_on_y": on_y})
        log(f"seed {seed}: adapted on {x} to {budget:.1f} %, it runs at {100 * on_y:.1f} % on {y}")
        if round_ > 0 and abs(on_y / goal - 1) <= TRANSFER_TOLERANCE or round_ == TRANSFER_ROUNDS:
            break
        budget *= goal / on_y
        folder = root / f"round{round_ + 1}"
        config = knapsack_config(args, seed, x, f"{budget:.1f}%", str(run_folder(args, seed, x) / "seed.pt"))
        run_netadapt(config, out=str(folder))
        shape = read_checkpoint(folder / "final.pt")[0]
    fits = [r for r in shares[1:] if r["share_on_y"] <= goal * (1 + TRANSFER_TOLERANCE)] or shares[1:]
    chosen = min(fits, key=lambda r: abs(r["share_on_y"] - goal))
    atomic_write_text(root / "transfer.json", json.dumps({"chosen": chosen["round"], "rounds": shares}, indent=1))


def accuracy(folder: Path) -> float:
    """The adapted network's FP32 test accuracy (an INT8 run reports its quantized file's; FP32 stands beside)."""
    result = json.loads((folder / "run.json").read_text())["result"]
    return 100 * (result.get("fp32_test_accuracy") or result["test_accuracy"])


def time_all(args: argparse.Namespace) -> pd.DataFrame:
    """Every seed and adapted network on every target, interleaved per target; share of its own seed."""
    nets = []  # (seed, adapted_on, spec)
    for seed in args.seeds:
        nets.append((seed, "seed", read_checkpoint(run_folder(args, seed, args.targets[0]) / "seed.pt")[0]))
        for target in args.targets:
            folder = run_folder(args, seed, target)
            if (folder / "final.yaml").exists():
                nets.append((seed, target, read_checkpoint(folder / "final.pt")[0]))
        if (transfer_folder(args, seed) / "final.yaml").exists():
            nets.append((seed, transfer_name(args), read_checkpoint(transfer_folder(args, seed) / "final.pt")[0]))
    rows = []
    policy = InterleavedPolicy(passes=args.passes, runs_per_pass=5, seed=0)
    for timed_on in args.targets:
        runners = runners_on(timed_on, [spec for _, _, spec in nets])
        for repeat in range(args.repeats):
            p25 = [m.p25_ms for m in measure_interleaved(runners, policy)]
            seed_ms = {s: p25[i] for i, (s, on, _) in enumerate(nets) if on == "seed"}
            for i, (seed, on, _) in enumerate(nets):
                rows.append({"timed_on": timed_on, "repeat": repeat, "seed": seed, "adapted_on": on,
                             "p25_ms": p25[i], "share": p25[i] / seed_ms[seed], "load": os.getloadavg()[0]})
            log(f"timed on {timed_on} #{repeat + 1}: seeds {', '.join(f'{v:.3f}' for v in seed_ms.values())} ms")
    return pd.DataFrame(rows)


def summarize(args: argparse.Namespace, frame: pd.DataFrame) -> str:
    share = (frame[frame["adapted_on"] != "seed"].groupby(["timed_on", "adapted_on", "seed"])["share"]
             .median().reset_index())
    acc = {(s, t): accuracy(run_folder(args, s, t)) for s in args.seeds for t in args.targets
           if (run_folder(args, s, t) / "run.json").exists()}
    acc.update({(s, transfer_name(args)): accuracy(transfer_folder(args, s)) for s in args.seeds
                if (transfer_folder(args, s) / "run.json").exists()})
    share["fp32_test_accuracy"] = [acc.get((r.seed, r.adapted_on), float("nan")) for r in share.itertuples()]
    lines = [f"budget {args.budget:g} % of the seed's latency; seeds {args.seeds}; {args.repeats} interleaved "
             f"timings per target (median share of the seed's p25)", ""]
    spread = frame[frame["adapted_on"] == "seed"].groupby("timed_on")["p25_ms"]
    for timed_on, g in spread:
        lines.append(f"seed on {timed_on}: {g.min():.3f}-{g.max():.3f} ms over timings and seeds (drift "
                     f"{100 * (g.max() / g.min() - 1):.0f} %)")
    lines.append("")
    lines.append("share of the seed's latency (mean over seeds): rows adapted on, columns timed on")
    table = share.groupby(["adapted_on", "timed_on"])["share"].mean().unstack()
    lines.append((100 * table).round(1).to_string())
    lines.append("")
    lines.append("FP32 test accuracy of each adapted network, mean over seeds: " + ", ".join(
        f"{t} {statistics.mean(v for (s, tt), v in acc.items() if tt == t):.2f} %"
        for t in [*args.targets, transfer_name(args)] if any(tt == t for _, tt in acc)))
    lines.append("")
    lines.append("premise, per target Y: share on Y of a network adapted elsewhere minus that of Y's own "
                 "(points of the seed's latency; > 0: adapting on Y pays), and accuracy likewise:")
    for timed_on in args.targets:
        own = share[(share["timed_on"] == timed_on) & (share["adapted_on"] == timed_on)].set_index("seed")
        for other in [*args.targets, transfer_name(args)]:
            if other == timed_on:
                continue
            them = share[(share["timed_on"] == timed_on) & (share["adapted_on"] == other)].set_index("seed")
            both = own.index.intersection(them.index)
            if len(both) < 2:
                continue
            d_share = paired_interval((100 * (them.loc[both, "share"] - own.loc[both, "share"])).tolist())
            d_acc = paired_interval((them.loc[both, "fp32_test_accuracy"]
                                     - own.loc[both, "fp32_test_accuracy"]).tolist())
            lines.append(f"  on {timed_on:18s} adapted on {other:18s} vs its own: share {d_share.text()} points, "
                         f"accuracy {d_acc.text()} points (n={len(both)})")
    write_csv(share, args.out / "premise-shares.csv")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="onnxruntime,onnxruntime:int8,openvino",
                   help="backend[:precision] list; the first trains each seed")
    p.add_argument("--model", default="small")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--limit", type=int, default=10000)
    p.add_argument("--seed-epochs", type=int, default=2)
    p.add_argument("--long-epochs", type=int, default=1)
    p.add_argument("--budget", type=float, default=50.0, help="share of the seed's latency on each target, %%")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--parts", default="search,transfer,time")
    p.add_argument("--passes", type=int, default=40, help="interleaved passes (x 5 runs) per timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results/benchmarks")
    args = p.parse_args()
    args.targets = [t for t in args.targets.split(",") if t]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.out = Path(args.out) / f"premise-{args.model}-{args.budget:g}"
    args.out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    if "search" in parts:
        for seed in args.seeds:
            search(args, seed)
    if "transfer" in parts:
        for seed in args.seeds:
            transfer(args, seed)
    if "time" in parts:
        frame = time_all(args)
        write_csv(frame, args.out / "premise.csv")
        text = summarize(args, frame)
        print(text)
        atomic_write_text(args.out / "premise.txt", text + "\n")
        log(f"wrote {args.out / 'premise.csv'}, {args.out / 'premise.txt'}")


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:  # a missing extra, an unknown backend or precision: one line, exit 2
        sys.exit(print(f"premise.py: {exc}", file=sys.stderr) or 2)
