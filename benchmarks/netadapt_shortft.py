"""Item-5 experiment: does the short fine-tune's length or learning rate change which proposal NetAdapt keeps?

    python benchmarks/netadapt_shortft.py [--work results/benchmarks/netadapt-work-full] [--seed 0]
        [--iteration 1] [--variants 10:0.005,40:0.005,10:0.02]

Takes one iteration of a finished latency chain (benchmarks/netadapt.py's work folder): its parent and every
proposal it evaluated. Each proposal is shrunk from the parent again, BN refreshed as the library does, then
fine-tuned for each variant's STEPS at LR and scored on the same holdout. Prints, per variant, every
proposal's holdout accuracy and the NetAdapt score (dAcc / dLatency, latency as the chain's table predicted
it), and which proposal each variant would keep. Writes results/benchmarks/netadapt-shortft.csv.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnv3_search import build_model, shrink  # noqa: E402
from mnv3_search.data import load_dataset  # noqa: E402
from mnv3_search.model.weights import read_checkpoint  # noqa: E402
from mnv3_search.fileio import write_csv  # noqa: E402
from mnv3_search.train import evaluate, fine_tune, refresh_bn  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="results/benchmarks/netadapt-work-full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iteration", type=int, default=1)
    p.add_argument("--variants", default="10:0.005,40:0.005,10:0.02")
    args = p.parse_args()
    import json

    settings = json.loads((Path(args.work) / "settings.json").read_text())
    folder = Path(args.work) / f"seed{args.seed}" / "netadapt"
    proposals = pd.read_csv(folder / "proposals.csv")
    rows = pd.read_csv(folder / "iterations.csv")
    mine = proposals[proposals["iteration"] == args.iteration]
    parent_path = folder / ("seed.pt" if args.iteration == 1 else f"iterations/{args.iteration - 1:03d}.pt")
    parent_spec, parent_state = read_checkpoint(parent_path)
    parent_row = rows[rows["iteration"] == args.iteration - 1].iloc[0]
    current = float(parent_row["predicted_latency_ms"])
    full = len(load_dataset(settings["data"], resolution=8, holdout=0.0).train)
    ds = load_dataset(settings["data"], resolution=settings["train_resolution"],
                      holdout=settings["holdout_images"] / full, seed=args.seed, limit=settings["limit"])
    parent = build_model(parent_spec)
    parent.load_state_dict(parent_state, strict=True)
    parent_acc = evaluate(parent, ds, ds.holdout)
    print(f"iteration {args.iteration}: parent holdout {100 * parent_acc:.2f} %, predicted {current:.3f} ms, "
          f"{len(mine)} proposals, holdout {len(ds.holdout)} images", flush=True)
    out = []
    for variant in args.variants.split(","):
        steps, lr = variant.split(":")
        steps, lr = int(steps), float(lr)
        for _, prop in mine.iterrows():
            spec, state = shrink(parent_spec, parent_state, prop["group"], int(prop["channels"]), 8)
            model = build_model(spec)
            model.load_state_dict(state, strict=True)
            refresh_bn(model, ds, num_batches=10, seed=args.seed)
            fine_tune(model, ds, steps, lr=lr, batch_size=settings["batch_size"], seed=args.seed)
            acc = evaluate(model, ds, ds.holdout)
            saved = max(current - float(prop["predicted_latency_ms"]), 1e-12)
            out.append({"steps": steps, "lr": lr, "proposal": f"{prop['group']}={int(prop['channels'])}",
                        "predicted_latency_ms": prop["predicted_latency_ms"], "holdout_accuracy": acc,
                        "score": (acc - parent_acc) / saved, "chain_holdout_accuracy": prop["holdout_accuracy"],
                        "chain_chosen": prop["chosen"]})
            print(f"  {steps:3d} steps lr {lr}: {out[-1]['proposal']:14s} holdout {100 * acc:.2f} % "
                  f"score {out[-1]['score']:+.4f}", flush=True)
    frame = pd.DataFrame(out)
    for (steps, lr), g in frame.groupby(["steps", "lr"]):
        best = g.sort_values("score", ascending=False).iloc[0]
        by_acc = g.sort_values("holdout_accuracy", ascending=False).iloc[0]
        print(f"{steps} steps at lr {lr}: keeps {best['proposal']} (score); best accuracy {by_acc['proposal']} "
              f"{100 * by_acc['holdout_accuracy']:.2f} %; accuracy range "
              f"{100 * g['holdout_accuracy'].min():.2f}-{100 * g['holdout_accuracy'].max():.2f} %")
    write_csv(frame, Path("results/benchmarks/netadapt-shortft.csv"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
