"""The `mnv3-search` command: parse options, call the library, render with rich. Nothing imports it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import click
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .common import load_spec_argument, stdout_console
from ..errors import UserError
from ..latency.measure import BACKENDS, make_backend
from ..latency.table import LatencyTable, spec_keys
from ..model.build import MobileNetV3, build_model
from ..profile import Profile, attach_prediction, profile_model
from ..report.frames import profile_frame, write_csv
from ..spec.arch import ArchSpec
from ..model.weights import load_weights


class UserErrorGroup(click.Group):
    """Turns a UserError anywhere below into one line on stderr and exit status 2 (no traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            error = click.ClickException(str(exc))
            error.exit_code = 2
            raise error from None


@click.group(cls=UserErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mnv3-search")
def cli() -> None:
    """Explore MobileNetV3 architectures and fit them to a latency budget.

    \b
    Examples:
      mnv3-search profile large.yaml
      mnv3-search profile small --resolution 160 --csv small.csv
    """


def _model(spec: ArchSpec, weights: Optional[str], path: Path) -> MobileNetV3:
    model = build_model(spec)
    if weights:
        load_weights(model, weights, spec_name=str(path))
    return model


def _fmt_int(value: Any) -> str:
    return "" if value is None else f"{value:,}"


def _fmt_macs(value: int) -> str:
    return f"{value / 1e6:.2f}M"


def _render_profile(profile: Profile, console: Console) -> None:
    timed = profile.whole is not None
    predicted = profile.prediction is not None
    table = Table(title=f"{profile.spec_name} at {profile.resolution}x{profile.resolution}, batch {profile.batch}",
                  header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    names = ["block", "in→out", "k", "s", "exp", "SE", "NL", "output", "params", "MAdds"]
    names += ["ms", "share"] if timed else []
    names += ["lut ms"] if predicted else []
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
    if predicted:
        total += [f"{profile.prediction.raw_ms:.3f}"]  # type: ignore[union-attr]
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
            f"latency ({profile.backend}, {threads}, batch {profile.batch}): whole network median "
            f"[bold]{w.median_ms:.3f} ms[/bold] (p10–p90 {w.p10_ms:.3f}–{w.p90_ms:.3f}, {w.repeats} runs); "
            f"blocks timed alone sum to {profile.blocks_latency_ms:.3f} ms", highlight=False)
    if predicted:
        p = profile.prediction
        assert p is not None
        source = f"factor {p.factor:.3f} from seed {p.calibration}" if p.calibration else "uncalibrated (factor 1)"
        console.print(f"lookup table: blocks (p25) sum to {p.raw_ms:.3f} ms; predicted whole network "
                      f"[bold]{p.calibrated_ms:.3f} ms[/bold] ({source})", highlight=False)


@cli.command()
@click.argument("spec", default="large", metavar="SPEC")
@click.option("--resolution", type=int, help="Input size in pixels (square); default: the spec's.")
@click.option("--width", type=float, help="Width multiplier (paper/TF/timm semantics); default: the spec's.")
@click.option("--num-classes", type=int, help="Classifier outputs; default: the spec's.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size for latency.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads for the latency backend.")
@click.option("--backend", type=click.Choice(sorted(BACKENDS)), default="onnxruntime", show_default=True,
              help="Latency backend.")
@click.option("--no-latency", is_flag=True, help="Skip latency measurement (params and MACs only).")
@click.option("--weights", type=click.Path(dir_okay=False), help="Checkpoint to load (torchvision or own).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write the table as CSV to FILE.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
@click.option("--lut", "lut_path", type=click.Path(dir_okay=False),
              help="Latency table (see `lut build`): adds each block's predicted latency (missing entries are "
                   "measured and cached).")
def profile(spec: str, resolution: Optional[int], width: Optional[float], num_classes: Optional[int], batch: int,
            threads: int, backend: str, no_latency: bool, weights: Optional[str], csv_path: Optional[str],
            as_json: bool, lut_path: Optional[str]) -> None:
    """Params, MAdds (fvcore) and measured latency of every block of SPEC.

    SPEC is a YAML file or a shipped search space (large, small, large.yaml).

    \b
    Examples:
      mnv3-search profile large.yaml
      mnv3-search profile search_spaces/small.yaml --width 0.75 --no-latency
      mnv3-search profile large --backend torch --threads 2 --csv large.csv
      mnv3-search profile small --resolution 160 --json > small.json
      mnv3-search profile large --lut results/lut/my_table.json
    """
    err = Console(stderr=True)
    arch, path = load_spec_argument(spec, err, resolution=resolution, width=width, num_classes=num_classes)
    model = _model(arch, weights, path)
    latency_backend = None if no_latency else make_backend(backend, threads)
    if latency_backend is None:
        result = profile_model(model, batch=batch)
    else:
        with Progress(TextColumn("timing {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=err, transient=True, disable=as_json) as bar:
            task = bar.add_task("", total=len(arch.blocks) + 4)
            result = profile_model(model, batch=batch, backend=latency_backend,
                                   progress=lambda name: bar.update(task, description=name, advance=1))
    result.meta = {"spec_file": str(path), "width": arch.width, "num_classes": arch.num_classes}
    if lut_path:
        table = LatencyTable.open(lut_path, make_backend(backend, threads), batch)
        with Progress(TextColumn("lookup table {task.description}"), BarColumn(), TimeElapsedColumn(), console=err,
                      transient=True, disable=as_json) as bar:
            task = bar.add_task("", total=None)
            table_progress = lambda done, total, what: bar.update(task, completed=done, total=total,  # noqa: E731
                                                                  description=what)
            table.ensure((key for _, key in spec_keys(arch)), table_progress)
        attach_prediction(result, table, arch)
    if csv_path:
        frame = profile_frame(result)
        if result.prediction is not None:
            frame["lut_ms"] = [r.lut_ms for r in result.rows] + [result.prediction.calibrated_ms]
        write_csv(frame, csv_path)
        err.print(f"[dim]wrote {csv_path}[/dim]", highlight=False)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        _render_profile(result, stdout_console())


from .lut import lut  # noqa: E402
cli.add_command(lut)
from .train import train  # noqa: E402
cli.add_command(train)
from .netadapt import netadapt, worker  # noqa: E402
cli.add_command(netadapt)
cli.add_command(worker)
from .report import compare, export, report  # noqa: E402
cli.add_command(compare)
cli.add_command(export)
cli.add_command(report)
from .explore import explore  # noqa: E402
cli.add_command(explore)


def main() -> None:
    cli(prog_name="mnv3-search")


if __name__ == "__main__":
    sys.exit(main())
