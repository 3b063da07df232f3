"""`mnv3-search netadapt` and `mnv3-search worker`: thin over mnv3_search.netadapt, rendered with rich."""

from __future__ import annotations

import json
import math
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional, assert_never

import click
from click.core import ParameterSource
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from .options import device_option, threads_option, use_device
from .settings import config_options
from ..budget import LATENCY
from ..errors import UserError
from ..latency import torch_threads
from ..netadapt.config import RunConfig
from ..netadapt.events import EventKind
from ..netadapt.runfolder import RunFolder
from ..netadapt.runner import NetAdapt
from ..netadapt.study import STORAGE_ENV, redact
from ..netadapt.worker import join_run

IMPORTANCE_NAMES = {"taylor": "Taylor", "l1": "L1 norm", "l2": "L2 norm", "bn": "BN scale"}  # as the event line says


class NetAdaptView:
    """A live panel: iteration, current vs budget, accuracy, proposals done / pruned / remaining, ETA."""

    def __init__(self, console: Console, budget: str) -> None:
        self.console = console
        self.budget = budget
        self.state: dict[str, Any] = {"phase": "starting"}
        self.started = time.perf_counter()
        self.iteration_seconds: list[float] = []
        self.live = Live(self.render(), console=console, refresh_per_second=4, transient=False)

    def __enter__(self) -> "NetAdaptView":
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.update(self.render())
        self.live.__exit__(*exc)

    def __call__(self, kind: EventKind, **info: Any) -> None:
        s = self.state
        if kind == "seed":
            s.update(current=info["value"], target=info["target"], unit=info["unit"])
        elif kind == "iteration":
            s.update(iteration=info["iteration"], goal=info["goal"], current=info["current"], total=info["proposals"],
                     done=0, pruned=0)
        elif kind == "progress":
            s.update(done=info["done"], pruned=info["pruned"], total=info["total"], rung=info["rung"],
                     rungs=info["rungs"], running=info["running"])
        elif kind == "chosen":
            self.iteration_seconds.append(info["wall_seconds"])
            s.update(chosen=info["proposal"], accuracy=info["holdout_accuracy"], current=info["resource"])
            s["history"] = s.get("history", []) + [info]
        s["phase"] = self.phase(kind, info)
        self.live.update(self.render())

    def phase(self, kind: EventKind, info: dict[str, Any]) -> str:
        """The panel's "now" line for every kind of event (mypy checks that none is missing)."""
        match kind:
            case "resume":
                return f"resuming the run in {info['run_dir']}"
            case "already_finished":
                return f"{info['run_dir']} holds a finished run: nothing to train"
            case "nothing_to_do":
                return "nothing to do: the seed already meets the budget"
            case "transfer":
                return "seed weights from --weights, final layer replaced (another class count)"
            case "seed_training":
                return f"training the seed ({info['epochs']} epochs)"
            case "seed_step":
                return f"training the seed: step {info['step']}, loss {info['loss']:.3f}"
            case "calibrating":
                return "measuring the seed and calibrating the latency table"
            case "seed":
                return f"seed at {self._amount(info['value'])}"
            case "iteration":
                return "fine-tuning proposals"
            case "progress":
                return "fine-tuning proposals"
            case "retry":
                return "a worker went silent: its proposal was enqueued again"
            case "recovered":
                return "a trial's files were unreadable: its proposal is trained again from its parent"
            case "chosen":
                return "choosing"
            case "unreliable":
                return (f"timing disturbed by the host (ratio moved {100 * info['ratio_shift']:.1f} %): "
                        f"measuring again ({info['attempt']})")
            case "confirm":
                return (f"measured {info['measured']:.3f} ms (seed {info['seed_measured']:.3f} ms"
                        + ("" if info.get("reliable", True) else ", host disturbed: marked unreliable") + "): "
                        + ("budget met" if info["ok"] else "over budget, going on"))
            case "disagreement":
                return (f"the measurement disagreed with the table: target corrected to "
                        f"{self._amount(info['corrected_target'])}, going on")
            case "importance":
                over = f", {info['batches']} batches" if info["batches"] else ""
                name = IMPORTANCE_NAMES.get(info["name"], info["name"])
                return f"scoring {info['channels']:,} channels in {info['groups']} groups ({name}{over})"
            case "knapsack":
                timed = "" if self.state.get("unit", "ms") != "ms" else (
                    ", timed beside the seed: " + ("within the budget" if info["ok"] else "over the budget"))
                return f"knapsack round {info['round']}: shape at {self._amount(info['predicted'])}{timed}"
            case "long_finetune":
                if info.get("method") == "retrain":
                    return f"retraining the adapted shape from scratch ({info['epochs']} epochs)"
                return f"long fine-tune ({info['epochs']} epochs)"
            case "long_step":
                return f"long fine-tune: step {info['step']}, loss {info['loss']:.3f}"
            case "finished":
                return f"done: test accuracy {100 * info['test_accuracy']:.1f}%"
            case _:
                assert_never(kind)

    def _amount(self, value: float) -> str:
        unit = self.state.get("unit", "ms")
        return f"{value:.3f} ms" if unit == "ms" else f"{value:,.0f} {unit}"

    def _eta(self) -> str:
        s = self.state
        if not self.iteration_seconds or "current" not in s or "target" not in s or "goal" not in s:
            return "-"
        cut = max(s.get("current", 0) - s["goal"], 1e-9)
        left = max(0, math.ceil((s["current"] - s["target"]) / cut))
        seconds = left * sum(self.iteration_seconds) / len(self.iteration_seconds)
        return time.strftime("%H:%M:%S", time.gmtime(seconds))

    def render(self) -> Group:
        s = self.state
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        table.add_row("budget", self.budget)
        if "current" in s and "target" in s:
            table.add_row("current", f"{self._amount(s['current'])} → target {self._amount(s['target'])}")
        if "iteration" in s:
            table.add_row("iteration", str(s["iteration"]))
            if "rung" in s:
                table.add_row("proposals", f"rung {s['rung'] + 1}/{s['rungs']}: {s['done']} of {s['running']} scored "
                                           f"({s['pruned']} of {s['total']} stopped at earlier rungs)")
            else:
                table.add_row("proposals", f"{s['total']} proposals")
        if "accuracy" in s:
            table.add_row("holdout accuracy", f"{100 * s['accuracy']:.1f}% after {s.get('chosen')}")
        table.add_row("elapsed", time.strftime("%H:%M:%S", time.gmtime(time.perf_counter() - self.started)))
        table.add_row("ETA", self._eta())
        table.add_row("now", s["phase"])
        return Group(table)


def storage_url(storage: Optional[str], storage_file: Optional[str]) -> Optional[str]:
    """The storage URL from --storage (or $MNV3_SEARCH_STORAGE) or --storage-file. A file holding a password
    must be private (chmod 600), as ssh insists for its keys."""
    if not storage_file:
        return storage
    if storage:
        raise UserError(f"--storage and --storage-file both given (--storage may come from ${STORAGE_ENV}); "
                        f"give one")
    path = Path(storage_file)
    try:
        url = path.read_text().strip()
        mode = path.stat().st_mode
    except OSError as exc:
        raise UserError(f"--storage-file {storage_file}: cannot read it ({exc.strerror or exc})") from None
    if not url:
        raise UserError(f"--storage-file {storage_file}: the file is empty; write the storage URL in it")
    if redact(url) != url and mode & 0o077:
        raise UserError(f"--storage-file {storage_file}: holds a password but other users can read it; "
                        f"run chmod 600 {storage_file}")
    return url


STORAGE_HELP = (f"Read from ${STORAGE_ENV} when not given: keep a password off the command line (any user of the "
                "machine reads command lines with ps), or use --storage-file. Passwords are never written.")


def given_settings(ctx: click.Context) -> dict[str, Any]:
    """The run settings (RunConfig fields) typed on the command line or taken from the environment, not
    click's defaults: with --resume these must agree with the run's own."""
    names = {f.name for f in fields(RunConfig)}
    given = {}
    for param, value in ctx.params.items():
        name = "spec_path" if param == "spec" else param
        if name in names and ctx.get_parameter_source(param) in (ParameterSource.COMMANDLINE,
                                                                 ParameterSource.ENVIRONMENT):
            given[name] = value
    return given


ARTIFACTS_HELP = ("Optuna artifact store through which checkpoints travel between the run and its workers: a "
                  "folder, s3://BUCKET/PREFIX (boto3) or gs://BUCKET/PREFIX (google-cloud-storage); credentials "
                  "come from the client's own environment, never from the run")


@click.command()
@click.argument("spec", default="large", metavar="[SPEC]")
@click.option("--budget", help="15ms, 800us, 60% (of the seed's latency), 150M-macs, 3M-params. Required unless "
              "--resume.")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (default results/<spec>-<budget>-seed<N>).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True),
              help="Continue the run in this folder with its own settings.")
@config_options(RunConfig, "data", "evaluation")
@click.option("--storage", envvar=STORAGE_ENV, show_envvar=True,
              help="Optuna storage URL or journal file (default: study.journal in the run folder); "
              "e.g. postgresql://user@host/db, sqlite:///study.db. " + STORAGE_HELP)
@click.option("--storage-file", type=click.Path(dir_okay=False), help="A file (chmod 600) holding the storage URL.")
@click.option("--artifacts", metavar="DIR|URL", help=ARTIFACTS_HELP + " (default: artifacts/ in the run folder).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local processes evaluating proposals (this one included).")
@config_options(RunConfig, "short_steps", "lut")
@device_option()
@config_options(RunConfig, "max_iterations")
@click.option("--stale-after", type=float, default=300.0, show_default=True,
              help="Seconds without a heartbeat before a worker's proposal is retried.")
@click.option("--max-attempts", type=click.IntRange(min=1), default=2, show_default=True,
              help="Evaluations of a proposal whose worker dies before it is marked failed (proposals.csv says "
              "why) and its iteration goes on without it.")
@click.option("--quiet", is_flag=True, help="No live view; one summary line.")
@click.option("--json", "as_json", is_flag=True, help="No live view; the summary as JSON on stdout.")
def netadapt(spec: str, budget: Optional[str], out: Optional[str], resume_dir: Optional[str], storage: Optional[str],
             storage_file: Optional[str], artifacts: Optional[str], workers: int, device: str, stale_after: float,
             max_attempts: int, quiet: bool, as_json: bool, **settings: Any) -> None:
    """Shrink SPEC (default: the shipped Large) step by step until it meets a budget.

    NetAdapt as MobileNetV3 used it: each iteration proposes one smaller network per channel group
    (expansions, residual-coupled outputs, last conv, classifier hidden), sized by the latency table;
    Optuna fine-tunes and scores them on the holdout by successive halving (the best 60 % train on);
    the best dAcc/|dLatency| wins, ties going to the lower holdout loss, then the larger saving.
    Run the same command again (or --resume DIR) to continue an interrupted run.

    \b
    Examples:
      mnv3-search netadapt --budget 90%
      mnv3-search netadapt search_spaces/large.yaml --budget 15ms --data fashion-mnist
      mnv3-search netadapt small --budget 40M-macs --out results/small-40m
      mnv3-search netadapt small --budget 50% --method knapsack --data fashion-mnist
      mnv3-search netadapt small --budget 50% --method hybrid --data fashion-mnist
      mnv3-search netadapt small --budget 50% --precision int8 --data fashion-mnist
      mnv3-search netadapt small --budget 70% --workers 2 --storage postgresql://user@host/db
      mnv3-search netadapt --resume results/small-70pct-seed0
      mnv3-search worker --storage postgresql://user@host/db --study small-70pct-seed0
    """
    use_device(device)  # seed training, proposal fine-tunes (workers too) and the long fine-tune
    storage = storage_url(storage, storage_file)
    if resume_dir:
        if out and Path(out).resolve() != Path(resume_dir).resolve():
            raise UserError(f"--out {out} and --resume {resume_dir} name different folders; --resume continues the "
                            f"run in its folder: give one of them")
        config = RunFolder(resume_dir).resume_config(given_settings(click.get_current_context()))
        out = resume_dir  # the run's storage: run.json's (its password from $MNV3_SEARCH_STORAGE) or --storage
    elif budget is None:
        raise UserError("--budget is required to start a run (15ms, 60%, 150M-macs, 3M-params); "
                        "--resume DIR continues a run with its own settings")
    else:
        config = RunConfig(spec_path=spec, budget=budget, **settings)  # every other option is a setting
    err = Console(stderr=True)
    live = not (quiet or as_json)
    view = NetAdaptView(err, config.budget) if live else None

    def on_event(kind: EventKind, **info: Any) -> None:
        if kind in ("transfer", "recovered"):  # say so even when quiet: another class count, a re-trained trial
            err.print(info["note"], highlight=False, soft_wrap=True, markup=False)
        if view:
            view(kind, **info)

    runner = NetAdapt(config, out=out, storage=storage, workers=workers, stale_seconds=stale_after,
                      on_event=on_event, max_attempts=max_attempts, artifacts=artifacts)
    err.print(f"[dim]spec: {runner.plan.spec_file} · run folder: {runner.folder.path}[/dim]", highlight=False,
              soft_wrap=True)
    with torch_threads(config.threads):
        if view:
            with view:
                result = runner.run()
        else:
            result = runner.run()

    def amount(value: float) -> str:
        return f"{value:.3f} ms" if runner.budget.resource == LATENCY else f"{value:,.0f} {runner.budget.resource}"

    if as_json:
        click.echo(json.dumps(result.as_json(), indent=2))
    elif result.nothing_to_do:
        click.echo(f"nothing to do: the seed already meets the budget ({amount(result.seed_resource)} <= "
                   f"{amount(result.target)}); no network was changed")
    else:
        if result.already_finished:
            click.echo(f"already finished: {result.run_dir} holds a finished run; nothing was trained (a new "
                       f"run needs another --out)")
        measured = (f", measured {result.measured_latency_ms:.3f} ms vs seed "
                    f"{result.seed_measured_latency_ms:.3f} ms" if result.measured_latency_ms else "")
        steps = "knapsack rounds" if config.method == "knapsack" else "iterations"
        accuracy = f"test accuracy {100 * (result.test_accuracy or 0):.1f}%"
        if result.precision != "fp32":
            accuracy = (f"{result.precision.upper()} {accuracy} (FP32 {100 * (result.fp32_test_accuracy or 0):.1f}%)")
            measured = measured.replace("measured", f"measured {result.precision.upper()}", 1)
        click.echo(f"budget met after {result.iterations} {steps}: {amount(result.final_resource or 0)} (target "
                   f"{amount(result.target)}){measured}; {accuracy}; results in {result.run_dir}")


@click.command()
@click.option("--storage", envvar=STORAGE_ENV, show_envvar=True, help="The run's Optuna storage URL. " + STORAGE_HELP)
@click.option("--storage-file", type=click.Path(dir_okay=False), help="A file (chmod 600) holding the storage URL.")
@click.option("--study", "study_name", required=True, help="The run's study name (its run folder's name).")
@click.option("--run-dir", type=click.Path(file_okay=False), help="The run folder as mounted here, to read and "
              "write its files directly (default: the path the run recorded if it is here and no --artifacts is "
              "given; else none is needed: checkpoints travel through the artifact store).")
@click.option("--artifacts", metavar="DIR|URL", help=ARTIFACTS_HELP + " (default: the one the run recorded), as "
              "reached from here; without --run-dir the worker then uses no run folder.")
@click.option("--parent-pid", type=int, hidden=True, help="Exit when this process is gone (local workers).")
@threads_option()
@device_option(inherit=True)
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
def worker(storage: Optional[str], storage_file: Optional[str], study_name: str, run_dir: Optional[str],
           artifacts: Optional[str], parent_pid: Optional[int], threads: int, device: Optional[str],
           quiet: bool) -> None:
    """Join a NetAdapt run: claim its enqueued proposals, fine-tune and score them, until it finishes.

    \b
    Examples:
      mnv3-search worker --storage postgresql://user@host/db --study small-70pct-seed0
      mnv3-search worker --storage postgresql://user@host/db --study small-70pct-seed0 --artifacts s3://bucket/runs
      mnv3-search worker --storage sqlite:////shared/results/run/study.db --study run --run-dir /shared/results/run
      MNV3_SEARCH_STORAGE=postgresql://user:PASSWORD@host/db mnv3-search worker --study small-70pct-seed0
      mnv3-search worker --storage-file ~/.mnv3-storage --study small-70pct-seed0
    """
    storage = storage_url(storage, storage_file)
    if not storage:
        raise UserError(f"no storage: pass --storage URL, --storage-file FILE or set ${STORAGE_ENV}")
    use_device(device)
    err = Console(stderr=True, quiet=quiet)
    loud = Console(stderr=True)  # a re-trained trial is said even when quiet
    join_run(storage, study_name, run_dir, artifacts=artifacts, parent_pid=parent_pid, threads=threads, log=err.print,
             note=lambda line: loud.print(line, highlight=False, soft_wrap=True, markup=False))
