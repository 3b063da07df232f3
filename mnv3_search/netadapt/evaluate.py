"""Evaluating proposals: what a worker does with a claimed trial.

A trial is one rung of one proposal: fine-tune the child from `start_step` to `stop_step` and score it
on the holdout (accuracy and cross-entropy loss) at each step count in `eval_steps`. Rung 0 shrinks the
iteration's parent by the trial's cuts (its (group, channels), or the cuts a proposal of several carries) and
refreshes BN statistics; a later rung continues
the previous rung's trial from its checkpoint (weights, optimizer momentum, data order and RNG state), so
training 0 -> 5 -> 10 steps in two trials gives exactly the weights of 0 -> 10 in one. The weights and
training state are saved into the run folder (when this process has it) and uploaded to the run's artifact
store (artifacts.py: how a worker on another machine gets and hands on checkpoints), and the study is told
the last holdout accuracy.
Workers never measure latency: that happens only where the run's latency table lives.
"""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import optuna
import torch
from torch import nn

from ..data import Dataset, load_dataset
from ..errors import CheckpointError, RunInterrupted
from ..fileio import disk_full
from ..model.build import build_model
from ..model.weights import load_torch, read_checkpoint, save_torch
from ..prune.groups import find_group, proposal_groups
from ..prune.importance import Magnitude, make_importance
from ..prune.surgery import shrink
from ..train import Trainer, holdout_metrics, refresh_bn, to_memory_format
from .artifacts import KILL_EXIT_CODE, RunArtifacts, staging
from .attrs import (ACCURACY_ATTR, ATTEMPT_ATTR, CHANNELS_PARAM, CHECKPOINT_ATTR, EVAL_ATTR,
                    FAILURE_ATTR, FIXED_PARAMS_ATTR, FROM_ATTR, GROUP_PARAM, HEARTBEAT_ATTR, ITERATION_ATTR, LOSS_ATTR,
                    METRICS_ATTR, PARENT_ATTR, RETRY_OF_ATTR, SECONDS_ATTR, START_ATTR, STATE_ATTR, STEPS_ATTR,
                    STOP_ATTR, WORKER_ATTR)
from .config import RunConfig
from .proposals import attr_cuts, label, trial_cuts
from .runfolder import RunFolder
from .polling import Backoff
from .study import claim, heartbeat, storage_of, trial_group, trial_storage_id

# Test hook: a proposal of the group named here kills the process evaluating it (os._exit, like a crashing
# kernel or the OOM killer), so the retry and give-up path is tested with real process deaths
# (tests/netadapt/test_reliability.py). Never set outside tests.
KILL_GROUP_ENV = "MNV3_SEARCH_TEST_KILL_GROUP"  # its process exits with KILL_EXIT_CODE (artifacts.py's)


def proposal_seed(seed: int, iteration: int, group: str) -> int:
    """A seed per proposal, the same in every process, so a retried or resumed proposal repeats exactly."""
    return zlib.crc32(f"{seed}:{iteration}:{group}".encode()) & 0x7FFFFFFF


def load_run_dataset(config: RunConfig) -> Dataset:
    return load_dataset(config.data, resolution=config.train_resolution, holdout=config.holdout, seed=config.seed,
                        limit=config.limit)


class ShortTune(Trainer):
    """The short-term fine-tune of one proposal (NetAdapt's T steps): the training recipe's resumable Trainer
    (train.py) at a constant learning rate, on the chosen device, in channels-last layout (~1.6x faster on
    CPU). `close()` it before its weights are saved: the model goes back to the CPU."""

    def __init__(self, model: nn.Module, dataset: Dataset, *, lr: float, batch_size: int, seed: int) -> None:
        super().__init__(to_memory_format(model, torch.channels_last), dataset, lr=lr, batch_size=batch_size,
                         seed=seed)


def save_training_state(tune: ShortTune, path: Path) -> None:
    save_torch(tune.state(), path)


def load_training_state(path: Path) -> dict[str, Any]:
    """A trial's training state (trials/NNNNN.state.pt); a missing or damaged one is a CheckpointError naming it."""
    data = load_torch(path, "training state")
    if not isinstance(data, dict) or not {"step", "optimizer", "rng"} <= data.keys():
        raise CheckpointError(f"{path}: not a trial's training state (no step, optimizer and RNG state)")
    return data


def enqueue_again(study: optuna.Study, trial: optuna.Trial) -> None:
    """A trial that failed for a reason outside the proposal (a full disk, a failing store) waiting again as
    the same attempt, so another worker, or the resumed run, evaluates it instead of the iteration dropping it."""
    drop = (HEARTBEAT_ATTR, WORKER_ATTR, FAILURE_ATTR, METRICS_ATTR, CHECKPOINT_ATTR, STATE_ATTR)
    attrs = {k: v for k, v in trial.user_attrs.items() if k not in drop}
    fixed = storage_of(study).get_trial_system_attrs(trial_storage_id(trial)).get(FIXED_PARAMS_ATTR, trial.params)
    study.enqueue_trial(dict(fixed), user_attrs={**attrs, RETRY_OF_ATTR: trial.number,
                                                 ATTEMPT_ATTR: int(attrs.get(ATTEMPT_ATTR, 1))})


Note = Callable[[str], None]


class Evaluator:
    """Evaluates claimed trials of one run; keeps the dataset and the current parent in memory."""

    def __init__(self, run: Optional[RunFolder], config: RunConfig, group_names: list[str], max_channels: int,
                 dataset: Optional[Dataset] = None, artifacts: Optional[RunArtifacts] = None,
                 note: Note = lambda _: None) -> None:
        """`run`: the run folder when this process has it (its files are read first, trials written there too);
        `artifacts`: the run's artifact store (what a worker without the run folder reads and writes); `note`
        gets one line when a previous rung's files are unreadable and the proposal is re-trained instead."""
        self.note = note
        if run is None and artifacts is None:
            raise ValueError("an Evaluator needs the run folder or the run's artifact store")
        self.run = run
        self.artifacts = artifacts
        self.config = config
        self.group_names = group_names
        self.max_channels = max_channels
        self.dataset = dataset if dataset is not None else load_run_dataset(config)
        self._parent: tuple[str, Any, dict[str, torch.Tensor]] | None = None
        # the run's importance estimator, unless it is surgery's own default (L2): then no scores are passed
        name = config.importance_name()
        self.importance = None if name == "l2" else make_importance(name, self.dataset, batch_size=config.batch_size,
                                                                    seed=config.seed)
        self._scores: tuple[str, dict[str, torch.Tensor]] | None = None  # the current parent's, per group

    def _parent_of(self, study: optuna.Study, relative: str) -> tuple[Any, dict[str, torch.Tensor]]:
        if self._parent is None or self._parent[0] != relative:
            local = self.run.path / relative if self.run is not None else None
            if local is not None and (local.exists() or self.artifacts is None):
                spec, state = RunFolder.load(local)
            else:
                assert self.artifacts is not None
                with self.artifacts.parent(study, relative) as path:
                    spec, state = RunFolder.load(path)
            self._parent = (relative, spec, state)
        return self._parent[1], self._parent[2]

    def _channel_scores(self, relative: str, spec: Any, state: dict[str, torch.Tensor], group: str
                        ) -> Optional[torch.Tensor]:
        """The importance of `group`'s channels in the parent `relative`, which decides what its cut keeps; every
        group of a parent is scored at once (Taylor passes over the data once) and kept for its other proposals."""
        if self.importance is None:
            return None
        if self._scores is None or self._scores[0] != relative:
            groups = proposal_groups(spec, self.config.step)
            self._scores = (relative, {s.group.name: torch.from_numpy(s.importance)
                                       for s in self.importance(spec, state, groups)})
        return self._scores[1][group]

    def _previous(self, study: optuna.Study, number: int
                  ) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]] | str:
        """The weights and training state trial `number` (the previous rung) left: from the run folder when
        they are there, else (or when they are damaged there) from the artifact store. What is wrong with them
        when neither copy can be read: the caller trains the proposal again from its parent."""
        damage: list[str] = []
        if self.run is not None and (self.artifacts is None or (self.run.trial_checkpoint(number).exists()
                                                                and self.run.trial_state(number).exists())):
            try:
                spec, state = read_checkpoint(self.run.trial_checkpoint(number))
                return spec, state, load_training_state(self.run.trial_state(number))
            except CheckpointError as exc:
                damage.append(str(exc))
        if self.artifacts is not None:
            with self.artifacts.trial_files(study, number) as (checkpoint, training):
                try:
                    spec, state = read_checkpoint(checkpoint)
                    return spec, state, load_training_state(training)
                except CheckpointError as exc:
                    damage.append(f"trial {number}'s copy in the artifact store {self.artifacts.location}: "
                                  + str(exc).split(": ", 1)[-1])
        return "; ".join(damage)

    def _start(self, study: optuna.Study, trial: optuna.Trial, cuts: Mapping[str, int],
               seed: int) -> tuple[Any, ShortTune, int]:
        """The proposal's child at step 0 (rung 0) or where the previous rung's trial left it, and the step its
        training here starts from. When the previous rung's files are unreadable, the child is trained again
        from its parent up to that step: training is deterministic (the proposal's seed, data order and RNG),
        so the weights are the ones the files held, and nothing else is evaluated again."""
        config = self.config
        previous = trial.user_attrs.get(FROM_ATTR)
        if previous is not None:
            found = self._previous(study, int(previous))
            if not isinstance(found, str):
                spec, state, training = found
                model = to_memory_format(build_model(spec), torch.channels_last)  # faster on CPU
                model.load_state_dict(state, strict=True)
                tune = ShortTune(model, self.dataset, lr=config.short_lr, batch_size=config.batch_size, seed=seed)
                tune.restore(training)
                return spec, tune, tune.step
            start = int(trial.user_attrs[START_ATTR])
            iteration = trial.user_attrs[ITERATION_ATTR]
            self.note(f"{found}; re-training proposal {label(cuts)} of iteration {iteration} from its parent "
                      f"network to step {start} instead (the same weights; nothing else is evaluated again)")
        spec, tune = self.child(study, str(trial.user_attrs[PARENT_ATTR]), cuts, seed)
        if previous is not None:
            tune.run_to(int(trial.user_attrs[START_ATTR]))
        return spec, tune, 0

    def child(self, study: optuna.Study, relative: str, cuts: Mapping[str, int],
              seed: int) -> tuple[Any, ShortTune]:
        """The parent `relative` shrunk by `cuts` ({group: channels kept}), its BN statistics refreshed, at step 0.
        The groups of a proposal of several cuts are disjoint channel sets, so each is cut by its scores in
        the parent, one after the other (as prune/knapsack.py's shrink_to)."""
        config = self.config
        parent_spec, parent_state = self._parent_of(study, relative)
        spec, state = parent_spec, parent_state
        for group, channels in cuts.items():
            scores = self._channel_scores(relative, parent_spec, parent_state, group)
            if scores is None and len(cuts) > 1:  # surgery's own L2 would read weights the other cuts narrowed
                scores = Magnitude(2).channel_scores(parent_spec, parent_state,
                                                     find_group(parent_spec, group, config.step))
            spec, state = shrink(spec, state, group, channels, config.step, scores)
        model = to_memory_format(build_model(spec), torch.channels_last)  # faster on CPU, refresh_bn included
        model.load_state_dict(state, strict=True)
        refresh_bn(model, self.dataset, num_batches=10, seed=seed)
        return spec, ShortTune(model, self.dataset, lr=config.short_lr, batch_size=config.batch_size, seed=seed)

    def rebuild(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> tuple[Any, dict[str, torch.Tensor]]:
        """A finished trial's network trained again from its parent (its checkpoint is unreadable): the same
        weights, as training is deterministic."""
        group, cuts = str(trial_group(trial)), trial_cuts(trial)
        seed = proposal_seed(self.config.seed, int(trial.user_attrs[ITERATION_ATTR]), group)
        spec, tune = self.child(study, str(trial.user_attrs[PARENT_ATTR]), cuts, seed)
        tune.run_to(int(trial.user_attrs[STOP_ATTR]))
        tune.close()
        return spec, {k: v.contiguous() for k, v in tune.model.state_dict().items()}

    def _save(self, trial: optuna.Trial, spec: Any, tune: ShortTune) -> None:
        """The trial's weights and training state, in the run folder (when here) and in the artifact store."""
        state = {k: v.contiguous() for k, v in tune.model.state_dict().items()}
        if self.run is not None:
            checkpoint, training = self.run.trial_checkpoint(trial.number), self.run.trial_state(trial.number)
            RunFolder.save(spec, state, checkpoint)
            save_training_state(tune, training)
            if self.artifacts is not None:
                self.artifacts.publish_trial(trial, checkpoint, training)
            return
        assert self.artifacts is not None
        with staging() as folder:
            checkpoint, training = folder / f"{trial.number:05d}.pt", folder / f"{trial.number:05d}.state.pt"
            RunFolder.save(spec, state, checkpoint)
            save_training_state(tune, training)
            self.artifacts.publish_trial(trial, checkpoint, training)

    def evaluate(self, study: optuna.Study, trial: optuna.Trial) -> optuna.trial.TrialState:
        """Run one rung of one proposal and record it in the study (steps trained, holdout metrics); its
        heartbeat is stamped on a timer meanwhile, so a slow proposal is never retried while its worker lives."""
        with heartbeat(trial):
            doomed = os.environ.get(KILL_GROUP_ENV)
            if doomed and doomed == storage_of(study).get_trial_system_attrs(trial_storage_id(trial)).get(
                    FIXED_PARAMS_ATTR, {}).get(GROUP_PARAM):
                os._exit(KILL_EXIT_CODE)
            return self._evaluate(study, trial)

    def _evaluate(self, study: optuna.Study, trial: optuna.Trial) -> optuna.trial.TrialState:
        config = self.config
        try:
            group = str(trial.suggest_categorical(GROUP_PARAM, self.group_names))
            attrs = trial.user_attrs
            # a proposal of several cuts carries them (proposals.cuts_attrs); a one-group one its channels param
            several = attr_cuts(attrs)
            cuts = several if several is not None else \
                {group: trial.suggest_int(CHANNELS_PARAM, config.step, self.max_channels, step=config.step)}
            seed = proposal_seed(config.seed, int(attrs[ITERATION_ATTR]), group)
            start = time.perf_counter()
            spec, tune, began = self._start(study, trial, cuts, seed)
            if tune.step != int(attrs[START_ATTR]):
                raise RuntimeError(f"trial {trial.number}: its checkpoint is at step {tune.step}, expected "
                                   f"{attrs[START_ATTR]}")
            metrics = []
            for step in attrs[EVAL_ATTR]:
                tune.run_to(int(step))
                accuracy, loss = holdout_metrics(tune.model, self.dataset)
                metrics.append([int(step), accuracy, loss])
                trial.report(accuracy, int(step))
                trial.set_user_attr(HEARTBEAT_ATTR, time.time())
            tune.run_to(int(attrs[STOP_ATTR]))
            tune.close()  # the model back on the CPU for its checkpoint
            self._save(trial, spec, tune)
            trial.set_user_attr(METRICS_ATTR, metrics)
            trial.set_user_attr(ACCURACY_ATTR, metrics[-1][1])
            trial.set_user_attr(LOSS_ATTR, metrics[-1][2])
            trial.set_user_attr(STEPS_ATTR, tune.step - began)  # a re-trained previous rung's steps count too
            trial.set_user_attr(SECONDS_ATTR, time.perf_counter() - start)
            study.tell(trial, metrics[-1][1])
            return optuna.trial.TrialState.COMPLETE
        except BaseException as exc:
            # skip_if_finished: the master may have failed this trial already (heartbeat gone stale during a
            # storage outage); telling it again would replace the real error with UpdateFinishedTrialError
            study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            if isinstance(exc, RunInterrupted) or disk_full(exc) is not None:
                try:
                    enqueue_again(study, trial)
                except Exception:  # noqa: S110 - the first failure is what the user must see, not this one
                    pass
            raise


def work(study: optuna.Study, evaluator: Evaluator, should_stop: Callable[[], bool], lock: Optional[Path] = None,
         backoff: Optional[Backoff] = None, on_trial: Optional[Callable[[optuna.trial.TrialState], None]] = None
         ) -> int:
    """Claim and evaluate proposals until `should_stop()`; returns how many were evaluated. An idle worker
    polls less and less often (`backoff`), so waiting between rungs and iterations costs next to nothing."""
    backoff = backoff if backoff is not None else Backoff()
    done = 0
    while not should_stop():
        trial = claim(study, lock)
        if trial is None:
            backoff.sleep()
            continue
        backoff.busy()
        state = evaluator.evaluate(study, trial)
        done += 1
        if on_trial:
            on_trial(state)
    return done
