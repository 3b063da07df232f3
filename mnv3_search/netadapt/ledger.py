"""The proposal ledger: proposals.csv, one row per proposal of every iteration, built from the study alone.

A row is the proposal's last finished rung (its holdout metrics, its rank there by the selection rule),
whether it was stopped (PRUNED) before the last rung, and what all its trials cost; a proposal that never
finished keeps its last trial's state and failure. Rebuilt whole after every iteration, so it never disagrees
with the study, also after a resume.
"""

from __future__ import annotations

from typing import Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from .attrs import (ACCURACY_ATTR, ATTEMPT_ATTR, CHANNELS_BEFORE_ATTR, FAILURE_ATTR, ITERATION_ATTR,
                    LAST_RUNG_ATTR, LOSS_ATTR, MACS_ATTR, PARAMS_ATTR, PARENT_ACCURACY_ATTR, PARENT_RESOURCE_ATTR,
                    PREDICTED_LATENCY_ATTR, RUNG_ATTR, SECONDS_ATTR, STEPS_ATTR, TIE_TOLERANCE_ATTR, WORKER_ATTR)
from .halving import evidence, rung_trials
from .proposals import label, trial_channels, trial_cuts
from .runfolder import ProposalRecord, RunFolder
from .selection import Ranked, rank
from .study import trial_group


def _rung(t: FrozenTrial) -> int:
    return int(t.user_attrs.get(RUNG_ATTR, 0))


def write_proposals(folder: RunFolder, study: optuna.Study, select: str) -> None:
    """proposals.csv from `study`, ranked by the selection rule `select`; the chosen proposal of each
    iteration is the one iterations.csv names."""
    chosen = {row.iteration: row.proposal for row in folder.read_iterations()}
    by_proposal: dict[tuple[int, str], list[FrozenTrial]] = {}
    everything = study.get_trials(deepcopy=False)
    for t in everything:
        if ITERATION_ATTR in t.user_attrs and t.state != TrialState.WAITING:
            by_proposal.setdefault((int(t.user_attrs[ITERATION_ATTR]), str(trial_group(t))), []).append(t)
    ranks: dict[tuple[int, int], dict[str, Ranked]] = {}
    for (iteration, _), trials in by_proposal.items():
        for t in trials:
            rung = _rung(t)
            if t.state == TrialState.COMPLETE and (iteration, rung) not in ranks:
                done = rung_trials(study, iteration, rung, everything).values()
                a = t.user_attrs
                scored = rank([evidence(str(trial_group(d)), d) for d in done], select,
                              float(a[PARENT_ACCURACY_ATTR]), float(a[PARENT_RESOURCE_ATTR]),
                              float(a[TIE_TOLERANCE_ATTR]))
                ranks[(iteration, rung)] = {r.candidate.group: r for r in scored}
    records = []
    for (iteration, group), trials in sorted(by_proposal.items()):
        complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=_rung)
        last = complete[-1] if complete else max(trials, key=lambda t: t.number)
        latest = max(trials, key=lambda t: t.number)  # a failed attempt keeps its reason
        rung = _rung(last)
        if not complete:
            state = last.state.name
        else:
            state = "COMPLETE" if rung == int(last.user_attrs[LAST_RUNG_ATTR]) else "PRUNED"
        ranked: Optional[Ranked] = ranks.get((iteration, rung), {}).get(group) if complete else None
        records.append(ProposalRecord(
            trial=last.number, iteration=iteration, group=group, cuts=label(trial_cuts(last)),
            channels_before=last.user_attrs.get(CHANNELS_BEFORE_ATTR), channels=trial_channels(last), state=state,
            rung=rung, predicted_latency_ms=last.user_attrs.get(PREDICTED_LATENCY_ATTR),
            macs=last.user_attrs.get(MACS_ATTR), params=last.user_attrs.get(PARAMS_ATTR),
            holdout_accuracy=last.user_attrs.get(ACCURACY_ATTR), holdout_loss=last.user_attrs.get(LOSS_ATTR),
            saving=ranked.saving if ranked else None, score=ranked.score if ranked else None,
            rank=list(ranks[(iteration, rung)]).index(group) + 1 if ranked else None,
            trials=len(trials), steps=sum(int(t.user_attrs.get(STEPS_ATTR, 0)) for t in complete),
            seconds=sum(float(t.user_attrs.get(SECONDS_ATTR, 0.0)) for t in complete),
            chosen=state == "COMPLETE" and chosen.get(iteration) == label(trial_cuts(last)),
            worker=" ".join(sorted({str(t.user_attrs.get(WORKER_ATTR)) for t in complete})),
            attempt=max(int(t.user_attrs.get(ATTEMPT_ATTR, 1)) for t in trials),
            failure=latest.user_attrs.get(FAILURE_ATTR) if latest.state == TrialState.FAIL else None))
    folder.write_proposals(records)
