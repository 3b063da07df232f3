"""Synchronous successive halving of one iteration's proposals, each rung of each proposal one Optuna trial.

Every proposal is enqueued for rung 0; once all of them finished, the best `keep` fraction by the selection
rule (selection.py) is enqueued for the next rung, continuing from its checkpoint (evaluate.py); and so on
to the last rung, whose ranking chooses. This process evaluates trials too and waits for other workers',
failing and enqueueing again the trials of a worker that died (study.requeue_stale). Finished trials are
reused after a resume: a rung interrupted half-way runs only the trials it had not finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..errors import UserError
from .attrs import (ACCURACY_ATTR, EVAL_ATTR, FROM_ATTR, ITERATION_ATTR, LOSS_ATTR, RESOURCE_ATTR, RUNG_ATTR,
                    START_ATTR, STOP_ATTR)
from .config import RunConfig
from .evaluate import Evaluator
from .events import Event
from .proposals import Proposal, cuts_attrs, trial_cut
from .selection import Candidate, Ranked, rank, survivors
from .polling import Backoff
from .study import claim, enqueue, iteration_trials, requeue_stale, trial_group


class Rung(NamedTuple):
    """A rung's fine-tune: from `start` to `stop` steps, scored on the holdout at each of `scored`."""

    start: int
    stop: int
    scored: list[int]


def rung_plan(config: RunConfig) -> list[Rung]:
    """Halving scores each rung's end; `full` is one rung to short_steps scored at every halving boundary (so
    the two can be compared offline)."""
    steps = config.rung_steps()
    if config.evaluation == "full":
        return [Rung(0, steps[-1], steps)]
    return [Rung(start, stop, [stop]) for start, stop in zip([0] + steps[:-1], steps)]


def rung_trials(study: optuna.Study, iteration: int, rung: int,
                trials: Optional[Sequence[FrozenTrial]] = None) -> dict[str, FrozenTrial]:
    """The finished trial of each proposal at `rung` (the first one, should a retry also have finished);
    `trials`: the study's trials when the caller already read them."""
    done: dict[str, FrozenTrial] = {}
    for t in iteration_trials(study, iteration, states=(TrialState.COMPLETE,)) if trials is None else trials:
        if t.state == TrialState.COMPLETE and t.user_attrs.get(ITERATION_ATTR) == iteration and \
                t.user_attrs.get(RUNG_ATTR, 0) == rung and trial_group(t) not in done:
            done[str(trial_group(t))] = t
    return done


def evidence(name: str, t: FrozenTrial) -> Candidate:
    """What the selection rule compares of a finished trial."""
    return Candidate(name, float(t.user_attrs[ACCURACY_ATTR]), float(t.user_attrs[LOSS_ATTR]),
                     float(t.user_attrs[RESOURCE_ATTR]))


@dataclass(frozen=True)
class Halved:
    """The last rung's ranking, best first, and its finished trial per proposal."""

    ranked: list[Ranked]
    finished: dict[str, FrozenTrial]


class SuccessiveHalving:
    """Runs iterations' rungs in one study; `lock`: the claim lock of the study's storage (study.claim_lock_path)."""

    def __init__(self, study: optuna.Study, evaluator: Evaluator, config: RunConfig, *, lock: Optional[Path],
                 stale_seconds: float, max_attempts: int, emit: Event, proposals_csv: Path) -> None:
        self.study = study
        self.evaluator = evaluator
        self.config = config
        self.plan = rung_plan(config)
        self.lock = lock
        self.stale_seconds = stale_seconds
        self.max_attempts = max_attempts
        self.emit = emit
        self.proposals_csv = proposals_csv  # where a user reads why every proposal failed

    @property
    def last_rung(self) -> int:
        return len(self.plan) - 1

    def run(self, iteration: int, proposals: Sequence[Proposal], attrs: Mapping[str, dict[str, Any]],
            parent_accuracy: float, parent_resource: float, tie_tolerance: float) -> Halved:
        """Every rung of `proposals` (their trials' user attrs in `attrs`, by name), ranked against the parent."""
        by_name = {p.name: p for p in proposals}
        entrants = sorted(by_name)
        previous: dict[str, int] = {}
        ranked: list[Ranked] = []
        finished: dict[str, FrozenTrial] = {}
        for rung, (start, stop, scored) in enumerate(self.plan):
            existing = iteration_trials(self.study, iteration)
            for name in entrants:
                group, channels = trial_cut(by_name[name])
                enqueue(self.study, iteration, group, channels,
                        {**attrs[name], **cuts_attrs(by_name[name]), START_ATTR: start, STOP_ATTR: stop,
                         EVAL_ATTR: scored, FROM_ATTR: previous.get(name)}, rung, existing)
            finished = self._wait(iteration, rung, entrants, len(proposals))
            if not finished:
                raise UserError(f"iteration {iteration}: every proposal failed at rung {rung}; see "
                                f"{self.proposals_csv}")
            ranked = rank([evidence(name, t) for name, t in finished.items()], self.config.select, parent_accuracy,
                          parent_resource, tie_tolerance)
            previous = {name: t.number for name, t in finished.items()}
            entrants = sorted(r.candidate.group for r in survivors(ranked, self.config.keep))
        return Halved(ranked, finished)

    def _wait(self, iteration: int, rung: int, names: list[str], total: int) -> dict[str, FrozenTrial]:
        """Evaluate and wait until no trial of `names` at `rung` is open, retrying the ones whose worker died.
        Returns the finished trial of each proposal; a proposal whose trial failed (a worker's error) is left
        out."""
        wanted = set(names)
        backoff = Backoff()
        while True:
            trials = iteration_trials(self.study, iteration)
            finished = {k: v for k, v in rung_trials(self.study, iteration, rung, trials).items() if k in wanted}
            open_ = [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)
                     and t.user_attrs.get(RUNG_ATTR, 0) == rung and trial_group(t) in wanted]
            self.emit("progress", iteration=iteration, rung=rung, rungs=len(self.plan), done=len(finished),
                      running=len(wanted), pruned=total - len(wanted), total=total)
            if not open_:
                return finished
            trial = claim(self.study, self.lock)
            if trial is not None:
                self.evaluator.evaluate(self.study, trial)
                backoff.busy()
                continue
            if requeue_stale(self.study, iteration, self.stale_seconds, self.max_attempts):
                self.emit("retry", iteration=iteration)
                backoff.busy()
            backoff.sleep()
