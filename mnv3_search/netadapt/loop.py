"""NetAdapt (Yang et al. 2018, as used by MobileNetV3) guided and recorded by Optuna.

While the network's resource exceeds the budget: target = current - schedule's cut; for every proposal
group, the largest channel count whose child meets the target by the latency table (or by exact MAC/param
counts); the proposals are fine-tuned briefly and scored on the holdout by synchronous successive halving
(every proposal reaches the first rung, the best 60 % by the selection rule go on; each rung of each
proposal is one Optuna trial that continues the previous rung's checkpoint); the selection rule
(selection.py: dAcc / |dLatency| or accuracy; differences within the holdout's standard error tie and go to
the lower holdout loss, then the larger saving, then the group name) picks the winner among the last rung.
With a latency budget every iteration's network is timed beside the seed (the median of `CONFIRM_TIMINGS`):
the first that meets the budget ends the loop, so a table that over-predicts small networks cannot make it cut
past the budget; one that does not corrects the target by predicted / measured and the loop goes on. Then the
long fine-tune and the test accuracy.

Every iteration ends with its chosen network saved and a row in iterations.csv, so running the same
command again resumes after the last finished iteration, reusing the study's finished trials (a rung
interrupted half-way keeps its finished trials; only the trials in flight run again).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import optuna
import torch
from optuna.trial import TrialState

from ..budget import LATENCY, MACS, PARAMS, Budget, parse_budget, parse_schedule
from ..model.counts import spec_macs, spec_params
from ..errors import UserError
from ..fileio import atomic_path
from ..latency.measure import export_onnx, make_backend, torch_threads
from ..latency.table import LatencyTable, open_for_run, relative_to_reference, spec_keys, table_record
from ..model.build import build_model
from ..prune.groups import ProposalGroup, find_group, proposal_groups
from ..spec.spaces import resolve_spec_path
from ..spec.arch import ArchSpec
from ..spec.yaml_io import dump_spec, load_spec, spec_to_yaml
from ..prune.knapsack import TAYLOR_BATCHES, KnapsackProblem, shrink_to, taylor_importance, width_options
from ..prune.surgery import child_spec
from ..train import evaluate, to_memory_format, train_epochs
from ..model.weights import read_state_dict, transfer_state_dict
from .artifacts import RunArtifacts, default_location, open_store
from .attrs import (ARTIFACTS_ATTR, ATTEMPT_ATTR, CONFIG_ATTR, EVAL_ATTR, FAILURE_ATTR, FROM_ATTR, GROUPS_ATTR,
                    ITERATION_ATTR, RUN_DIR_ATTR, RUNG_ATTR, START_ATTR, STOP_ATTR)
from .config import RunConfig
from .events import Event, ignore
from .evaluate import Evaluator, holdout_metrics, load_run_dataset
from .runfolder import IterationRecord, RunFolder, RunSummary
from .selection import Candidate, Ranked, rank, survivors, tolerance
from .study import (claim_lock_path, make_storage, as_storage_lost, claim, create_study, enqueue, iteration_trials,
                    lost_connection, redact, redact_argv, requeue_stale, resolve_storage, set_status, trial_group)

CONFIRM_ATTEMPTS = 3  # whole-network measurements before a disturbed one is used (and marked unreliable)
MIN_CHOICE = 4  # proposals an iteration should choose among; fewer and the cut is halved (see MIN_CUT_SHARE)
MIN_CUT_SHARE = 0.01  # the smallest cut an iteration asks for, as a share of the seed (MobileNetV3's delta)
KNAPSACK_ROUNDS = 8  # --method knapsack: shapes solved and timed beside the seed before the best is taken
KNAPSACK_SLACK = 0.03  # a timed shape this far under the budget is loosened in another round
# each confirmation (a knapsack shape, a NetAdapt iteration's network) is timed beside the seed
# this many times and the median share decides: under load one timing moves 5 %, and choosing the best of
# several single timings would pick a lucky one (over budget when timed again; seen on 2 shared cores: 57.5 %
# once, 62-63 % for a smaller shape in later rounds)
CONFIRM_TIMINGS = 3


class BudgetUnreachable(UserError):
    """The budget cannot be met by this search space; the run folder keeps what was reached."""

    exit_code = 3  # distinct from bad input (2), so scripts can try a looser budget


@dataclass
class RunResult:
    """What `run_netadapt` returns: the run's summary (run.json's "result", same names) plus the final spec."""

    run_dir: Path
    nothing_to_do: bool
    seed_resource: float
    target: float
    final_spec: Optional[ArchSpec] = None
    final_resource: Optional[float] = None
    measured_latency_ms: Optional[float] = None
    seed_measured_latency_ms: Optional[float] = None
    test_accuracy: Optional[float] = None
    iterations: int = 0


def default_run_name(config: RunConfig, spec: ArchSpec) -> str:
    """The same command gives the same folder, so running it again resumes."""
    budget = "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in config.budget.replace("%", "pct"))
    return f"{spec.name}-{budget}-seed{config.seed}"


def versions() -> dict[str, str]:
    import onnxruntime

    return {"python": platform.python_version(), "torch": torch.__version__, "optuna": optuna.__version__,
            "onnxruntime": onnxruntime.__version__}


class NetAdapt:
    """One run: a run folder, its study, its latency table, its data. `run()` does (or resumes) it all."""

    def __init__(self, config: RunConfig, out: Optional[str] = None, storage: Optional[str] = None,
                 workers: int = 1, stale_seconds: float = 300.0, on_event: Optional[Event] = None,
                 command: Optional[list[str]] = None, max_attempts: int = 2,
                 artifacts: Optional[str] = None) -> None:
        self.config = config
        self.budget: Budget = parse_budget(config.budget)
        self.schedule = parse_schedule(config.schedule)
        path = resolve_spec_path(config.spec_path)
        self.spec_file = path
        base = load_spec(path)
        self.dataset = load_run_dataset(config)
        self.seed_spec = base.with_overrides(resolution=config.resolution,
                                             num_classes=config.num_classes or self.dataset.num_classes,
                                             where=f"{path} with the given options").scaled()
        if config.weights:
            transfer_state_dict(read_state_dict(config.weights), build_model(self.seed_spec), config.weights,
                                f"{path} (with {self.seed_spec.num_classes} classes)")
        self.run = RunFolder(out or Path("results") / default_run_name(config, self.seed_spec))
        self.storage_url = storage
        self.workers = workers
        self.stale_seconds = stale_seconds
        self.max_attempts = max_attempts
        self.emit: Event = on_event or ignore
        self.command = redact_argv(command or sys.argv)  # run.json keeps it: never a password
        self.table: Optional[LatencyTable] = None
        self._worker_procs: list[Any] = []
        self._study_name: Optional[str] = None  # run.json's, once a run folder is resumed
        self._seed_value = 0.0
        # --artifacts: where checkpoints travel to and from workers (artifacts.py); default artifacts/ in the run
        # folder. A bucket is checked now (its client library), a folder made when the run folder is
        if artifacts and "://" in artifacts:
            open_store(artifacts)
        if config.method == "knapsack":
            given = [f"--workers {workers}"] * (workers > 1) + ["--storage"] * bool(storage) + \
                ["--artifacts"] * bool(artifacts)
            if given:
                raise UserError(f"--method knapsack scores every channel once in this process and keeps no Optuna "
                                f"study: {' and '.join(given)} has nothing to do; leave it out")
        self.artifacts_given = artifacts if not artifacts or "://" in artifacts else str(Path(artifacts).resolve())
        self.artifacts: Optional[RunArtifacts] = None

    # -- set-up -----------------------------------------------------------------------------------------

    def _start_run_folder(self) -> None:
        self.run.prepare()
        previous = self.run.read_run_json()
        if previous is not None:
            old = RunConfig.from_json(previous.get("config", {}), str(self.run.run_json))
            diffs = self.config.differences(old)
            if diffs:
                raise UserError(f"{self.run.path}: holds a run with other settings ({'; '.join(diffs[:3])}); "
                                f"use another --out or the same options to resume it")
            if old.as_json() != self.config.as_json():  # a changed RESUMABLE limit: run.json records the new one
                self.run.write_run_json({**previous, "config": self.config.as_json()})
            recorded = previous.get("storage")
            if recorded and recorded.endswith(os.sep + "study.journal") and recorded != self.run.default_storage_url:
                recorded = self.run.default_storage_url  # a moved or copied folder: its own journal, not the old one's
            self.storage_url = resolve_storage(self.storage_url, recorded)
            self._study_name = str(previous.get("study") or self.study_name)  # a renamed folder keeps its study
            recorded = previous.get("artifacts") or default_location(self.run.path)  # None: the run's default
            if self.artifacts_given and self.artifacts_given != recorded:
                raise UserError(f"{self.run.path}: --artifacts {self.artifacts_given} differs from this run's artifact "
                                f"store {recorded} (run.json); leave --artifacts out to go on with it")
            self.run.sweep_temporary_files()
            self.emit("resume", run_dir=str(self.run.path))
        if self.config.method == "netadapt":  # a knapsack run keeps no study and moves no checkpoints
            self.storage_url = self.storage_url or self.run.default_storage_url
            location = (previous or {}).get("artifacts") or self.artifacts_given or default_location(self.run.path)
            self.artifacts = RunArtifacts(location, open_store(location, create=True))
        if previous is None:
            backend = make_backend(self.config.backend, self.config.threads)
            self.run.write_run_json({
                "command": self.command, "config": self.config.as_json(), "spec_file": str(self.spec_file),
                "storage": redact(self.storage_url),
                "study": self.study_name if self.config.method == "netadapt" else None,
                "artifacts": self.artifacts_given,
                "versions": versions(),
                "holdout_images": len(self.dataset.holdout), "train_images": len(self.dataset.train),
                "device": backend.fingerprint(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            })

    @property
    def study_name(self) -> str:
        """The folder's name when the run starts; run.json keeps it, so a renamed folder finds its study."""
        return self._study_name or self.run.path.resolve().name

    def _seed_network(self) -> tuple[dict[str, torch.Tensor], tuple[float, float]]:
        """The seed's weights (given, or trained on the data once and saved) and its holdout accuracy and loss."""
        spec = self.seed_spec
        if self.run.seed_checkpoint.exists():
            _, state = RunFolder.load(self.run.seed_checkpoint)
        else:
            torch.manual_seed(self.config.seed)
            model = build_model(spec)
            if self.config.weights:
                state, note = transfer_state_dict(read_state_dict(self.config.weights), model, self.config.weights,
                                                  str(self.spec_file))
                model.load_state_dict(state, strict=True)
                if note:
                    self.emit("transfer", note=note)
            else:
                self.emit("seed_training", epochs=self.config.seed_epochs)
                to_memory_format(model, torch.channels_last)  # ~1.6x faster training on CPU
                train_epochs(model, self.dataset, self.config.seed_epochs, batch_size=self.config.batch_size,
                             lr=self.config.lr, seed=self.config.seed,
                             progress=lambda step, loss: self.emit("seed_step", step=step, loss=loss))
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            RunFolder.save(spec, state, self.run.seed_checkpoint)
        model = build_model(spec)
        model.load_state_dict(state, strict=True)
        return state, holdout_metrics(model, self.dataset)

    def _open_table(self) -> LatencyTable:
        """The machine's table (or --lut), shared with other runs; run.json records which, and its hash."""
        backend = make_backend(self.config.backend, self.config.threads)
        table = open_for_run(self.config.lut, backend, self.seed_spec, lambda: self.emit("calibrating"))
        saved = self.run.read_run_json() or {}
        saved["latency_table"] = table_record(table)
        self.run.write_run_json(saved)
        return table

    # -- resources --------------------------------------------------------------------------------------

    def resource(self, spec: ArchSpec) -> float:
        if self.budget.resource == MACS:
            return float(spec_macs(spec))
        if self.budget.resource == PARAMS:
            return float(spec_params(spec))
        assert self.table is not None
        return self.table.predict(spec).calibrated_ms

    def _timing_table(self) -> Optional[LatencyTable]:
        """The latency table when the budget is latency (networks are priced by it and timed), else None."""
        return self.table if self.budget.resource == LATENCY else None

    def _prefetch(self, specs: list[ArchSpec]) -> None:
        """Measure the missing table entries of many candidates at once (interleaved, in chunks)."""
        table = self._timing_table()
        if table is not None:
            table.ensure(key for spec in specs for _, key in spec_keys(spec))

    def _smallest(self, spec: ArchSpec) -> ArchSpec:
        """Every group at its smallest allowed width: the floor of this search."""
        for seed_group in proposal_groups(spec, self.config.step):
            group = find_group(spec, seed_group.name, self.config.step)  # earlier shrinks change what is allowed
            options = group.keep_options()
            if options:
                spec = child_spec(spec, group, options[-1], self.config.step)
        return spec

    def proposals(self, spec: ArchSpec, target: float) -> list[tuple[ProposalGroup, int, ArchSpec, float]]:
        """Per group, the largest width whose child meets `target` (binary search over the group's widths,
        as latency falls monotonically with width; batched so table entries are measured together)."""
        groups = [g for g in proposal_groups(spec, self.config.step) if g.keep_options()]
        options = {g.name: g.keep_options() for g in groups}  # largest first
        children: dict[tuple[str, int], ArchSpec] = {}

        def child(g: ProposalGroup, i: int) -> ArchSpec:
            key = (g.name, i)
            if key not in children:
                children[key] = child_spec(spec, g, options[g.name][i], self.config.step)
            return children[key]

        # lo: best index known to meet the target; hi: smallest index known to miss it
        self._prefetch([child(g, len(options[g.name]) - 1) for g in groups])
        bounds: dict[str, list[int]] = {}
        for g in groups:
            last = len(options[g.name]) - 1
            if self.resource(child(g, last)) <= target:
                bounds[g.name] = [last, -1]
        active = [g for g in groups if g.name in bounds]
        while True:
            probes = [(g, (bounds[g.name][0] + bounds[g.name][1]) // 2) for g in active
                      if bounds[g.name][0] - bounds[g.name][1] > 1]
            if not probes:
                break
            self._prefetch([child(g, i) for g, i in probes])
            for g, i in probes:
                if self.resource(child(g, i)) <= target:
                    bounds[g.name][0] = i
                else:
                    bounds[g.name][1] = i
        found = []
        for g in active:
            i = bounds[g.name][0]
            found.append((g, options[g.name][i], child(g, i), self.resource(child(g, i))))
        return found

    # -- the loop ---------------------------------------------------------------------------------------

    def _start_workers(self) -> None:
        """`--workers N`: N - 1 extra local processes join this process in evaluating proposals (worker.py)."""
        # imported here: `python -m mnv3_search.netadapt.worker` must not find its module imported already
        from .worker import start_local_workers

        self._worker_procs = start_local_workers(str(self.storage_url), self.study_name, self.run.path,
                                                 self.workers - 1)

    def _stop_workers(self) -> None:
        from .worker import stop_local_workers

        stop_local_workers(self._worker_procs)
        self._worker_procs = []

    def run_iterations(self, study: optuna.Study, evaluator: Evaluator, rows: list[IterationRecord],
                       seed_value: float, target: float) -> tuple[ArchSpec, dict[str, torch.Tensor]]:
        config = self.config
        effective_target = target
        spec, state = self.seed_spec, None
        if len(rows) > 1:
            last = rows[-1].iteration
            spec, state = RunFolder.load(self.run.iteration_checkpoint(last))
            effective_target = self._corrected_target(rows, target)
            # a kill between an iteration's row and its clean-up leaves its trials' checkpoints (100s of MB)
            self._clean_trial_checkpoints([t for it in range(1, last + 1) for t in iteration_trials(study, it)])
        else:
            _, state = RunFolder.load(self.run.seed_checkpoint)
        while True:
            current = self.resource(spec)
            within = current <= effective_target
            # with a latency budget every chosen network is timed beside the seed: the table ranks a parent's
            # children well, but its error grows as the network shrinks (on Small at 224 px it put a network
            # measured at 27 % of the seed at 37 %), so the measurement, not the table, says when to stop
            timed_each = (self._timing_table() is not None and rows[-1].iteration > 0
                          and rows[-1].measured_latency_ms is None)
            if within or timed_each:
                confirmed, row_update = self._confirm_median(spec, target)
                rows[-1] = replace(rows[-1], **row_update)
                self.run.write_iterations(rows)
                if confirmed:
                    return spec, state
                effective_target = self._corrected_target(rows, target)
                if within:
                    self.emit("disagreement", **row_update, corrected_target=effective_target)
                continue
            iteration = rows[-1].iteration + 1
            if iteration > config.max_iterations:
                raise BudgetUnreachable(f"stopped after --max-iterations {config.max_iterations}; reached "
                                        f"{self._describe(current)}, budget {self._describe(target)}; the results so "
                                        f"far are in {self.run.path}")
            started = time.perf_counter()
            cut = self.schedule.reduction(iteration - 1, seed_value)
            goal = max(current - cut, 0.0)
            found = self.proposals(spec, goal)
            wanted = min(MIN_CHOICE, len([g for g in proposal_groups(spec, config.step) if g.keep_options()]))
            while len(found) < wanted and cut / 2 >= MIN_CUT_SHARE * seed_value:
                # too few groups can make the scheduled cut (each group that can is used up by one cut that
                # size, and a shrunk network's groups are small): halve it rather than choose among one or two
                # proposals or stop, down to MobileNetV3's delta of 1 % of the seed
                cut /= 2
                goal = max(current - cut, 0.0)
                found = self.proposals(spec, goal)
            if not found:
                raise BudgetUnreachable(
                    f"budget {config.budget} cannot be reached: no group can shrink enough for the next step; "
                    f"the smallest reached is {self._describe(current)} (iteration {iteration - 1}); the results so "
                    f"far are in {self.run.path}")
            parent_rel = str(self.run.iteration_checkpoint(iteration - 1).relative_to(self.run.path)) \
                if iteration > 1 else str(self.run.seed_checkpoint.relative_to(self.run.path))
            if self.artifacts is not None:  # workers without the run folder download it from there
                self.artifacts.publish_parent(study, parent_rel, self.run.path / parent_rel)
            groups_before = {g.name: g.channels for g in proposal_groups(spec, config.step)}
            assert rows[-1].holdout_accuracy is not None
            parent_accuracy = rows[-1].holdout_accuracy
            proposals = {g.name: (keep, {
                "parent": parent_rel, "kind": g.kind, "channels_before": g.channels,
                "predicted_latency_ms": value if self.budget.resource == LATENCY else None,
                "macs": spec_macs(child), "params": spec_params(child), "resource": value,
                "parent_resource": current, "parent_accuracy": parent_accuracy,
                "tie_tolerance": self.tolerance(parent_accuracy),
                "last_rung": len(self._rung_plan()) - 1}) for g, keep, child, value in found}
            self.emit("iteration", iteration=iteration, current=current, goal=goal, target=target,
                      proposals=len(found))
            ranked = self._evaluate_iteration(study, evaluator, iteration, proposals, parent_accuracy, current)
            best = ranked[0]
            chosen = self._rung_trials(study, iteration, len(self._rung_plan()) - 1)[best.candidate.group]
            group, keep = chosen.params["group"], int(chosen.params["channels"])
            child_spec_, child_state = self._trial_checkpoint(study, chosen.number)
            RunFolder.save(child_spec_, child_state, self.run.iteration_checkpoint(iteration))
            trials = iteration_trials(study, iteration)
            finished = [t for t in trials if t.state == TrialState.COMPLETE]
            reached_last = {trial_group(t) for t in finished
                            if t.user_attrs.get(RUNG_ATTR) == t.user_attrs["last_rung"]}
            row = IterationRecord(
                iteration=iteration, proposal=f"{group}={keep}", group=group,
                channels_before=groups_before.get(group), channels=keep,
                target_latency_ms=goal if self.budget.resource == LATENCY else None,
                predicted_latency_ms=self.table.predict(child_spec_).calibrated_ms if self.table else None,
                macs=spec_macs(child_spec_), params=spec_params(child_spec_),
                holdout_accuracy=best.candidate.accuracy, holdout_loss=best.candidate.loss, saving=best.saving,
                score=best.score, tie_tolerance=self.tolerance(parent_accuracy), tied=best.tied,
                decided_by=best.decided_by, proposals=len({trial_group(t) for t in finished}),
                pruned=len({trial_group(t) for t in finished} - reached_last),
                steps=sum(int(t.user_attrs.get("steps", 0)) for t in finished),
                full_steps=len(found) * config.short_steps, wall_seconds=time.perf_counter() - started)
            rows.append(row)
            self.run.write_iterations(rows)
            self._write_proposals(study)
            self._clean_trial_checkpoints(trials)
            self.emit("chosen", **asdict(row), resource=self.resource(child_spec_))
            spec, state = child_spec_, child_state

    def tolerance(self, parent_accuracy: float) -> float:
        """Accuracy differences below the holdout's standard error (selection.tolerance) are ties."""
        return tolerance(parent_accuracy, len(self.dataset.holdout))

    def _rung_plan(self) -> list[tuple[int, int, list[int]]]:
        """(start step, stop step, steps scored at) per rung: halving scores each rung's end; `full` is one
        rung to short_steps scored at every halving boundary (so the two can be compared offline)."""
        steps = self.config.rung_steps()
        if self.config.evaluation == "full":
            return [(0, steps[-1], steps)]
        return [(start, stop, [stop]) for start, stop in zip([0] + steps[:-1], steps)]

    @staticmethod
    def _rung_trials(study: optuna.Study, iteration: int, rung: int,
                     trials: Optional[list[optuna.trial.FrozenTrial]] = None) -> dict[str, optuna.trial.FrozenTrial]:
        """The finished trial of each proposal at `rung` (the first one, should a retry also have finished);
        `trials`: the study's trials when the caller already read them."""
        done: dict[str, optuna.trial.FrozenTrial] = {}
        for t in iteration_trials(study, iteration, states=(TrialState.COMPLETE,)) if trials is None else trials:
            if t.state == TrialState.COMPLETE and t.user_attrs.get(ITERATION_ATTR) == iteration and \
                    t.user_attrs.get(RUNG_ATTR, 0) == rung and trial_group(t) not in done:
                done[str(trial_group(t))] = t
        return done

    def _evaluate_iteration(self, study: optuna.Study, evaluator: Evaluator, iteration: int,
                            proposals: dict[str, tuple[int, dict[str, Any]]], parent_accuracy: float,
                            current: float) -> list[Ranked]:
        """Synchronous successive halving: every proposal is enqueued for rung 0; once all of them finished,
        the best `keep` fraction by the selection rule is enqueued for the next rung, continuing from its checkpoint;
        and so on. Returns the last rung's ranking. Finished trials are reused after a resume."""
        entrants = sorted(proposals)
        previous: dict[str, int] = {}
        ranked: list[Ranked] = []
        plan = self._rung_plan()
        for rung, (start, stop, scored) in enumerate(plan):
            existing = iteration_trials(study, iteration)
            for name in entrants:
                channels, attrs = proposals[name]
                enqueue(study, iteration, name, channels, {**attrs, START_ATTR: start, STOP_ATTR: stop,
                                                           EVAL_ATTR: scored, FROM_ATTR: previous.get(name)}, rung,
                        existing)
            finished = self._wait_rung(study, evaluator, iteration, rung, entrants, len(proposals))
            if not finished:
                raise UserError(f"iteration {iteration}: every proposal failed at rung {rung}; see "
                                f"{self.run.proposals_csv}")
            ranked = rank([Candidate(name, float(t.user_attrs["holdout_accuracy"]), float(t.user_attrs["holdout_loss"]),
                                     float(t.user_attrs["resource"])) for name, t in finished.items()],
                          self.config.select, parent_accuracy, current, self.tolerance(parent_accuracy))
            previous = {name: t.number for name, t in finished.items()}
            entrants = sorted(r.candidate.group for r in survivors(ranked, self.config.keep))
        return ranked

    def _wait_rung(self, study: optuna.Study, evaluator: Evaluator, iteration: int, rung: int, names: list[str],
                   total: int) -> dict[str, optuna.trial.FrozenTrial]:
        """This process works too; waits for other workers' trials, retrying the ones whose worker died.
        Returns the finished trial of each proposal; a proposal whose trial failed (a worker's error) is
        left out."""
        wanted = set(names)
        while True:
            trials = iteration_trials(study, iteration)
            finished = {k: v for k, v in self._rung_trials(study, iteration, rung, trials).items() if k in wanted}
            open_ = [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)
                     and t.user_attrs.get(RUNG_ATTR, 0) == rung and trial_group(t) in wanted]
            self.emit("progress", iteration=iteration, rung=rung, rungs=len(self._rung_plan()), done=len(finished),
                      running=len(wanted), pruned=total - len(wanted), total=total)
            if not open_:
                return finished
            trial = claim(study, claim_lock_path(self.storage_url or self.run.default_storage_url))
            if trial is not None:
                evaluator.evaluate(study, trial)
                continue
            if requeue_stale(study, iteration, self.stale_seconds, self.max_attempts):
                self.emit("retry", iteration=iteration)
            time.sleep(0.2)

    def _confirm(self, spec: ArchSpec, target: float) -> tuple[bool, dict[str, Any]]:
        """The network timed beside the seed, now (`_confirm_median` does it for every iteration): the
        budget is judged on their ratio (an absolute budget through the seed measured in the same
        measurement, never through a calibration from an earlier minute). A measurement disturbed by the
        host is repeated; if all `CONFIRM_ATTEMPTS` are disturbed the verdict of the last is used and the
        row says `latency_reliable` False."""
        table = self._timing_table()
        if table is None:
            return True, {}
        limit = {"budget_ratio": self.budget.value} if self.budget.relative else {"budget_ms": self.budget.value}
        for attempt in range(1, CONFIRM_ATTEMPTS + 1):
            verdict = relative_to_reference(table, self.seed_spec, spec, **limit)
            if verdict.reliable:
                break
            self.emit("unreliable", attempt=attempt, ratio_shift=verdict.ratio_shift, spread=verdict.spread)
        measured, seed_measured = verdict.candidate_ms, verdict.reference_ms
        self.emit("confirm", measured=measured, seed_measured=seed_measured, ok=verdict.ok,
                  reliable=verdict.reliable)
        return verdict.ok, {"measured_latency_ms": measured, "seed_measured_latency_ms": seed_measured,
                            "latency_reliable": verdict.reliable}

    def _confirm_median(self, spec: ArchSpec, target: float) -> tuple[bool, dict[str, Any]]:
        """`_confirm` CONFIRM_TIMINGS times; the timing with the median share of the seed decides."""
        if self._timing_table() is None:
            return self._confirm(spec, target)
        timings = [self._confirm(spec, target) for _ in range(CONFIRM_TIMINGS)]
        timings.sort(key=lambda t: t[1]["measured_latency_ms"] / t[1]["seed_measured_latency_ms"])
        return timings[len(timings) // 2]

    def _corrected_target(self, rows: list[IterationRecord], target: float) -> float:
        """After a measurement disagreed with the table, scale the target by predicted / measured."""
        for row in reversed(rows):
            if row.measured_latency_ms and row.predicted_latency_ms and row.seed_measured_latency_ms:
                return target * row.predicted_latency_ms / self._equivalent(row)
        return target

    def _equivalent(self, row: IterationRecord) -> float:
        """A confirmation's measurement in the target's units: for a relative budget, the measured share of
        the seed (timed together) times the seed's table figure; for an absolute one, the measurement."""
        assert row.measured_latency_ms and row.seed_measured_latency_ms
        if self.budget.relative:
            return row.measured_latency_ms / row.seed_measured_latency_ms * self._seed_value
        return row.measured_latency_ms

    def _describe(self, value: float) -> str:
        return f"{value:.3f} ms" if self.budget.resource == LATENCY else f"{value:,.0f} {self.budget.resource}"

    def _write_proposals(self, study: optuna.Study) -> None:
        """One row per proposal, from the study alone: its last finished rung's metrics, its rank there by the
        selection rule, whether it was stopped (PRUNED) before the last rung, steps over all its trials."""
        chosen = {row.iteration: row.proposal for row in self.run.read_iterations()}
        by_proposal: dict[tuple[int, str], list[optuna.trial.FrozenTrial]] = {}
        everything = study.get_trials(deepcopy=False)
        for t in everything:
            if ITERATION_ATTR in t.user_attrs and t.state != TrialState.WAITING:
                by_proposal.setdefault((int(t.user_attrs[ITERATION_ATTR]), str(trial_group(t))), []).append(t)
        ranks: dict[tuple[int, int], dict[str, Ranked]] = {}
        for (iteration, _), trials in by_proposal.items():
            for t in trials:
                rung = int(t.user_attrs.get(RUNG_ATTR, 0))
                if t.state == TrialState.COMPLETE and (iteration, rung) not in ranks:
                    done = self._rung_trials(study, iteration, rung, everything).values()
                    a = t.user_attrs
                    scored = rank([Candidate(str(trial_group(d)), float(d.user_attrs["holdout_accuracy"]),
                                             float(d.user_attrs["holdout_loss"]), float(d.user_attrs["resource"]))
                                   for d in done], self.config.select, float(a["parent_accuracy"]),
                                  float(a["parent_resource"]), float(a["tie_tolerance"]))
                    ranks[(iteration, rung)] = {r.candidate.group: r for r in scored}
        rows = []
        for (iteration, group), trials in sorted(by_proposal.items()):
            complete = sorted((t for t in trials if t.state == TrialState.COMPLETE),
                              key=lambda t: int(t.user_attrs.get(RUNG_ATTR, 0)))
            last = complete[-1] if complete else max(trials, key=lambda t: t.number)
            latest = max(trials, key=lambda t: t.number)  # a failed attempt keeps its reason
            rung = int(last.user_attrs.get(RUNG_ATTR, 0))
            if not complete:
                state = last.state.name
            else:
                state = "COMPLETE" if rung == int(last.user_attrs["last_rung"]) else "PRUNED"
            ranked = ranks.get((iteration, rung), {}).get(group) if complete else None
            channels = last.params.get("channels", last.system_attrs.get("fixed_params", {}).get("channels"))
            rows.append({
                "trial": last.number, "iteration": iteration, "group": group,
                "channels_before": last.user_attrs.get("channels_before"), "channels": channels, "state": state,
                "rung": rung, "predicted_latency_ms": last.user_attrs.get("predicted_latency_ms"),
                "macs": last.user_attrs.get("macs"), "params": last.user_attrs.get("params"),
                "holdout_accuracy": last.user_attrs.get("holdout_accuracy"),
                "holdout_loss": last.user_attrs.get("holdout_loss"),
                "saving": ranked.saving if ranked else None, "score": ranked.score if ranked else None,
                "rank": list(ranks[(iteration, rung)]).index(group) + 1 if ranked else None,
                "trials": len(trials), "steps": sum(int(t.user_attrs.get("steps", 0)) for t in complete),
                "seconds": sum(float(t.user_attrs.get("seconds", 0.0)) for t in complete),
                "chosen": state == "COMPLETE" and chosen.get(iteration) == f"{group}={channels}",
                "worker": " ".join(sorted({str(t.user_attrs.get("worker")) for t in complete})),
                "attempt": max(int(t.user_attrs.get(ATTEMPT_ATTR, 1)) for t in trials),
                "failure": latest.user_attrs.get(FAILURE_ATTR) if latest.state == TrialState.FAIL else None,
            })
        self.run.write_proposals(rows)

    def _trial_checkpoint(self, study: optuna.Study, number: int) -> tuple[ArchSpec, dict[str, torch.Tensor]]:
        """A trial's fine-tuned network: from the run folder, or the artifact store when a worker on another
        machine evaluated it."""
        path = self.run.trial_checkpoint(number)
        if path.exists() or self.artifacts is None:
            return RunFolder.load(path)
        with self.artifacts.trial_files(study, number) as (checkpoint, _):
            return RunFolder.load(checkpoint)

    def _clean_trial_checkpoints(self, trials: list[optuna.trial.FrozenTrial]) -> None:
        for t in trials:
            self.run.trial_checkpoint(t.number).unlink(missing_ok=True)
            self.run.trial_state(t.number).unlink(missing_ok=True)
            if self.artifacts is not None:
                self.artifacts.remove_trial(t)

    # -- the whole run ----------------------------------------------------------------------------------

    def _check_budget(self) -> tuple[float, float, bool]:
        """Seed figure, target, and whether there is nothing to do; an unreachable budget is refused
        before any training (the floor is every group at its smallest width)."""
        seed_value = self.resource(self.seed_spec)
        target = self.budget.target(seed_value)
        self._seed_value = seed_value
        if seed_value <= target:
            return seed_value, target, True
        floor = self.resource(self._smallest(self.seed_spec))
        if floor > target:
            raise BudgetUnreachable(f"budget {self.config.budget} cannot be reached: the smallest network this "
                                    f"search can make (every group at its minimum) is {self._describe(floor)}; the "
                                    f"seed is {self._describe(seed_value)}")
        return seed_value, target, False

    def _finished_result(self) -> Optional[RunResult]:
        finished = self.run.read_summary()
        if finished is None or not self.run.final_yaml.exists():
            return None
        self.emit("already_finished", run_dir=str(self.run.path))
        return RunResult(self.run.path, False, finished.seed_resource, finished.target,
                         final_spec=load_spec(self.run.final_yaml), final_resource=finished.final_resource,
                         measured_latency_ms=finished.measured_latency_ms,
                         seed_measured_latency_ms=finished.seed_measured_latency_ms,
                         test_accuracy=finished.test_accuracy, iterations=finished.iterations)

    def _open_study(self) -> optuna.Study:
        return create_study(self.storage_url or self.run.default_storage_url, self.study_name)

    def run_all(self) -> RunResult:
        """Validate everything cheap first (budget, storage), then the run folder, seed, loop and finish. A
        database server lost mid-run stops it in one line (StorageLost); the same command resumes it."""
        try:
            return self._run_all()
        except Exception as exc:  # self.storage_url: the one resolved from run.json when resuming
            lost = as_storage_lost(exc, self.storage_url)
            if lost is None:
                raise
            raise lost from None

    def _run_all(self) -> RunResult:
        config = self.config
        if self.storage_url:
            make_storage(self.storage_url)  # an unreachable server is refused before anything is written
        if self.budget.resource != LATENCY:
            seed_value, target, nothing = self._check_budget()
            if nothing:
                return self._nothing_to_do(seed_value, target)
        self._start_run_folder()
        done = self._finished_result()
        if done is not None:
            return done
        if self.budget.resource == LATENCY:
            self.table = self._open_table()
            seed_value, target, nothing = self._check_budget()
            if nothing:
                return self._nothing_to_do(seed_value, target)
        # the study exists before the seed trains, so a worker started with the run finds it (knapsack: none)
        study = self._open_study() if config.method == "netadapt" else None
        self.emit("seed", value=seed_value, target=target, unit="ms" if self.budget.resource == LATENCY
                  else self.budget.resource)
        _, (seed_accuracy, seed_loss) = self._seed_network()
        rows = self.run.read_iterations()
        if not rows:
            rows = [IterationRecord(
                iteration=0, proposal="seed", predicted_latency_ms=seed_value if self.budget.resource == LATENCY
                else None, macs=spec_macs(self.seed_spec), params=spec_params(self.seed_spec),
                holdout_accuracy=seed_accuracy, holdout_loss=seed_loss, tie_tolerance=self.tolerance(seed_accuracy),
                wall_seconds=0.0)]
            self.run.write_iterations(rows)
        if study is None:
            spec, state, last = self._knapsack(rows, target)
        else:
            spec, state = self._netadapt(study, rows, seed_value, target)
            last = rows[-1]
        result = RunResult(self.run.path, False, seed_value, target, final_spec=spec,
                           final_resource=self.resource(spec), iterations=rows[-1].iteration,
                           measured_latency_ms=last.measured_latency_ms,
                           seed_measured_latency_ms=last.seed_measured_latency_ms)
        result.test_accuracy = self._finish(spec, state)
        self.run.write_summary(RunSummary(
            iterations=result.iterations, seed_resource=seed_value, target=target,
            final_resource=result.final_resource, measured_latency_ms=result.measured_latency_ms,
            seed_measured_latency_ms=result.seed_measured_latency_ms, test_accuracy=result.test_accuracy,
            final_method=self.config.final_method(), final_macs=spec_macs(spec), final_params=spec_params(spec),
            latency_table_entries_measured=self.table.measured if self.table else None,
            finished=time.strftime("%Y-%m-%dT%H:%M:%S")))
        return result

    def _netadapt(self, study: optuna.Study, rows: list[IterationRecord], seed_value: float,
                  target: float) -> tuple[ArchSpec, dict[str, torch.Tensor]]:
        """The iterations (with their workers and study records) and what they chose."""
        config = self.config
        groups = proposal_groups(self.seed_spec, config.step)
        names, widest = [g.name for g in groups], max(g.channels for g in groups)
        study.set_user_attr(CONFIG_ATTR, config.as_json())
        study.set_user_attr(RUN_DIR_ATTR, str(self.run.path.resolve()))
        if self.artifacts is not None:
            study.set_user_attr(ARTIFACTS_ATTR, self.artifacts.location)  # where a worker finds the checkpoints
        study.set_user_attr(GROUPS_ATTR, [names, widest])
        set_status(study, "running")
        evaluator = Evaluator(self.run, config, names, widest, self.dataset, artifacts=self.artifacts)
        self._start_workers()
        try:
            spec, state = self.run_iterations(study, evaluator, rows, seed_value, target)
            self._write_proposals(study)  # a kill between the last row and its proposals.csv left it one short
            if self.artifacts is not None:
                self.artifacts.retire_parents(study)  # no proposal is left to start from them
        except BaseException:
            try:
                set_status(study, "finished")  # remote workers leave; a resumed run sets it running again
            except Exception as also:
                if lost_connection(also) is None:
                    raise
                # the server is still down: the first failure is what the user must see, not this one
            self._stop_workers()
            raise
        set_status(study, "finished")
        self._stop_workers()
        return spec, state

    def _knapsack(self, rows: list[IterationRecord], target: float
                  ) -> tuple[ArchSpec, dict[str, torch.Tensor], IterationRecord]:
        """--method knapsack (prune/knapsack.py): Taylor importance of every channel of the seed, then rounds of
        knapsack shape -> timed beside the seed -> target corrected by the measurement (tightened when over the
        budget, loosened when more than KNAPSACK_SLACK under it). Each round is a row of iterations.csv and a
        checkpoint; the confirmed shape closest to the budget wins. Seconds, not iterations of fine-tunes, so a
        resumed run solves again from the seed."""
        config = self.config
        del rows[1:]
        self.run.write_iterations(rows)
        _, seed_state = RunFolder.load(self.run.seed_checkpoint)
        groups = proposal_groups(self.seed_spec, config.step)
        self.emit("importance", groups=len(groups), channels=sum(g.channels for g in groups), batches=TAYLOR_BATCHES)
        scores = taylor_importance(self.seed_spec, seed_state, self.dataset, groups, batch_size=config.batch_size,
                                   seed=config.seed)
        self._prefetch([child_spec(self.seed_spec, g, k, config.step) for g in groups for k in width_options(g)])
        problem = KnapsackProblem.build(self.seed_spec, scores, self.resource)  # priced once for every round
        goal: float = target
        best: Optional[tuple[float, int, IterationRecord]] = None
        reached_by_shape: dict[str, float] = {}  # every timed shape's measured equivalent
        timed: list[tuple[float, float]] = []  # (goal, measured equivalent) of every goal tried
        round_ = 0
        for _ in range(4 * KNAPSACK_ROUNDS):  # goals that give an already timed shape cost no round
            if round_ == KNAPSACK_ROUNDS:
                break
            started = time.perf_counter()
            try:
                shape, predicted = problem.shape_for(goal)
            except ValueError:
                raise BudgetUnreachable(f"budget {config.budget} cannot be reached: every group at its smallest "
                                        f"width is over it") from None
            key = spec_to_yaml(shape)
            if key in reached_by_shape:  # timed already: that goal is known, halve the bracket
                timed.append((goal, reached_by_shape[key]))
                halfway = bisect_goal(timed, target)
                if halfway is None:  # every shape so far on one side of the budget: push on past this shape
                    goal = push_goal(goal, reached_by_shape[key], target)
                    continue
                if abs(halfway - goal) < 1e-3 * goal:
                    break
                goal = halfway
                continue
            round_ += 1
            confirmed, update = self._confirm_median(shape, target)
            state = shrink_to(self.seed_spec, seed_state, scores, shape)
            # no holdout figures: a shape cut in one shot scores near chance before any training
            row = IterationRecord(
                iteration=round_, proposal="knapsack",
                target_latency_ms=goal if self.budget.resource == LATENCY else None,
                predicted_latency_ms=predicted if self.budget.resource == LATENCY else None,
                macs=spec_macs(shape), params=spec_params(shape), wall_seconds=time.perf_counter() - started,
                **update)
            RunFolder.save(shape, state, self.run.iteration_checkpoint(round_))
            rows.append(row)
            self.run.write_iterations(rows)
            self.emit("knapsack", round=round_, goal=goal, predicted=predicted, ok=confirmed)
            if self.budget.resource != LATENCY:  # exact counts: the knapsack's figure is the network's
                return shape, state, row
            reached = reached_by_shape[key] = self._equivalent(row)
            timed.append((goal, reached))
            if confirmed and (best is None or reached > best[0]):
                best = (reached, round_, row)
            if confirmed and reached >= target * (1 - KNAPSACK_SLACK):
                break
            goal = next_goal(timed, target)
        if best is None:
            raise BudgetUnreachable(f"--method knapsack: no shape was measured within budget {config.budget} in "
                                    f"{len(rows) - 1} rounds (iterations.csv in {self.run.path} has their "
                                    f"measurements); run again, or use --method netadapt")
        spec, state = RunFolder.load(self.run.iteration_checkpoint(best[1]))
        return spec, state, best[2]

    def _nothing_to_do(self, seed_value: float, target: float) -> RunResult:
        self.emit("nothing_to_do", seed=seed_value, target=target)
        return RunResult(self.run.path, True, seed_value, target)

    def _finish(self, spec: ArchSpec, state: dict[str, torch.Tensor]) -> float:
        """Long fine-tune of the chosen network (or, with `final="retrain"`, its shape trained again from a
        fresh initialisation, as MobileNetV3 did after NetAdapt), test accuracy, and the deployable files."""
        config = self.config
        if config.final_method() == "retrain":
            # as many epochs as the adapted weights saw (seed training + long fine-tune), at the seed's lr
            torch.manual_seed(config.seed)
            model = to_memory_format(build_model(spec), torch.channels_last)
            epochs, lr = config.seed_epochs + config.long_epochs, config.lr
        else:
            model = to_memory_format(build_model(spec), torch.channels_last)  # ~1.6x faster training on CPU
            model.load_state_dict(state, strict=True)
            epochs, lr = config.long_epochs, config.lr * 0.1
        self.emit("long_finetune", epochs=epochs, method=config.final_method())
        if epochs > 0:
            train_epochs(model, self.dataset, epochs, batch_size=config.batch_size, lr=lr, seed=config.seed,
                         progress=lambda step, loss: self.emit("long_step", step=step, loss=loss))
        accuracy = evaluate(model, self.dataset, self.dataset.test)
        to_memory_format(model, torch.contiguous_format)
        dump_spec(spec, self.run.final_yaml)
        RunFolder.save(spec, model.state_dict(), self.run.final_pt)
        with atomic_path(self.run.final_onnx) as tmp:
            tmp.write_bytes(export_onnx(model, (1, 3, spec.resolution, spec.resolution)))
        self.emit("finished", test_accuracy=accuracy)
        return accuracy


def _bracket(timed: list[tuple[float, float]], target: float
             ) -> Optional[tuple[tuple[float, float], tuple[float, float]]]:
    """Of the (goal, measured equivalent) rounds, the one measured closest under the target and the one
    closest over it; None without both."""
    under = [t for t in timed if t[1] <= target]
    over = [t for t in timed if t[1] > target]
    if not (under and over):
        return None
    return max(under, key=lambda t: t[1]), min(over, key=lambda t: t[1])


def next_goal(timed: list[tuple[float, float]], target: float) -> float:
    """The knapsack's next table goal from the rounds timed so far, (goal, measured equivalent) each: between
    the closest round under the target and the closest over it, the goal where the straight line through them
    reaches the target (the table's error changes with the shape, so one ratio does not carry over); without
    both, the last goal scaled by target / measured."""
    bracket = _bracket(timed, target)
    if bracket is not None:
        (g0, m0), (g1, m1) = bracket
        if m1 > m0 and g1 != g0:
            return g0 + (target - m0) * (g1 - g0) / (m1 - m0)
    goal, reached = timed[-1]
    return goal * target / reached


def push_goal(goal: float, reached: float, target: float) -> float:
    """The next goal when `goal` gave a shape timed already (measured equivalent `reached`) and no round lies
    on the other side of the target: scaled by target / reached as `next_goal` does, but by at least
    KNAPSACK_SLACK, so the knapsack has to choose another shape. Without it a round measured just over the
    budget (71 % for 70 %) gave a goal whose shape was the same, and the run stopped after that one round
    with nothing within budget (seen in CI)."""
    if reached > target:
        return goal * min(target / reached, 1 - KNAPSACK_SLACK)
    return goal * max(target / reached, 1 + KNAPSACK_SLACK)


def bisect_goal(timed: list[tuple[float, float]], target: float) -> Optional[float]:
    """Halfway between the goals of the closest round under the target and the closest over it (when the
    interpolated goal gives a shape already timed); None without both."""
    bracket = _bracket(timed, target)
    return None if bracket is None else (bracket[0][0] + bracket[1][0]) / 2


def run_netadapt(config: RunConfig, **kwargs: Any) -> RunResult:
    """Library entry point: `run_netadapt(RunConfig("small", "80%"), out="results/demo")`.

    Training runs on `config.threads` torch threads (default 1: on a small shared machine a second
    thread spin-waits whenever the other core is busy)."""
    with torch_threads(config.threads):
        return NetAdapt(config, **kwargs).run_all()

