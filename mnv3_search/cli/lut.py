"""`mnv3-search lut`: build, check and show the per-block latency lookup table. Thin over `lut`."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import click
import pandas as pd
from rich import box
from rich.console import Console
from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from .common import load_spec_argument, stdout_console
from .options import (BATCH_HELP, CSV_HELP, LUT_HELP, RUNNER_DEVICE_HELP, SEED_HELP, THREADS_HELP, backend_option,
                      precision_option, resolution_option, runner_options)
from ..errors import UserError
from ..latency import (Calibration, InterleavedPolicy, LatencyTable, build_table, check_table, default_table_path,
                       heldout_text, make_backend, summarize_errors)
from ..prune.variants import calibration_companions, netadapt_keys, variant_specs
from ..fileio import write_csv


@contextmanager
def _progress(err: Console, title: str) -> Iterator:
    """A rich bar with ETA; yields the `progress(done, total, what)` callback the library takes."""
    with Progress(TextColumn(f"{title} [dim]{{task.description}}[/dim]"), BarColumn(), TaskProgressColumn(),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err,
                  transient=True) as bar:
        task = bar.add_task("", total=None)

        def update(done: float, total: float, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        yield update


def _table_options(f):
    """Options shared by build and check: where the table is and what it measures."""
    options = [
        click.option("--lut", "table_path", type=click.Path(dir_okay=False), help=LUT_HELP),
        click.option("--table", "table_alias", type=click.Path(dir_okay=False), hidden=True,
                     help="Old name of --lut."),
        backend_option(),
        precision_option(),
        runner_options,
        click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help=THREADS_HELP),
        click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help=BATCH_HELP),
        resolution_option(),
        click.option("--width", type=float, help="Width multiplier; default: the spec's."),
        click.option("--passes", type=click.IntRange(min=1), default=30, show_default=True,
                     help="Interleaved passes over all entries (a new table only)."),
        click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True,
                     help="Runs of each entry per pass (a new table only)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _open(table_path: Optional[str], backend: str, precision: str, runner: Optional[str],
          runner_device: Optional[str], threads: int, batch: int, passes: int, runs: int,
          err: Console) -> LatencyTable:
    latency_backend = make_backend(backend, threads, precision, runner=runner, runner_device=runner_device)
    path = Path(table_path) if table_path else default_table_path(latency_backend, batch)
    table = LatencyTable.open(path, latency_backend, batch,
                              InterleavedPolicy(passes=passes, runs_per_pass=runs, min_passes=min(10, passes)))
    err.print(f"[dim]table: {path} ({len(table.entries)} entries)[/dim]", highlight=False)
    return table


@click.group()
def lut() -> None:
    """Per-block latency lookup table for this device (build, check, show).

    \b
    Examples:
      mnv3-search lut build large
      mnv3-search lut check large --variants 30 --csv check.csv
      mnv3-search lut show
    """


@lut.command()
@click.argument("spec", metavar="SPEC")
@_table_options
@click.option("--step", type=click.IntRange(min=1), default=8, show_default=True,
              help="Channel step of the pre-populated widths.")
def build(spec: str, table_path: Optional[str], table_alias: Optional[str], backend: str, precision: str,
          runner: Optional[str], runner_device: Optional[str], threads: int, batch: int, resolution: Optional[int],
          width: Optional[float], passes: int, runs: int, step: int) -> None:
    """Measure the entries NetAdapt needs for SPEC and calibrate on SPEC itself.

    Every block of SPEC is timed at its seed widths and with each width NetAdapt shrinks (each block's
    expansion size, each residual-coupled output group, last conv, classifier hidden) in steps of --step
    down to the minimum. Entries already in the table are kept, not re-measured: an interrupted build
    resumes. Large at 224 px needs about 1,000 entries (a few minutes on one thread).

    \b
    Examples:
      mnv3-search lut build large
      mnv3-search lut build small --resolution 160 --lut small160.json
      mnv3-search lut build my_net.yaml --threads 2 --step 16
      mnv3-search lut build small --precision int8
      mnv3-search lut build small --backend executorch --runner './run_on_phone.sh {model} {runs}' --passes 5 --runs 20
    """
    err = Console(stderr=True)
    arch, _ = load_spec_argument(spec, err, resolution=resolution, width=width)
    table = _open(table_path or table_alias, backend, precision, runner, runner_device, threads, batch, passes, runs,
                  err)
    with _progress(err, "lut build") as progress:
        report = build_table(table, arch, netadapt_keys(arch, step), calibration_companions(arch), progress)
    cal = report.calibration
    console = stdout_console()
    console.print(
        f"{report.entries_needed} entries for {arch.name} at {arch.resolution} px: {report.entries_measured} "
        f"measured, {report.entries_needed - report.entries_measured} already in the table "
        f"({report.seconds:.1f} s, {report.cpu_seconds / 60:.1f} CPU-min). Calibration on {cal.networks} networks "
        f"({cal.model}): whole = {cal.a:.3f} x blocks sum + {cal.b_ms_per_mparam:.3f} ms per M params "
        f"{cal.c_ms:+.3f} ms; seed: blocks sum {cal.raw_ms:.3f} ms, measured {cal.measured_ms:.3f} ms (p25), "
        f"predicted {cal.apply(cal.raw_ms, cal.params):.3f} ms. Table: {table.path}", highlight=False)
    console.print(heldout_line(cal), highlight=False)


def heldout_line(cal: Calibration) -> str:
    """The build's last line: how well the kept model predicted networks it was not fitted on."""
    if not cal.heldout_pct:
        return (f"held-out error: none ({cal.networks} network(s) leave nothing to hold out); "
                f"check with `mnv3-search lut check`")
    span = f" down to {100 * cal.smallest_macs_share:.0f}% of its MACs" if cal.smallest_macs_share else ""
    return (f"held-out error relative to the seed ({cal.networks - 1} networks{span}, each left out of the fit in "
            f"turn): {cal.model} {cal.heldout_pct[cal.model]:.1f}% (all forms: {heldout_text(cal)})")


@lut.command()
@click.argument("spec", metavar="SPEC")
@_table_options
@click.option("--variants", "n", type=click.IntRange(min=1), default=30, show_default=True,
              help="Random channel variants of SPEC to check.")
@click.option("--seed", type=int, default=0, show_default=True, help=SEED_HELP)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, allow_dash=True),
              help=CSV_HELP + " With '-', the CSV replaces the table on stdout.")
def check(spec: str, table_path: Optional[str], table_alias: Optional[str], backend: str, precision: str,
          runner: Optional[str], runner_device: Optional[str], threads: int, batch: int, resolution: Optional[int],
          width: Optional[float], passes: int, runs: int, n: int, seed: int, csv_path: Optional[str]) -> None:
    """Predicted vs measured latency of SPEC and N random channel variants of it.

    Whole networks are timed together, interleaved (p25, the table's protocol); missing entries are
    measured and cached first. Errors are shown absolute and relative to the seed timed in the same
    measurement (what NetAdapt's decisions use: on a shared host the absolute level drifts, ratios hold).
    The summary gives the host's drift since calibration and flags a measurement the load disturbed.

    \b
    Examples:
      mnv3-search lut check large --variants 30
      mnv3-search lut check small --variants 10 --seed 1 --csv small_check.csv
    """
    err = Console(stderr=True)
    arch, _ = load_spec_argument(spec, err, resolution=resolution, width=width)
    table = _open(table_path or table_alias, backend, precision, runner, runner_device, threads, batch, passes, runs,
                  err)
    with _progress(err, "lut check") as progress:
        report = check_table(table, arch, variant_specs(arch, n, seed), calibration_companions(arch), progress)
    rows = report.rows
    out = Table(title=f"{arch.name}: prediction vs measured (p25, ms); ratios to the seed timed beside them",
                box=box.SIMPLE_HEAD, header_style="bold")
    for name in ("network", "blocks sum", "predicted", "measured", "error", "raw error", "predicted ratio",
                 "measured ratio", "ratio error", "raw ratio error"):
        out.add_column(name, justify="left" if name == "network" else "right")
    for r in rows:
        style = "red" if abs(r.relative_error_pct) > 10 else None
        out.add_row(r.network, f"{r.raw_ms:.3f}", f"{r.predicted_ms:.3f}", f"{r.measured_ms:.3f}",
                    f"{r.error_pct:+.1f}%", f"{r.raw_error_pct:+.1f}%", f"{r.predicted_ratio:.3f}",
                    f"{r.measured_ratio:.3f}", f"{r.relative_error_pct:+.1f}%", f"{r.raw_relative_error_pct:+.1f}%",
                    style=style)
    console = stdout_console()
    console.print(out)
    s = summarize_errors(rows)
    cal = report.calibration
    console.print(
        f"{s.count} variants relative to the seed (what NetAdapt decides on): mean abs error {s.rel_mape_pct:.1f}% "
        f"(raw sum {s.raw_rel_mape_pct:.1f}%), worst {s.rel_worst_pct:.1f}%, {s.rel_within_10_pct:.0f}% within "
        f"±10%, mean signed error {s.rel_bias_pct:+.1f}% (positive: predicted slower than measured); variants "
        f"measured at {100 * s.smallest_ratio:.0f}-{100 * s.largest_ratio:.0f}% of the seed\nabsolute: mean abs "
        f"error {s.mape_pct:.1f}% (raw sum {s.raw_mape_pct:.1f}%), worst {s.worst_pct:.1f}%, "
        f"{s.within_10_pct:.0f}% within ±10%\nhost drift since calibration: seed {rows[0].measured_ms:.3f} ms now vs "
        f"{cal.measured_ms:.3f} ms then ({report.drift_pct:+.1f}%); calibration model: {cal.model}",
        highlight=False)
    if not report.reliable:
        console.print(f"[yellow]unreliable: ratios to the seed moved {100 * report.ratio_shift:.0f}% within the "
                      f"measurement and p25 sat {100 * report.spread:.0f}% above the fastest run "
                      f"({report.attempts} attempts); the host is busy, run the check again[/yellow]",
                      highlight=False)
    if csv_path:
        frame = pd.DataFrame([{"network": r.network, "raw_ms": r.raw_ms, "predicted_ms": r.predicted_ms,
                               "measured_ms": r.measured_ms, "measured_median_ms": r.measured_median_ms,
                               "error_pct": r.error_pct, "raw_error_pct": r.raw_error_pct,
                               "predicted_ratio": r.predicted_ratio, "raw_ratio": r.raw_ratio,
                               "measured_ratio": r.measured_ratio, "relative_error_pct": r.relative_error_pct,
                               "raw_relative_error_pct": r.raw_relative_error_pct,
                               "reliable": report.reliable} for r in rows])
        write_csv(frame, csv_path)
        err.print(f"[dim]wrote {csv_path}[/dim]", highlight=False)


@lut.command()
@click.argument("table_arg", metavar="[TABLE]", required=False, type=click.Path(dir_okay=False))
@click.option("--lut", "table_path", type=click.Path(dir_okay=False), help=LUT_HELP + " Same as TABLE.")
@backend_option()
@precision_option()
@click.option("--runner-device", "runner_device", metavar="NAME",
              help=RUNNER_DEVICE_HELP + " Picks that device's default table (the runner is not started).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help=THREADS_HELP + " Picks the default table.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help=BATCH_HELP + " Picks the default table.")
@click.option("--kind", type=click.Choice(["stem", "bneck", "last_conv", "classifier"]), help="Only this kind.")
@click.option("--rows", type=click.IntRange(min=0), default=20, show_default=True,
              help="Entries to print (0: none); --csv always gets all.")
@click.option("--limit", "rows_alias", type=click.IntRange(min=0), hidden=True, help="Old name of --rows.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, allow_dash=True),
              help=CSV_HELP + " All entries; with '-', the CSV replaces the text on stdout.")
def show(table_arg: Optional[str], table_path: Optional[str], backend: str, precision: str,
         runner_device: Optional[str], threads: int, batch: int, kind: Optional[str], rows: int,
         rows_alias: Optional[int], csv_path: Optional[str]) -> None:
    """What a table holds: device, backend, calibrations and entries.

    Without TABLE: this machine's table for --backend, --precision, --threads and --batch (the one
    netadapt, explore and profile --lut use), or with --runner-device that device's.

    \b
    Examples:
      mnv3-search lut show
      mnv3-search lut show my_table.json --kind bneck --rows 50
      mnv3-search lut show --csv - | head
    """
    from ..latency import default_table_dir, device_fingerprint, table_file_name

    chosen = table_arg or table_path
    if chosen:
        path = Path(chosen)
    else:
        where = {"device": runner_device} if runner_device else dict(device_fingerprint())
        name = f"runner:{backend}" if runner_device else backend
        path = default_table_dir() / table_file_name(where, name, precision, threads, batch)
    if not path.exists():  # the library's message names lut build's --lut; say what `show` itself takes
        raise UserError(f"{path}: no such latency table; build one with `mnv3-search lut build SPEC"
                        + (f" --lut {path}`" if chosen else "` (this machine's table), or name one: "
                           "`mnv3-search lut show TABLE`"))
    table = LatencyTable.load(path)
    limit = rows if rows_alias is None else rows_alias
    entries = [e for e in sorted(table.entries.values(), key=lambda e: e.key) if kind is None or e.key.kind == kind]
    records = [{**{f: getattr(e.key, f) for f in ("kind", "resolution", "in_channels", "exp", "out", "kernel",
                                                  "stride", "se", "nl", "expand", "residual")},
                "latency_p25_ms": e.latency_ms, "median_ms": e.median_ms, "p10_ms": e.p10_ms, "p90_ms": e.p90_ms,
                "runs": e.runs, "level": e.level} for e in entries]
    if csv_path:
        write_csv(pd.DataFrame(records), csv_path)
        if csv_path == "-":
            return  # stdout carries the CSV alone
        Console(stderr=True).print(f"[dim]wrote {csv_path}[/dim]", highlight=False)
    h = table.header
    console = stdout_console()
    versions = ", ".join(f"{k} {v}" for k, v in sorted(h.versions.items()))
    device = ", ".join(f"{k}: {v}" for k, v in h.device.items())
    console.print(f"[bold]{path}[/bold]\nbackend {h.backend} ({versions}), {h.precision.upper()}, {h.threads} "
                  f"thread(s), batch {h.batch}\n"
                  f"device {device}\nprotocol {h.protocol}\n{len(table.entries)} entries", highlight=False)
    if table.calibrations:
        cal = Table(title="calibrations: whole = a x blocks sum + b x params + c (p25)", box=box.SIMPLE_HEAD,
                    header_style="bold")
        for name in ("seed", "resolution", "params", "blocks sum p25 ms", "measured p25 ms", "a", "b ms/Mparam",
                     "c ms", "networks", "seed factor", "model"):
            cal.add_column(name, justify="left" if name == "seed" else "right", no_wrap=name == "seed")
        for c in table.calibrations.values():
            cal.add_row(c.spec_name, str(c.resolution), f"{c.params:,}", f"{c.raw_ms:.3f}", f"{c.measured_ms:.3f}",
                        f"{c.a:.3f}", f"{c.b_ms_per_mparam:.3f}", f"{c.c_ms:+.3f}", str(c.networks), f"{c.factor:.3f}",
                        c.model)
        console.print(cal)
        for c in table.calibrations.values():
            console.print(f"{c.spec_name}: held-out seed-relative error by model: {heldout_text(c)}",
                          highlight=False)
    if limit and records:
        out = Table(title=f"entries ({min(limit, len(records))} of {len(records)}; latency = p25, divided by level: "
                          f"the anchors' time when the entry was timed / their time in the table)",
                    box=box.SIMPLE_HEAD, header_style="bold")
        columns = list(records[0])
        for name in columns:
            out.add_column(name, justify="left" if name in ("kind", "nl") else "right")
        for rec in records[:limit]:
            out.add_row(*[f"{v:.4f}" if isinstance(v, float) else ("yes" if v is True else "-" if v is False
                                                                    else str(v)) for v in rec.values()])
        console.print(out)
