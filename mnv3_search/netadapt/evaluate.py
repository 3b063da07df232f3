"""Evaluating proposals: what a worker does with a claimed trial.

Shrink the iteration's parent by the trial's (group, channels), refresh BN statistics, fine-tune for the
run's short-term steps while reporting holdout accuracy to Optuna (its pruner may stop the proposal),
save the fine-tuned weights into the run folder and tell the study the final holdout accuracy.
Workers never measure latency: that happens only where the run's latency table lives.
"""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

import optuna
import torch

from ..data import Dataset, load_dataset
from ..model.build import build_model
from ..spec.arch import ArchSpec
from ..prune.surgery import shrink
from ..train import fine_tune, refresh_bn
from .config import RunConfig
from .runfolder import RunFolder
from .study import HEARTBEAT_ATTR, ITERATION_ATTR, claim, heartbeat

# Test hook: a proposal of the group named here kills the process evaluating it (os._exit, like a crashing
# kernel or the OOM killer), so the retry and give-up path is tested with real process deaths
# (tests/test_reliability.py). Never set outside tests.
KILL_GROUP_ENV = "MNV3_SEARCH_TEST_KILL_GROUP"
KILL_EXIT_CODE = 86

def proposal_seed(seed: int, iteration: int, group: str) -> int:
    """A seed per proposal, the same in every process, so a retried or resumed proposal repeats exactly."""
    return zlib.crc32(f"{seed}:{iteration}:{group}".encode()) & 0x7FFFFFFF


def load_run_dataset(config: RunConfig) -> Dataset:
    return load_dataset(config.data, resolution=config.train_resolution, holdout=config.holdout, seed=config.seed,
                        limit=config.limit)


class Evaluator:
    """Evaluates claimed trials of one run; keeps the dataset and the current parent in memory."""

    def __init__(self, run: RunFolder, config: RunConfig, group_names: list[str], max_channels: int,
                 dataset: Optional[Dataset] = None) -> None:
        self.run = run
        self.config = config
        self.group_names = group_names
        self.max_channels = max_channels
        self.dataset = dataset if dataset is not None else load_run_dataset(config)
        self._parent: tuple[str, ArchSpec, dict[str, torch.Tensor]] | None = None

    def _parent_of(self, relative: str) -> tuple[ArchSpec, dict[str, torch.Tensor]]:
        if self._parent is None or self._parent[0] != relative:
            spec, state = RunFolder.load(self.run.path / relative)
            self._parent = (relative, spec, state)
        return self._parent[1], self._parent[2]

    def evaluate(self, study: optuna.Study, trial: optuna.Trial) -> optuna.trial.TrialState:
        """Run one proposal to completion (or pruning) and record it in the study; its heartbeat is stamped
        on a timer meanwhile, so a slow proposal is never retried while its worker lives."""
        with heartbeat(trial):
            if os.environ.get(KILL_GROUP_ENV) and os.environ[KILL_GROUP_ENV] == study._storage.get_trial_system_attrs(
                    trial._trial_id).get("fixed_params", {}).get("group"):  # noqa: SLF001
                os._exit(KILL_EXIT_CODE)
            return self._evaluate(study, trial)

    def _evaluate(self, study: optuna.Study, trial: optuna.Trial) -> optuna.trial.TrialState:
        config = self.config
        try:
            group = trial.suggest_categorical("group", self.group_names)
            channels = trial.suggest_int("channels", config.step, self.max_channels, step=config.step)
            iteration = int(trial.user_attrs[ITERATION_ATTR])
            parent_spec, parent_state = self._parent_of(str(trial.user_attrs["parent"]))
            child_spec, child_state = shrink(parent_spec, parent_state, group, channels, config.step)
            model = build_model(child_spec)
            model.load_state_dict(child_state, strict=True)
            seed = proposal_seed(config.seed, iteration, group)
            refresh_bn(model, self.dataset, num_batches=10, seed=seed)
            every = max(1, config.short_steps // config.reports)

            def report(step: int, accuracy: float) -> bool:
                trial.report(accuracy, -(-step // every))
                trial.set_user_attr(HEARTBEAT_ATTR, time.time())
                if trial.should_prune():
                    raise optuna.TrialPruned()
                return False

            start = time.perf_counter()
            result = fine_tune(model, self.dataset, config.short_steps, lr=config.short_lr,
                               batch_size=config.batch_size, seed=seed, eval_every=every, report=report)
            accuracy = float(result.accuracy or 0.0)
            RunFolder.save(child_spec, model.state_dict(), self.run.trial_checkpoint(trial.number))
            trial.set_user_attr("holdout_accuracy", accuracy)
            trial.set_user_attr("steps", result.steps)
            trial.set_user_attr("seconds", time.perf_counter() - start)
            study.tell(trial, accuracy)
            return optuna.trial.TrialState.COMPLETE
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return optuna.trial.TrialState.PRUNED
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise


def work(study: optuna.Study, evaluator: Evaluator, should_stop: Callable[[], bool], lock: Optional[Path] = None,
         poll_seconds: float = 0.5, on_trial: Optional[Callable[[optuna.trial.TrialState], None]] = None) -> int:
    """Claim and evaluate proposals until `should_stop()`; returns how many were evaluated."""
    done = 0
    while not should_stop():
        trial = claim(study, lock)
        if trial is None:
            time.sleep(poll_seconds)
            continue
        state = evaluator.evaluate(study, trial)
        done += 1
        if on_trial:
            on_trial(state)
    return done
