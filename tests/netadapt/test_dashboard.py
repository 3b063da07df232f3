"""optuna-dashboard on a finished run: the `dashboard` extra, served as the README says
(`optuna-dashboard results/<run>/study.journal`), lists the run's study and every one of its trials with the
figures the run recorded. Its PostgreSQL side is checked on a live two-machine run in tests/netadapt/test_s3.py."""

from __future__ import annotations

from pathlib import Path

import optuna

from support.dashboard import dashboard_trials, running_dashboard
from mnv3_search.netadapt.artifacts import recorded_artifacts
from mnv3_search.netadapt.attrs import ITERATION_ATTR, RUNG_ATTR
from mnv3_search.netadapt.study import make_storage


def test_optuna_dashboard_lists_a_finished_runs_trials(micro_run: Path) -> None:
    run = micro_run
    journal = str(run / "study.journal")
    trials = optuna.load_study(study_name=run.name, storage=make_storage(journal)).get_trials()
    assert len(trials) > 20  # 4 iterations of 6-7 proposals, each rung a trial
    with running_dashboard(journal) as url:
        shown = dashboard_trials(url, run.name)
    assert [(t["number"], t["state"], t["values"]) for t in shown] == \
        [(t.number, t.state.name.capitalize(), t.values) for t in trials]
    # what a reader filters on: the iteration and rung of each trial, its proposal's group and width
    for mine, t in zip(shown, trials):
        attrs = {a["key"]: a["value"] for a in mine["user_attrs"]}
        assert (attrs[ITERATION_ATTR], attrs[RUNG_ATTR]) == (str(t.user_attrs[ITERATION_ATTR]),
                                                             str(t.user_attrs[RUNG_ATTR]))
        assert {p["name"]: p["param_external_value"] for p in mine["params"]} == \
            {name: str(value) for name, value in t.params.items()}
        # its Artifacts tab: the two uploads (weights, training state) the trial recorded, by their file names
        assert sorted(a["artifact_id"] for a in mine["artifacts"]) == sorted(recorded_artifacts(t.system_attrs))
        assert sorted(a["filename"] for a in mine["artifacts"]) == [f"{t.number:05d}.pt", f"{t.number:05d}.state.pt"]
