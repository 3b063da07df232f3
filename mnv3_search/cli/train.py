"""`mnv3-search train`: train a seed network from scratch (or go on from weights) on a dataset.

Thin: parse options, call data.load_dataset and train.train_epochs, render progress with rich, write
the run folder (weights.pt, spec.yaml, metrics.csv, summary.json), each file atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click
import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .options import (batch_size_option, data_option, device_option, holdout_option, limit_option,
                      resolution_option, seed_option, threads_option, train_resolution_option, use_device,
                      weights_option)
from ..data import load_dataset
from ..fileio import atomic_write_text
from ..model.build import build_model
from ..fileio import write_csv
from ..spec.spaces import resolve_spec_path
from ..spec.yaml_io import dump_spec, load_spec
from ..train import evaluate, steps_per_epoch, train_epochs
from ..model.weights import load_weights, save_checkpoint


@click.command()
@click.argument("spec", default="small", metavar="[SPEC]")
@data_option(name="data_source")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Passes over the training split.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Run folder for weights.pt, spec.yaml, metrics.csv, summary.json.")
@train_resolution_option()
@resolution_option()
@batch_size_option(128)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
              help="Peak learning rate (SGD, Nesterov, cosine schedule).")
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True, help="Linear warm-up steps.")
@holdout_option()
@limit_option()
@seed_option()
@weights_option()
@threads_option()
@device_option()
def train(spec: str, data_source: str, epochs: int, out_dir: str, train_resolution: int, resolution: Optional[int],
          batch_size: int, lr: float,
          warmup: int, holdout: Optional[float | int], limit: Optional[int], seed: int, weights: Optional[str],
          threads: int, device: str) -> None:
    """Train SPEC on a dataset and write a run folder with weights and metrics.

    SPEC is a YAML file or a shipped search space (small, large); default: small. The classifier gets
    as many outputs as the dataset has classes (--weights made for another class count, e.g. torchvision's
    ImageNet weights, load all but the final layer, which starts fresh); the holdout accuracy is shown
    after every epoch and the test accuracy once at the end.

    \b
    Examples:
      mnv3-search train small --data digits --epochs 20 --out results/seed-digits
      mnv3-search train small --data fashion-mnist --epochs 3 --limit 20000 --out results/seed-fm
      mnv3-search train large --data imagefolder:~/photos --train-resolution 64 --out results/photos
      mnv3-search train large --data imagefolder:~/photos --weights mobilenet_v3_large.pth --out results/tv
      mnv3-search train results/seed-fm/spec.yaml --weights results/seed-fm/weights.pt --epochs 2 --out results/more
    """
    err = Console(stderr=True)
    on = use_device(device)
    torch.set_num_threads(threads)
    path = resolve_spec_path(spec)
    err.print(f"[dim]spec: {path} · data: {data_source} · training on {on}[/dim]", highlight=False)
    dataset = load_dataset(data_source, resolution=train_resolution, holdout=holdout, seed=seed, limit=limit)
    arch = load_spec(path).with_overrides(resolution=resolution, num_classes=dataset.num_classes,
                                          where=f"{path} with the dataset's classes")
    torch.manual_seed(seed)
    model = build_model(arch)
    if weights:
        note = load_weights(model, weights, spec_name=str(path))
        if note:
            err.print(note, highlight=False, soft_wrap=True)
    err.print(f"[dim]{dataset.name}: {len(dataset.train)} train, {len(dataset.holdout)} holdout, "
              f"{len(dataset.test)} test images at {train_resolution}x{train_resolution}, "
              f"{dataset.num_classes} classes[/dim]",
              highlight=False)

    per_epoch = steps_per_epoch(dataset, batch_size)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err) as bar:
        task = bar.add_task("epoch 1", total=epochs * per_epoch, loss="-")

        def progress(step: int, loss: float) -> None:
            bar.update(task, completed=step, loss=f"{loss:.3f}", description=f"epoch {(step - 1) // per_epoch + 1}")

        def report(step: int, accuracy: float) -> None:
            bar.console.print(f"epoch {step // per_epoch}: holdout accuracy {100 * accuracy:.2f}%", highlight=False)

        result = train_epochs(model, dataset, epochs, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed,
                              progress=progress, report=report)
    test_accuracy = evaluate(model, dataset, dataset.test)

    out = Path(out_dir)
    save_checkpoint(model, arch, out / "weights.pt")
    dump_spec(arch, out / "spec.yaml")
    write_csv(pd.DataFrame(result.history), out / "metrics.csv")
    summary = {
        "spec": str(path), "data": data_source, "train_resolution": train_resolution,
        "resolution": arch.resolution, "epochs": epochs, "steps": result.steps,
        "batch_size": batch_size, "lr": lr, "seed": seed, "threads": threads, "train_images": len(dataset.train),
        "holdout_accuracy": result.accuracy, "test_accuracy": test_accuracy, "seconds": round(result.seconds, 2),
        "images_per_s": round(result.images_per_s, 1), "weights_from": weights, "device": on,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    click.echo(f"test accuracy {100 * test_accuracy:.2f}% · holdout {100 * (result.accuracy or 0):.2f}% · "
               f"{result.steps} steps in {result.seconds:.1f} s ({result.images_per_s:.0f} images/s) · wrote {out}/")
