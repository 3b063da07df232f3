"""`mnv3-search compare`, `report` and `export`: thin over compare.py, plots.py and export.py, rendered with rich."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import click
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .common import stdout_console
from .options import (BATCH_HELP, CSV_HELP, LUT_HELP, THREADS_HELP, backend_option, precision_option,
                      resolution_option, runner_options, train_resolution_option)
from ..report.compare import compare_frame, evaluate_variants, load_variant, measure_variants, unique_labels
from ..data import SOURCES_HELP, load_dataset
from ..quantize import CALIBRATION_IMAGES
from ..errors import UserError
from ..export import FORMATS, export_model
from ..latency import InterleavedPolicy, make_backend, torch_threads
from ..fileio import write_csv


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


@click.command()
@click.argument("variants", nargs=-1, required=True, metavar="SPEC|RUN...")
@click.option("--weights", "weights", multiple=True, metavar="[N=]PATH",
              help="Weights for a spec variant: N=PATH for the N-th variant (1-based), or PATH for the first.")
@click.option("--data", metavar="SOURCE", help=f"Evaluate every variant with weights on this test split "
              f"({SOURCES_HELP}); run folders otherwise report run.json's test accuracy.")
@train_resolution_option(" The --data images are resized to it: the size the runs trained at.")
@click.option("--data-resolution", "data_resolution", type=click.IntRange(4, 1024), hidden=True,
              help="Old name of --train-resolution.")
@resolution_option()
@backend_option()
@precision_option()
@runner_options
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help=THREADS_HELP)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help=BATCH_HELP)
@click.option("--passes", type=click.IntRange(min=5), default=30, show_default=True,
              help="Interleaved passes (each variant runs 5 times per pass, in a new random order).")
@click.option("--no-latency", is_flag=True, help="Counts and accuracy only.")
@click.option("--lut", "lut_path", is_flag=False, flag_value="", default=None, type=click.Path(dir_okay=False),
              metavar="[FILE]", help=LUT_HELP + " Adds each variant's predicted latency (calibrated p25); "
              "--lut alone: the machine's table. Missing entries are measured and kept.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, allow_dash=True),
              help=CSV_HELP + " All columns; with '-', the CSV replaces the table on stdout.")
def compare(variants: tuple[str, ...], weights: tuple[str, ...], data: Optional[str], train_resolution: int,
            data_resolution: Optional[int], resolution: Optional[int], backend: str, precision: str,
            runner: Optional[str], runner_device: Optional[str], threads: int, batch: int, passes: int,
            no_latency: bool, lut_path: Optional[str], csv_path: Optional[str]) -> None:
    """Compare specs and NetAdapt run folders side by side; the first is the baseline.

    \b
    Latency is measured for all variants together, interleaved in this one process (25th percentile and
    median), so the ratios are fair even on a busy machine. With --precision int8 every variant is timed
    quantized, and with --data its accuracy is the INT8 network's (calibrated on 512 training images).
    \b
    Examples:
      mnv3-search compare small results/small-80pct-seed0 small_075.yaml --csv cmp.csv
      mnv3-search compare small.yaml results/run-a results/run-b --weights 1=seed.pt --data digits
      mnv3-search compare results/run-a results/run-b --precision int8 --data fashion-mnist
    """
    err = Console(stderr=True)
    by_index: dict[int, str] = {}
    for item in weights:
        index, sep, path = item.partition("=")
        if sep and index.isdigit():
            by_index[int(index)] = path
        else:
            by_index[1] = item
    for number in by_index:
        if not 1 <= number <= len(variants):
            raise UserError(f"--weights {number}=...: there are only {len(variants)} variants")
    loaded = [load_variant(arg, by_index.get(i)) for i, arg in enumerate(variants, start=1)]
    unique_labels(loaded)
    if resolution is not None:
        for v in loaded:
            v.spec = v.spec.with_overrides(resolution=resolution, where=f"{v.source} with --resolution {resolution}")
    latency_backend = None
    if not no_latency or lut_path is not None:  # checked before any evaluation: a bad runner fails at once
        latency_backend = make_backend(backend, threads, precision, runner=runner, runner_device=runner_device)
        latency_backend.fingerprint()
    if data:
        dataset = load_dataset(data, resolution=data_resolution or train_resolution)
        evaluate_variants(loaded, dataset, precision)
    measurements = None
    if latency_backend is not None and not no_latency:
        with Progress(TextColumn("timing {task.description}"), BarColumn(), TimeElapsedColumn(), console=err,
                      transient=True) as bar:
            task = bar.add_task(f"{len(loaded)} networks interleaved", total=passes)
            measurements = measure_variants(loaded, latency_backend, batch,
                                            InterleavedPolicy(passes=passes, min_passes=min(10, passes)),
                                            on_pass=lambda done, total: bar.update(task, completed=done))
    predicted = None
    if lut_path is not None:
        from ..latency import LatencyTable, default_table_path

        assert latency_backend is not None  # made above whenever --lut is given
        lut = LatencyTable.open(lut_path or default_table_path(latency_backend, batch), latency_backend, batch)
        err.print(f"[dim]table: {lut.path} ({len(lut.entries)} entries)[/dim]", highlight=False)
        predicted = [lut.predict(v.spec).calibrated_ms for v in loaded]
    frame = compare_frame(loaded, measurements, predicted)
    if csv_path:
        write_csv(frame, csv_path)
        if csv_path == "-":
            return  # stdout carries the CSV alone
        err.print(f"[dim]wrote {csv_path}[/dim]", highlight=False)
    table = Table(title="compared with " + loaded[0].label, header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    columns = ["variant", "res", "params", "×", "MACs", "×", "p25 ms", "median ms", "×", "accuracy", "Δ"]
    columns += ["lut p25 ms"] if predicted else []
    for name in columns:
        table.add_column(name, justify="left" if name == "variant" else "right", no_wrap=True)
    for row in frame.to_dict("records"):
        table.add_row(
            row["variant"], str(row["resolution"]), f"{row['params']:,}", _num(row["params_ratio"], ".3f"),
            f"{row['macs'] / 1e6:.2f}M", _num(row["macs_ratio"], ".3f"), _num(row["latency_p25_ms"], ".3f"),
            _num(row["latency_median_ms"], ".3f"), _num(row["latency_ratio"], ".3f"),
            "-" if row["accuracy"] is None or row["accuracy"] != row["accuracy"] else f"{100 * row['accuracy']:.2f}%",
            "-" if row["accuracy_delta"] is None or row["accuracy_delta"] != row["accuracy_delta"]
            else f"{100 * row['accuracy_delta']:+.2f}",
            *([_num(row["predicted_p25_ms"], ".3f")] if predicted else []),
        )
    out = stdout_console()
    out.print(table)
    if measurements:
        assert latency_backend is not None  # measurements come from it
        device = latency_backend.fingerprint().get("device")  # a runner's device; this machine's has no such field
        where = latency_backend.name + (f" on {device}" if device else "")
        out.print(f"latency: {where} {precision.upper()}, {threads} thread(s), batch {batch}, "
                  f"{measurements[0].repeats} runs each, interleaved; × = ratio to {loaded[0].label} (latency: of 25th "
                  f"percentiles)", highlight=False)


@click.command()
@click.argument("source", metavar="SPEC|RUN")
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True,
              help="onnx (checked with ONNX Runtime) or torchscript.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="File to write.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Weights for a SPEC (a run folder brings final.pt).")
@resolution_option()
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help=BATCH_HELP + " Also the exported input's batch.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help=THREADS_HELP)
@precision_option()
@click.option("--data", metavar="SOURCE", help=f"Score the file on this test split ({SOURCES_HELP}); INT8 also "
              f"calibrates on {CALIBRATION_IMAGES} of its training images, so --precision int8 needs it. With "
              f"--data the ONNX file takes any batch and input size.")
@train_resolution_option(" The --data images are resized to it: the size the network trained at.")
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")
def export(source: str, fmt: str, out_path: str, weights: Optional[str], resolution: Optional[int], batch: int,
           threads: int, precision: str, data: Optional[str], train_resolution: int, no_latency: bool) -> None:
    """Write SPEC or a run's final network as ONNX or TorchScript with batch norm folded.

    \b
    FP32: the file is reloaded and checked against PyTorch on random inputs (max abs error ≤ 1e-4, scaled
    by the outputs' magnitude above 1). INT8 (--precision int8, ONNX): statically quantized on --data's
    training images; the file's test-split accuracy is printed beside the FP32 network's. Then the file is
    timed interleaved with the eager PyTorch model (and, for INT8, with the FP32 ONNX file).

    \b
    Examples:
      mnv3-search export results/small-80pct-seed0 --format onnx --out small80.onnx
      mnv3-search export results/small-80pct-seed0 --format onnx --precision int8 --data fashion-mnist --out s8.onnx
      mnv3-search export large --weights large.pth --format torchscript --out large.pt
    """
    err = Console(stderr=True)
    variant = load_variant(source, weights)
    spec = variant.spec.with_overrides(resolution=resolution, where=f"{variant.source} with the given options")
    if variant.state_dict is None:
        err.print(f"[yellow]{variant.source}: no weights given; exporting freshly initialised weights[/yellow]",
                  highlight=False, soft_wrap=True)
    if precision == "int8" and not data:
        raise UserError("--precision int8 needs --data SOURCE: its training images calibrate the quantization "
                        "and its test split scores the INT8 file")
    dataset = load_dataset(data, resolution=train_resolution) if data else None
    if dataset is not None and dataset.num_classes != spec.num_classes:
        raise UserError(f"{variant.source}: the network has {spec.num_classes} outputs but --data {dataset.name} "
                        f"has {dataset.num_classes} classes")
    shape = (batch, 3, spec.resolution, spec.resolution)
    with torch_threads(threads):
        model = variant.model()
        result = export_model(model, shape, fmt, out_path, measure=not no_latency, threads=threads,
                              precision=precision, dataset=dataset)
    out = stdout_console()
    size = "x".join(map(str, shape))
    kind = f"{fmt}, {precision.upper()}, " + (f"any batch and input size, traced at {size}" if dataset is not None
                                             else f"input {size}")
    out.print(f"wrote {result.path} ({kind}): {result.folded_bn} conv+BN pairs folded, {result.bn_left} batch norms "
              f"left", highlight=False, soft_wrap=True)  # a path stays whole
    if result.tolerance is not None:
        out.print(f"outputs vs PyTorch: max abs error {result.max_abs_error:.2e} (tolerance {result.tolerance:.1e}, "
                  f"outputs up to {result.output_scale:.3g})", highlight=False)
    if result.accuracy is not None and dataset is not None:
        a = result.accuracy
        file_kind = "INT8 file" if precision == "int8" else "FP32 file"
        out.print(f"test accuracy ({dataset.name}, {a.images:,} images at {train_resolution} px): {file_kind} "
                  f"[bold]{100 * a.file_accuracy:.2f}%[/bold], FP32 PyTorch {100 * a.torch_accuracy:.2f}% "
                  f"({100 * (a.file_accuracy - a.torch_accuracy):+.2f} points); same top-1 class on "
                  f"{100 * a.agreement:.1f}% of the images", highlight=False)
    if result.latency is not None and result.torch_latency is not None:
        runtime = "ONNX Runtime" if fmt == "onnx" else "TorchScript"
        clock = "thread CPU time" if threads == 1 else "wall clock"
        text = (f"latency ({threads} thread(s), batch {batch}, interleaved, {clock}): {runtime} {precision.upper()} "
                f"p25 {result.latency.p25_ms:.3f} ms, median {result.latency.median_ms:.3f} ms; eager PyTorch "
                f"(unfolded) p25 {result.torch_latency.p25_ms:.3f} ms, median {result.torch_latency.median_ms:.3f} ms")
        if result.fp32_file_latency is not None:
            f = result.fp32_file_latency
            text += (f"; FP32 ONNX p25 {f.p25_ms:.3f} ms (INT8 / FP32 = {result.latency.p25_ms / f.p25_ms:.2f})")
        out.print(text, highlight=False)


@click.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False), metavar="RUN|FOLDER")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder for the PNGs (default: the run folder, or the folder of runs).")
def report(path: str, out_dir: Optional[str]) -> None:
    """Summarise a NetAdapt run folder and plot it; a folder of runs gives one Pareto plot.

    \b
    A run: iterations.png (resource and holdout accuracy per iteration), proposals.png (every proposal's
    resource vs accuracy, chosen ones marked), widths.png (channel widths per block, seed vs final).
    A folder of runs (e.g. results/): pareto.png, final latency vs test accuracy of every finished run.

    \b
    Examples:
      mnv3-search report results/small-80pct-seed0
      mnv3-search report results/ --out plots/
    """
    from ..report.plots import find_runs, is_run_folder, plot_pareto, read_run, report_run, runs_frame

    err = Console(stderr=True)
    out = stdout_console()
    folder = Path(path)
    if is_run_folder(folder):
        data, written = report_run(folder, out_dir)
        table = Table(title=f"{data.name}", header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
        for name in ("", "seed", "final"):
            table.add_column(name, justify="left" if not name else "right", no_wrap=True)
        for row in data.summary:
            table.add_row(*row)
        out.print(table)
    else:
        runs = find_runs(folder)
        if not runs:
            raise UserError(f"{folder}: not a NetAdapt run folder (no run.json and iterations.csv) and holds no run "
                            f"folders; give results/<run> or a folder of runs")
        frame = runs_frame([read_run(p) for p in runs])
        if frame.empty:
            raise UserError(f"{folder}: none of its {len(runs)} runs has finished (no test accuracy in run.json)")
        target, column = plot_pareto(frame, Path(out_dir or folder) / "pareto.png")
        written = [target]
        table = Table(title=f"{len(frame)} finished runs in {folder}", header_style="bold", box=box.SIMPLE_HEAD,
                      pad_edge=False)
        for name in ("run", "budget", "measured ms", "predicted ms", "MACs", "params", "test accuracy"):
            table.add_column(name, justify="left" if name in ("run", "budget") else "right", no_wrap=True)
        for record in frame.to_dict("records"):
            table.add_row(record["run"], str(record["budget"]), _num(record["measured_latency_ms"], ".3f"),
                          _num(record["predicted_latency_ms"], ".3f"), f"{record['macs'] / 1e6:.2f}M",
                          f"{int(record['params']):,}", f"{100 * record['test_accuracy']:.2f}%")
        out.print(table)
        err.print(f"[dim]Pareto plot on {column}[/dim]", highlight=False)
    for p in written:
        err.print(f"[dim]wrote {p}[/dim]", highlight=False)
