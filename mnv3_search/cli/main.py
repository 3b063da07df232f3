"""The `mnv3-search` command: parse options, call the library, render with rich. Nothing imports it.

`--help` stays fast: this module imports neither torch nor the command modules; each command's module
(and with it torch) is imported when that command runs or shows its own help.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import click

from .options import (BATCH_HELP, CSV_HELP, THREADS_HELP, WEIGHTS_HELP, backend_option, precision_option,
                      resolution_option, runner_options)
from ..errors import UserError

if TYPE_CHECKING:
    from rich.console import Console

    from ..model.build import MobileNetV3
    from ..profile import Profile
    from ..spec.arch import ArchSpec

# name: (module, attribute, the command's first help line); tests/cli/test_cli.py keeps the line equal to the real one
LAZY_COMMANDS = {
    "compare": (".report", "compare",
                "Compare specs and NetAdapt run folders side by side; the first is the baseline."),
    "explore": (".explore", "explore",
                "Search the choices written in a YAML space (cells holding lists) under a budget, with Optuna."),
    "export": (".report", "export",
               "Write SPEC or a run's final network as ONNX or TorchScript with batch norm folded."),
    "lut": (".lut", "lut", "Per-block latency lookup table for this device (build, check, show)."),
    "netadapt": (".netadapt", "netadapt",
                 "Shrink SPEC (default: the shipped Large) step by step until it meets a budget."),
    "report": (".report", "report",
               "Summarise a NetAdapt run folder and plot it; a folder of runs gives one Pareto plot."),
    "train": (".train", "train", "Train SPEC on a dataset and write a run folder with weights and metrics."),
    "worker": (".netadapt", "worker",
               "Join a NetAdapt run: claim its enqueued proposals, fine-tune and score them, until it finishes."),
}


class UserErrorGroup(click.Group):
    """Turns a UserError anywhere below into one line on stderr and exit status 2 (no traceback), and
    imports a command's module only when that command is used."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.ClickException(str(exc)).show()  # "Error: ..." on stderr, as click prints its own errors
            raise click.exceptions.Exit(exc.exit_code) from None  # 2: bad input; 3: budget unreachable

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name not in self.commands and name in LAZY_COMMANDS:
            module, attribute, _ = LAZY_COMMANDS[name]
            self.add_command(getattr(importlib.import_module(module, __package__), attribute), name)
        return self.commands.get(name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from the static first lines, so `mnv3-search --help` imports no command module."""
        rows = []
        for name in self.list_commands(ctx):
            command = self.commands.get(name)
            if command is not None and command.hidden:
                continue
            text = command.get_short_help_str(formatter.width) if command is not None else LAZY_COMMANDS[name][2]
            rows.append((name, text))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=UserErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mnv3-search")
def cli() -> None:
    """Explore MobileNetV3 architectures and fit them to a latency budget.

    \b
    Examples:
      mnv3-search profile large.yaml
      mnv3-search profile small --resolution 160 --csv small.csv
    """


def _model(spec: "ArchSpec", weights: Optional[str], path: Path, err: "Console") -> "MobileNetV3":
    from ..model.build import build_model
    from ..model.weights import load_weights

    model = build_model(spec)
    if weights:
        note = load_weights(model, weights, spec_name=str(path))
        if note:
            err.print(note, highlight=False, soft_wrap=True)
    return model


def _fmt_int(value: Any) -> str:
    return "" if value is None else f"{value:,}"


def _fmt_macs(value: int) -> str:
    return f"{value / 1e6:.2f}M"


def _render_profile(profile: "Profile", console: "Console") -> None:
    from rich import box
    from rich.table import Table

    timed = profile.whole is not None
    predicted = profile.prediction is not None
    table = Table(title=f"{profile.spec_name} at {profile.resolution}x{profile.resolution}, batch {profile.batch}",
                  header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    names = ["block", "in→out", "k", "s", "exp", "SE", "NL", "output", "params", "MAdds"]
    names += ["median ms", "share"] if timed else []
    names += ["lut p25 ms"] if predicted else []
    for name in names:
        table.add_column(name, justify="left" if name == "block" else "right", no_wrap=True)
    for r in profile.rows:
        cells = [r.block, f"{r.in_channels}→{r.out_channels}", _fmt_int(r.kernel), _fmt_int(r.stride),
                 _fmt_int(r.exp), "" if r.se is None else ("yes" if r.se else "-"), r.nl, r.output_size,
                 _fmt_int(r.params), _fmt_macs(r.macs)]
        if timed:
            cells += [f"{r.latency_ms:.3f}", f"{100 * (r.latency_share or 0):.1f}%"]
        if predicted:
            cells += [f"{r.lut_ms:.3f}"]
        table.add_row(*cells)
    total = ["total", "", "", "", "", "", "", "", _fmt_int(profile.params), _fmt_macs(profile.macs)]
    if timed:
        total += [f"{profile.blocks_latency_ms:.3f}", "100.0%"]
    if profile.prediction is not None:
        total += [f"{profile.prediction.raw_ms:.3f}"]
    table.add_section()
    table.add_row(*total, style="bold")
    console.print(table)
    console.print(f"params {profile.params:,} · MAdds (conv + linear) {profile.macs:,} ({_fmt_macs(profile.macs)}) · "
                  f"fvcore total (also counts BN, pooling) {profile.fvcore_total:,}", highlight=False)
    if timed:
        w = profile.whole
        assert w is not None
        threads = f"{profile.threads} thread{'s' if profile.threads != 1 else ''}"
        console.print(
            f"latency ({profile.backend} {profile.precision.upper()}"
            f"{f' on {profile.device}' if profile.device else ''}, {threads}, batch {profile.batch}): whole "
            f"network median "
            f"[bold]{w.median_ms:.3f} ms[/bold] (p10–p90 {w.p10_ms:.3f}–{w.p90_ms:.3f}, {w.repeats} runs); "
            f"blocks timed alone sum to {profile.blocks_latency_ms:.3f} ms", highlight=False)
    if predicted:
        p = profile.prediction
        assert p is not None
        source = f"factor {p.factor:.3f} from seed {p.calibration}" if p.calibration else "uncalibrated (factor 1)"
        console.print(f"lookup table: blocks (p25) sum to {p.raw_ms:.3f} ms; predicted whole network "
                      f"[bold]{p.calibrated_ms:.3f} ms[/bold] ({source})", highlight=False)


@cli.command()
@click.argument("spec", default="large", metavar="[SPEC]")
@resolution_option()
@click.option("--width", type=float, help="Width multiplier (paper/TF/timm semantics); default: the spec's.")
@click.option("--num-classes", type=click.IntRange(min=1), help="Classifier outputs; default: the spec's.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help=BATCH_HELP)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help=THREADS_HELP)
@backend_option()
@precision_option()
@runner_options
@click.option("--no-latency", is_flag=True, help="Skip latency measurement (params and MACs only).")
@click.option("--weights", type=click.Path(dir_okay=False), help=WEIGHTS_HELP)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, allow_dash=True),
              help=CSV_HELP + " With '-', the CSV replaces the table on stdout.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
@click.option("--lut", "lut_path", is_flag=False, flag_value="", default=None, type=click.Path(dir_okay=False),
              metavar="[FILE]", help="Add each block's predicted latency (p25) from a latency table: FILE, or "
              "with no FILE this machine's table (see `lut show`); missing entries are measured and kept.")
def profile(spec: str, resolution: Optional[int], width: Optional[float], num_classes: Optional[int], batch: int,
            threads: int, backend: str, precision: str, runner: Optional[str], runner_device: Optional[str],
            no_latency: bool, weights: Optional[str], csv_path: Optional[str], as_json: bool,
            lut_path: Optional[str]) -> None:
    """Params, MAdds (fvcore) and measured latency of every block of SPEC.

    SPEC is a YAML file or a shipped search space (large, small, large.yaml); default: large. Latency
    is the median of the runs (the lookup table's column is the 25th percentile, as the table stores).

    \b
    Examples:
      mnv3-search profile large.yaml
      mnv3-search profile search_spaces/small.yaml --width 0.75 --no-latency
      mnv3-search profile large --backend torch --threads 2 --csv large.csv
      mnv3-search profile small --resolution 160 --json > small.json
      mnv3-search profile large --lut
      mnv3-search profile small --precision int8 --backend executorch
      mnv3-search profile small --runner 'python scripts/runners/local_onnxruntime.py {model} --runs {runs}'
      mnv3-search profile small --no-latency --csv - | head
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .common import load_spec_argument, stdout_console
    from ..latency import LatencyTable, default_table_path, make_backend, spec_keys
    from ..profile import attach_prediction, profile_model
    from ..fileio import write_csv
    from ..report.frames import profile_frame

    err = Console(stderr=True)
    quiet_stdout = as_json or csv_path == "-"  # stdout carries data: no table, no progress bars
    arch, path = load_spec_argument(spec, err, resolution=resolution, width=width, num_classes=num_classes)
    model = _model(arch, weights, path, err)
    latency_backend = None
    if not no_latency or lut_path is not None:
        latency_backend = make_backend(backend, threads, precision, runner=runner, runner_device=runner_device)
        latency_backend.fingerprint()  # a runner's device is asked now: a bad runner fails before any work
    if latency_backend is None or no_latency:
        result = profile_model(model, batch=batch)
    else:
        with Progress(TextColumn("timing {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=err, transient=True, disable=quiet_stdout) as bar:
            task = bar.add_task("", total=len(arch.blocks) + 4)
            result = profile_model(model, batch=batch, backend=latency_backend,
                                   progress=lambda name: bar.update(task, description=name, advance=1))
    result.meta = {"spec_file": str(path), "width": arch.width, "num_classes": arch.num_classes,
                   "latency_statistic": "median"}
    if lut_path is not None:
        assert latency_backend is not None  # made above whenever --lut is given
        table = LatencyTable.open(lut_path or default_table_path(latency_backend, batch), latency_backend, batch)
        err.print(f"[dim]table: {table.path} ({len(table.entries)} entries)[/dim]", highlight=False)
        with Progress(TextColumn("lookup table {task.description}"), BarColumn(), TimeElapsedColumn(), console=err,
                      transient=True, disable=quiet_stdout) as bar:
            task = bar.add_task("", total=None)

            def table_progress(done: float, total: float, what: str) -> None:
                bar.update(task, completed=done, total=total, description=what)

            table.ensure((key for _, key in spec_keys(arch)), table_progress)
        attach_prediction(result, table, arch)
    if csv_path:
        frame = profile_frame(result)
        if result.prediction is not None:
            frame["lut_p25_ms"] = [r.lut_ms for r in result.rows] + [result.prediction.calibrated_ms]
        write_csv(frame, csv_path)
        if csv_path != "-":
            err.print(f"[dim]wrote {csv_path}[/dim]", highlight=False)
    if as_json:
        click.echo(json.dumps(_profile_json(result.as_dict()), indent=2))
    elif csv_path != "-":
        _render_profile(result, stdout_console())


def _profile_json(data: dict[str, Any]) -> dict[str, Any]:
    """Numbers as numbers: a row's output_size "112x112" becomes [112, 112] (the classifier's "1000": [1000])."""
    for row in data.get("rows", []):
        size = row.get("output_size")
        if isinstance(size, str):
            row["output_size"] = [int(v) for v in size.split("x")]
    if data.get("lut") is not None:
        data["lut"]["statistic"] = "p25"
    return data


def main() -> None:
    cli(prog_name="mnv3-search")


if __name__ == "__main__":
    main()  # click exits with the command's status itself
