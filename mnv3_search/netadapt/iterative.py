"""NetAdapt's iterations (Yang et al. 2018, as MobileNetV3 used them), guided and recorded by Optuna.

While the network's figure exceeds the budget: target = current - the schedule's cut; the iteration's
proposals (proposals.py: per group, the largest width whose child meets it) are fine-tuned briefly and scored
on the holdout by successive halving (halving.py); the selection rule (selection.py: dAcc / |dLatency| or
accuracy, holdout noise a tie) picks the winner among the last rung; its network is saved with a row in
iterations.csv and the ledger rebuilt (ledger.py). Under a latency budget every iteration's network is timed
beside the seed (confirm.py): the first whose measurement meets the budget ends the loop, so a table that
over-predicts small networks cannot make it cut past the budget; one that does not corrects the target by
predicted / measured and the loop goes on.

Every iteration ends with its checkpoint and its row, so running the same command again resumes after the
last finished iteration, reusing the study's finished trials.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ..errors import CheckpointError
from ..model.counts import spec_macs, spec_params
from ..model.weights import read_checkpoint
from ..prune.groups import proposal_groups
from ..spec.arch import ArchSpec
from .attrs import (ARTIFACTS_ATTR, CHANNELS_BEFORE_ATTR, CONFIG_ATTR, GROUPS_ATTR, KIND_ATTR, LAST_RUNG_ATTR,
                    MACS_ATTR, PARAMS_ATTR, PARENT_ACCURACY_ATTR, PARENT_ATTR, PARENT_RESOURCE_ATTR,
                    PREDICTED_LATENCY_ATTR, RESOURCE_ATTR, RUN_DIR_ATTR, RUNG_ATTR, STEPS_ATTR, TIE_TOLERANCE_ATTR)
from .evaluate import Evaluator
from .halving import SuccessiveHalving
from .ledger import write_proposals
from .pricing import BudgetUnreachable
from .proposals import OneGroupProposals, Parent, Proposal, ProposalSource, label, trial_cuts
from .runfolder import IterationRecord, RunFolder
from .session import Found, RunSession
from .study import claim_lock_path, iteration_trials, lost_connection, set_status, trial_group

MIN_CHOICE = 4  # proposals an iteration should choose among; fewer and the cut is halved (see MIN_CUT_SHARE)
MIN_CUT_SHARE = 0.01  # the smallest cut an iteration asks for, as a share of the seed (MobileNetV3's delta)

SourceFactory = Callable[[RunSession], ProposalSource]


@dataclass(frozen=True)
class WorkerOptions:
    """How this process shares the evaluation: `workers` local processes (this one included), a proposal
    retried after `stale_seconds` without a heartbeat, given up after `max_attempts` evaluations."""

    workers: int = 1
    stale_seconds: float = 300.0
    max_attempts: int = 2


class IterativeSearch:
    """NetAdapt's loop as a `ShapeSearch`. Each iteration's proposals are NetAdapt's one-group proposals,
    which also size the iteration's cut, plus those of `extra` sources (made per session), sized to the same
    goal and evaluated, ranked and recorded with them."""

    def __init__(self, options: WorkerOptions = WorkerOptions(), extra: Sequence[SourceFactory] = ()) -> None:
        self.options = options
        self.extra = extra

    def search(self, session: RunSession) -> Found:
        """Record the run in the study (what a worker needs to join), evaluate with the local workers, and
        leave the study finished (workers then leave), also when the loop fails."""
        study = session.study
        assert study is not None, "the iterative search keeps its trials in the run's study"
        config, folder = session.config, session.folder
        groups = proposal_groups(session.seed_spec, config.step)
        sources = [factory(session) for factory in self.extra]
        # the trials' group param ranges over the seed's groups and the names of the extra sources' proposals
        names = [g.name for g in groups] + [name for source in sources for name in source.names]
        widest = max(g.channels for g in groups)
        study.set_user_attr(CONFIG_ATTR, config.as_json())
        study.set_user_attr(RUN_DIR_ATTR, str(folder.path.resolve()))
        if session.artifacts is not None:
            study.set_user_attr(ARTIFACTS_ATTR, session.artifacts.location)  # where a worker finds checkpoints
        study.set_user_attr(GROUPS_ATTR, [names, widest])
        set_status(study, "running")
        evaluator = Evaluator(folder, config, names, widest, session.dataset, artifacts=session.artifacts,
                              note=lambda line: session.emit("recovered", note=line))
        lock = claim_lock_path(session.storage_url or folder.default_storage_url)
        halving = SuccessiveHalving(study, evaluator, config, lock=lock, stale_seconds=self.options.stale_seconds,
                                    max_attempts=self.options.max_attempts, emit=session.emit,
                                    proposals_csv=folder.proposals_csv)
        with self._finishing_study(session, study):
            found = _Loop(session, study, halving, sources).run()
            write_proposals(folder, study, config.select)  # a kill between the last row and its ledger left it short
            if session.artifacts is not None:
                session.artifacts.retire_parents(study)  # no proposal is left to start from them
        return found

    @contextmanager
    def _finishing_study(self, session: RunSession, study: optuna.Study) -> Iterator[None]:
        """`--workers N`: N - 1 extra local processes evaluate beside this one (worker.py) while the block runs;
        then the study is marked finished, which remote workers leave on, and the local ones are waited for."""
        # imported here: `python -m mnv3_search.netadapt.worker` must not find its module imported already
        from .worker import start_local_workers, stop_local_workers

        processes = start_local_workers(str(session.storage_url), session.study_name, session.folder.path,
                                        self.options.workers - 1)
        try:
            yield
        except BaseException:
            try:
                set_status(study, "finished")  # a resumed run sets it running again
            except Exception as also:
                if lost_connection(also) is None:
                    raise
                # the server is still down: the first failure is what the user must see, not this one
            stop_local_workers(processes)
            raise
        set_status(study, "finished")
        stop_local_workers(processes)


def _choice(cuts: dict[str, int], groups_before: dict[str, int]) -> dict[str, Any]:
    """iterations.csv's fields naming an iteration's choice; group and channels for a one-group cut."""
    fields: dict[str, Any] = {"proposal": label(cuts)}
    if len(cuts) == 1:
        (group, channels), = cuts.items()
        fields.update(group=group, channels_before=groups_before.get(group), channels=channels)
    return fields


class _Loop:
    """One run's iterations: the state they carry from one to the next is the parent network."""

    def __init__(self, session: RunSession, study: optuna.Study, halving: SuccessiveHalving,
                 extra: Sequence[ProposalSource]) -> None:
        self.session = session
        self.study = study
        self.halving = halving
        self.one_group = OneGroupProposals(session.pricing, session.config.step)
        self.extra = extra

    def run(self) -> Found:
        session, log, confirmer = self.session, self.session.log, self.session.confirmer
        target = effective_target = session.target
        if len(log.rows) > 1:
            last = log.last.iteration
            spec, state = RunFolder.load(session.folder.iteration_checkpoint(last))
            effective_target = confirmer.corrected_target(log.rows, target)
            # a kill between an iteration's row and its clean-up leaves its trials' checkpoints (100s of MB)
            self._clean([t for it in range(1, last + 1) for t in iteration_trials(self.study, it)])
        else:
            spec, state = session.seed_spec, session.seed_state
        while True:
            current = session.pricing.resource(spec)
            within = current <= effective_target
            # under a latency budget every chosen network is timed beside the seed: the table ranks a parent's
            # children well, but its error grows as the network shrinks, so the measurement says when to stop
            timed_each = (session.pricing.timing_table is not None and log.last.iteration > 0
                          and log.last.measured_latency_ms is None)
            if within or timed_each:
                confirmation = confirmer.median(spec)
                row = log.update_last(**confirmation.row_update)
                if confirmation.ok:
                    return Found(spec, state, row)
                effective_target = confirmer.corrected_target(log.rows, target)
                if within:
                    session.emit("disagreement", **confirmation.row_update, corrected_target=effective_target)
                continue
            spec, state = self._iteration(spec, state, current)

    def _iteration(self, spec: ArchSpec, state: dict[str, torch.Tensor],
                   current: float) -> tuple[ArchSpec, dict[str, torch.Tensor]]:
        """One iteration from the parent `spec`: proposals, halving, the winner saved and recorded."""
        session, config, folder, pricing = self.session, self.session.config, self.session.folder, \
            self.session.pricing
        iteration = session.log.last.iteration + 1
        if iteration > config.max_iterations:
            raise BudgetUnreachable(f"stopped after --max-iterations {config.max_iterations}; reached "
                                    f"{pricing.describe(current)}, budget {pricing.describe(session.target)}; the "
                                    f"results so far are in {folder.path}")
        started = time.perf_counter()
        parent_accuracy = session.log.last.holdout_accuracy
        assert parent_accuracy is not None
        checkpoint = folder.seed_checkpoint if iteration == 1 else folder.iteration_checkpoint(iteration - 1)
        parent = Parent(spec, state, current, parent_accuracy, str(checkpoint.relative_to(folder.path)))
        goal, proposals = self._proposals(parent, iteration)
        if session.artifacts is not None:  # workers without the run folder download it from there
            session.artifacts.publish_parent(self.study, parent.checkpoint, folder.path / parent.checkpoint)
        groups_before = {g.name: g.channels for g in proposal_groups(spec, config.step)}
        attrs = {p.name: self._trial_attrs(p, parent) for p in proposals}
        session.emit("iteration", iteration=iteration, current=current, goal=goal, target=session.target,
                     proposals=len(proposals))
        halved = self.halving.run(iteration, proposals, attrs, parent_accuracy, current,
                                  session.tolerance(parent_accuracy))
        best = halved.ranked[0]
        chosen = halved.finished[best.candidate.group]
        cuts = trial_cuts(chosen)
        child_spec, child_state = self._trial_checkpoint(chosen)
        RunFolder.save(child_spec, child_state, folder.iteration_checkpoint(iteration))
        trials = iteration_trials(self.study, iteration)
        finished = [t for t in trials if t.state == TrialState.COMPLETE]
        reached_last = {trial_group(t) for t in finished
                        if t.user_attrs.get(RUNG_ATTR) == t.user_attrs[LAST_RUNG_ATTR]}
        row = IterationRecord(
            iteration=iteration, **_choice(cuts, groups_before), target_latency_ms=pricing.latency_ms(goal),
            predicted_latency_ms=pricing.table.predict(child_spec).calibrated_ms if pricing.table else None,
            macs=spec_macs(child_spec), params=spec_params(child_spec),
            holdout_accuracy=best.candidate.accuracy, holdout_loss=best.candidate.loss, saving=best.saving,
            score=best.score, tie_tolerance=session.tolerance(parent_accuracy), tied=best.tied,
            decided_by=best.decided_by, proposals=len({trial_group(t) for t in finished}),
            pruned=len({trial_group(t) for t in finished} - reached_last),
            steps=sum(int(t.user_attrs.get(STEPS_ATTR, 0)) for t in finished),
            full_steps=len(proposals) * config.short_steps, wall_seconds=time.perf_counter() - started)
        session.log.append(row)
        write_proposals(folder, self.study, config.select)
        self._clean(trials)
        session.emit("chosen", **asdict(row), resource=pricing.resource(child_spec))
        return child_spec, child_state

    def _proposals(self, parent: Parent, iteration: int) -> tuple[float, list[Proposal]]:
        """The iteration's goal and proposals. Too few groups can make the scheduled cut (each group that can
        is used up by one cut that size, and a shrunk network's groups are small): the cut is halved rather
        than choosing among one or two proposals or stopping, down to MobileNetV3's delta of 1 % of the seed."""
        session = self.session
        cut = session.plan.schedule.reduction(iteration - 1, session.seed_value)
        goal = max(parent.resource - cut, 0.0)
        found = self.one_group.propose(parent, goal)
        wanted = min(MIN_CHOICE, len(self.one_group.shrinkable(parent.spec)))
        while len(found) < wanted and cut / 2 >= MIN_CUT_SHARE * session.seed_value:
            cut /= 2
            goal = max(parent.resource - cut, 0.0)
            found = self.one_group.propose(parent, goal)
        if not found:
            raise BudgetUnreachable(
                f"budget {session.config.budget} cannot be reached: no group can shrink enough for the next step; "
                f"the smallest reached is {session.pricing.describe(parent.resource)} (iteration {iteration - 1}); "
                f"the results so far are in {session.folder.path}")
        proposals = found + [p for source in self.extra for p in source.propose(parent, goal)]
        if len({p.name for p in proposals}) != len(proposals):
            raise ValueError(f"iteration {iteration}: two proposals share a name: {[p.name for p in proposals]}")
        return goal, proposals

    def _trial_attrs(self, proposal: Proposal, parent: Parent) -> dict[str, Any]:
        """What a proposal's trials carry besides their rung: read back by the ledger, the halving's ranking
        and the workers (the parent's checkpoint)."""
        pricing = self.session.pricing
        return {PARENT_ATTR: parent.checkpoint, KIND_ATTR: proposal.kind,
                CHANNELS_BEFORE_ATTR: proposal.channels_before,
                PREDICTED_LATENCY_ATTR: pricing.latency_ms(proposal.resource), MACS_ATTR: spec_macs(proposal.spec),
                PARAMS_ATTR: spec_params(proposal.spec), RESOURCE_ATTR: proposal.resource,
                PARENT_RESOURCE_ATTR: parent.resource, PARENT_ACCURACY_ATTR: parent.accuracy,
                TIE_TOLERANCE_ATTR: self.session.tolerance(parent.accuracy), LAST_RUNG_ATTR: self.halving.last_rung}

    def _trial_checkpoint(self, chosen: FrozenTrial) -> tuple[ArchSpec, dict[str, torch.Tensor]]:
        """The chosen trial's fine-tuned network: from the run folder, or the artifact store when a worker on
        another machine evaluated it; trained again from its parent when neither copy can be read."""
        folder, artifacts = self.session.folder, self.session.artifacts
        path = folder.trial_checkpoint(chosen.number)
        try:
            if path.exists() or artifacts is None:
                return read_checkpoint(path)
            with artifacts.trial_files(self.study, chosen.number) as (checkpoint, _):
                return read_checkpoint(checkpoint)
        except CheckpointError as exc:
            self.session.emit("recovered", note=f"{exc}; re-training the chosen proposal {trial_group(chosen)} "
                              f"from its parent network (the same weights; nothing else is evaluated again)")
            return self.halving.evaluator.rebuild(self.study, chosen)

    def _clean(self, trials: list[FrozenTrial]) -> None:
        """Delete finished iterations' trial checkpoints, here and in the artifact store."""
        folder, artifacts = self.session.folder, self.session.artifacts
        for t in trials:
            folder.trial_checkpoint(t.number).unlink(missing_ok=True)
            folder.trial_state(t.number).unlink(missing_ok=True)
            if artifacts is not None:
                artifacts.remove_trial(t)
