"""Architecture exploration with Optuna over the choices written in a YAML search space.

A search space is a spec file in which some cells hold a list of choices (kernel `[3, 5]`, exp `[64, 72, 96]`,
SE `[true, false]`, width `[0.75, 1.0]`...). `load_space` finds and validates them (each option is checked by
the concrete loader, so mistakes read as they do for a spec); `SearchSpace.sample(trial)` draws a concrete
ArchSpec. `run_explore` runs the study: each trial samples a spec, computes its budgeted figure (latency
predicted by the calibrated lookup table, or exact MACs/params) and records it as an Optuna constraint
(`trial.set_constraint`: feasible when <= 0). A trial over budget is rejected without training (it stays in
the study as an infeasible trial, which TPE learns from); the others are trained briefly on the data and
scored on the holdout, reporting to a median pruner that stops hopeless ones (single objective only).
`multi_objective` maximises accuracy and minimises the budgeted figure and keeps the Pareto front.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
import pandas as pd

from .budget import LATENCY, MACS, parse_budget
from .model.counts import spec_macs, spec_params
from .data import load_dataset
from .errors import SpecError, UserError
from .fileio import PathLike, atomic_write_text
from .latency import LatencyTable, make_backend, open_for_run, table_record, torch_threads
from .prune.variants import calibration_companions
from .settings import setting
from .model.build import build_model
from .netadapt.study import make_storage
from .fileio import write_csv
from .spec.spaces import resolve_spec_path
from .spec.arch import ArchSpec
from .spec.yaml_io import dump_spec, find_choices, read_yaml, spec_from_dict
from .train import train

CONSTRAINT = "budget"  # (figure - budget) / budget: feasible when <= 0
TRIAL_COLUMNS_FIXED = ["trial", "state", "feasible", "macs", "params", "predicted_latency_ms", "holdout_accuracy",
                       "steps", "seconds", "pareto"]


@dataclass(frozen=True)
class Choice:
    name: str  # the Optuna parameter name, e.g. "b3.k", "width", "stem.out"
    where: str  # in words, as errors say it: "bneck row 3, field 'k'"
    path: tuple
    options: tuple


def _choice_name(path: tuple) -> str:
    if path[0] == "bneck":
        from .spec.yaml_io import ROW_FIELDS

        field = ROW_FIELDS[path[2]] if isinstance(path[2], int) else path[2]
        return f"b{path[1] + 1}.{field}"
    return ".".join(str(p) for p in path)


def _set(data: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


class SearchSpace:
    """A parsed YAML with list cells; every option has been checked with the concrete loader."""

    def __init__(self, data: dict, source: str) -> None:
        self.data = data
        self.source = source
        self.choices: list[Choice] = []
        for path, where, options in find_choices(data):
            if not options:
                raise SpecError(f"{source}: {where}: an empty list of choices; give at least one value")
            hashable = [json.dumps(o) for o in options]
            if len(set(hashable)) != len(hashable):
                raise SpecError(f"{source}: {where}: the choices {options!r} repeat a value")
            if any(isinstance(o, (list, dict)) for o in options):
                raise SpecError(f"{source}: {where}: choices must be plain values, got {options!r}")
            self.choices.append(Choice(_choice_name(path), where, path, tuple(options)))
        for choice in self.choices:  # each option alone (the others at their first option) must give a network
            for option in choice.options:
                try:
                    self.concrete({c.name: (option if c is choice else c.options[0]) for c in self.choices})
                except SpecError as exc:
                    raise SpecError(f"{exc} (with the choice {option!r} of {choice.where}: {list(choice.options)!r})"
                                    ) from None

    @property
    def size(self) -> int:
        n = 1
        for c in self.choices:
            n *= len(c.options)
        return n

    def concrete(self, values: dict[str, Any]) -> ArchSpec:
        data = copy.deepcopy(self.data)
        for c in self.choices:
            _set(data, c.path, values[c.name])
        return spec_from_dict(data, self.source)

    def base(self) -> ArchSpec:
        """Every choice at its first option: the reference for relative budgets."""
        return self.concrete({c.name: c.options[0] for c in self.choices})

    def sample(self, trial: optuna.Trial) -> ArchSpec:
        return self.concrete({c.name: trial.suggest_categorical(c.name, list(c.options)) for c in self.choices})


def load_space(path: PathLike) -> SearchSpace:
    """Read a YAML search space (a spec whose cells may hold lists of choices)."""
    source = str(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        spec_from_dict(data, source)  # raises the concrete loader's one-line message
    return SearchSpace(data, source)


@dataclass(frozen=True)
class ExploreConfig:
    """The settings of one exploration; the same settings resume it. Fields declared with `setting()` are the
    `explore` command's options, in the order of its --help (settings.py)."""

    spec_path: str
    budget: str
    trials: int = setting(20, "Trials in the study in all (a resumed study runs only the missing ones).", minimum=1)
    multi_objective: bool = setting(False, "Maximise accuracy and minimise the budgeted figure: keep the Pareto "
                                    "front (no pruning: Optuna's pruners are single-objective).")
    data: str = setting("digits")
    steps: int = setting(60, "Training steps per trial.", minimum=1)
    reports: int = setting(3, "Holdout evaluations per trial (the median pruner's rungs).", minimum=1)
    lr: float = setting(0.05, "Learning rate of each trial's training.")
    batch_size: int = setting(64)
    train_resolution: int = setting(32)
    resolution: Optional[int] = setting(None)  # deployment resolution override (latency is predicted there)
    limit: Optional[int] = setting(None)
    lut: Optional[str] = setting(None)
    backend: str = setting("onnxruntime")
    seed: int = setting(0)
    threads: int = setting(1)
    holdout: float = 0.15  # no option: trials are scored on a fixed share of the images

    def __post_init__(self) -> None:
        for name in ("trials", "steps", "reports", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.reports > self.steps:
            raise UserError(f"--reports ({self.reports}) cannot exceed --steps ({self.steps})")


@dataclass
class ExploreResult:
    out: Path
    trials: pd.DataFrame
    chosen: list[tuple[int, Path]]  # (trial number, YAML written): the best, or every Pareto member
    budget_value: float
    resource: str


def run_explore(config: ExploreConfig, out: PathLike, storage: Optional[str] = None,
                on_trial: Optional[Callable[[dict], None]] = None) -> ExploreResult:
    """Run (or resume) the exploration study; write trials.csv and the chosen specs' YAML into `out`."""
    path = resolve_spec_path(config.spec_path)
    space = load_space(path)
    if not space.choices:
        raise UserError(f"{path}: nothing to explore: the spec has no list cells (e.g. k: [3, 5]); write choices "
                        f"as lists, or use `mnv3-search netadapt` to adapt one network")
    budget = parse_budget(config.budget)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(config.data, resolution=config.train_resolution, holdout=config.holdout, seed=config.seed,
                           limit=config.limit)

    def finish(spec: ArchSpec) -> ArchSpec:
        return spec.with_overrides(resolution=config.resolution, num_classes=dataset.num_classes,
                                   where=f"{path} with the given options")

    table: Optional[LatencyTable] = None
    base = finish(space.base())
    if budget.resource == LATENCY:
        table = open_for_run(config.lut, make_backend(config.backend, config.threads), base,
                             calibration_companions(base))

    def figure(spec: ArchSpec) -> tuple[float, dict[str, Any]]:
        attrs: dict[str, Any] = {"macs": spec_macs(spec), "params": spec_params(spec)}
        if table is not None:
            attrs["predicted_latency_ms"] = table.predict(spec).calibrated_ms
        return float(attrs[budget.resource if budget.resource != LATENCY else "predicted_latency_ms"]), attrs

    limit = budget.target(figure(base)[0])
    storage_url = storage or str((out / "study.journal").resolve())
    maximize, minimize = optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE
    directions = [maximize, minimize] if config.multi_objective else [maximize]
    sampler = optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=min(10, config.trials))
    pruner = optuna.pruners.NopPruner() if config.multi_objective else optuna.pruners.MedianPruner(
        n_startup_trials=2, n_warmup_steps=0)
    study = optuna.create_study(storage=make_storage(storage_url), study_name=out.resolve().name, sampler=sampler,
                                pruner=pruner, directions=directions, load_if_exists=True)
    config_now = asdict(config)
    settings = {"config": config_now, "space": str(path), "budget_value": limit, "resource": budget.resource}
    stored = study.user_attrs.get("explore")
    diffs = [] if stored is None else [k for k in config_now
                                       if k != "trials" and config_now[k] != stored["config"].get(k)]
    if stored is None:
        study.set_user_attr("explore", settings)
    elif diffs:
        raise UserError(f"{out}: holds an exploration with other settings ({', '.join(diffs[:3])}); use another "
                        f"--out or the same options to resume it")
    else:
        limit = float(stored["budget_value"])  # the budget a resumed study was run under
    every = max(1, config.steps // config.reports)

    def objective(trial: optuna.Trial):
        spec = finish(space.sample(trial))
        value, attrs = figure(spec)
        for key, v in attrs.items():
            trial.set_user_attr(key, v)
        trial.set_constraint(CONSTRAINT, (value - limit) / limit)
        if value > limit:  # rejected by prediction: no training
            trial.set_user_attr("rejected", True)
            return (0.0, value) if config.multi_objective else 0.0
        model = build_model(spec)

        def report(step: int, accuracy: float) -> bool:
            if not config.multi_objective:
                trial.report(accuracy, -(-step // every))
                if step < config.steps and trial.should_prune():  # at the last step the work is done: keep it
                    raise optuna.TrialPruned()
            return False

        start = time.perf_counter()
        result = train(model, dataset, config.steps, lr=config.lr, batch_size=config.batch_size,
                       seed=config.seed + trial.number, warmup=max(1, config.steps // 10), eval_every=every,
                       report=report)
        accuracy = float(result.accuracy or 0.0)
        trial.set_user_attr("holdout_accuracy", accuracy)
        trial.set_user_attr("steps", result.steps)
        trial.set_user_attr("seconds", time.perf_counter() - start)
        return (accuracy, value) if config.multi_objective else accuracy

    def callback(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        if on_trial:
            on_trial({"trial": frozen.number, "state": frozen.state.name, **frozen.params, **frozen.user_attrs})

    done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    remaining = config.trials - len(done)
    if remaining > 0:
        with torch_threads(config.threads):
            study.optimize(objective, n_trials=remaining, callbacks=[callback], catch=())
    used = None
    if table is not None:
        used = table_record(table)
        used["entries_measured"] = table.measured  # by this invocation: 0 when the machine's table had them all
    return _write_outputs(study, space, finish, out, limit, budget.resource, config.multi_objective, used)


def _write_outputs(study: optuna.Study, space: SearchSpace, finish: Callable[[ArchSpec], ArchSpec], out: Path,
                   limit: float, resource: str, multi: bool, table: Optional[dict] = None) -> ExploreResult:
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    feasible = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE
                and not t.user_attrs.get("rejected") and t.constraints.get(CONSTRAINT, 1.0) <= 0]
    if multi:
        chosen = [t for t in study.best_trials if not t.user_attrs.get("rejected")]
    else:
        scored = [(t.value, t) for t in feasible if t.value is not None]  # every COMPLETE trial has a value
        chosen = [max(scored, key=lambda pair: pair[0])[1]] if scored else []
    chosen_numbers = {t.number for t in chosen}
    rows = []
    for t in trials:
        rows.append({
            "trial": t.number, "state": "REJECTED" if t.user_attrs.get("rejected") else t.state.name,
            "feasible": t.constraints.get(CONSTRAINT, 1.0) <= 0, "macs": t.user_attrs.get("macs"),
            "params": t.user_attrs.get("params"), "predicted_latency_ms": t.user_attrs.get("predicted_latency_ms"),
            "holdout_accuracy": t.user_attrs.get("holdout_accuracy"), "steps": t.user_attrs.get("steps"),
            "seconds": t.user_attrs.get("seconds"), "pareto": t.number in chosen_numbers,
            **{c.name: t.params.get(c.name) for c in space.choices},
        })
    frame = pd.DataFrame(rows, columns=TRIAL_COLUMNS_FIXED + [c.name for c in space.choices])
    write_csv(frame, out / "trials.csv")
    written = []
    folder = out / ("pareto" if multi else "")
    for t in sorted(chosen, key=lambda t: t.number):
        spec = finish(space.concrete(t.params))
        target = folder / f"trial-{t.number:04d}.yaml" if multi else out / "best.yaml"
        dump_spec(spec, target)
        written.append((t.number, target))
    atomic_write_text(out / "explore.json", json.dumps({
        "space": space.source, "budget_value": limit, "resource": resource, "multi_objective": multi,
        "trials": len(trials), "chosen": [{"trial": n, "yaml": str(p)} for n, p in written],
        "latency_table": table}, indent=2) + "\n")
    return ExploreResult(out, frame, written, limit, resource)


RESOURCES_HELP = f"{LATENCY} (predicted), {MACS} or params"
