"""explore: list cells as choices, valid sampled specs within the budget by prediction, clear refusals."""

from __future__ import annotations

import json

from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from mnv3_search import SpecError, load_spec
from mnv3_search.cli import cli
from mnv3_search.explore import ExploreConfig, load_space, run_explore
from mnv3_search.latency import LatencyTable, make_backend

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "search_spaces" / "examples" / "small_choices.yaml"


def test_space_choices_and_loader_refusal() -> None:
    space = load_space(EXAMPLE)
    names = [c.name for c in space.choices]
    assert names[:3] == ["width", "classifier.hidden", "b4.k"] and "b7.se" in names and "b5.exp" in names
    assert space.size == 2 ** len(space.choices)
    assert space.base().width == 1.0 and space.base().blocks[3].kernel == 5
    with pytest.raises(SpecError, match=r"field 'width' holds a list of choices \[1.0, 0.75\].*mnv3-search explore"):
        load_spec(EXAMPLE)


def test_bad_choice_is_one_line(tmp_path: Path) -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["bneck"][3][0] = [5, 4]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as info:
        load_space(bad)
    message = str(info.value)
    assert "\n" not in message and "bneck row 4, field 'k'" in message and "choice 4" in message
    data["bneck"][3][0] = []
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match="empty list of choices"):
        load_space(bad)


def test_nothing_to_explore() -> None:
    result = CliRunner().invoke(cli, ["explore", "small", "--budget", "90%"])
    assert result.exit_code == 2
    assert "nothing to explore" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.timing
def test_explore_five_trials_within_budget(tmp_path: Path) -> None:
    out = tmp_path / "explore"
    config = ExploreConfig(spec_path=str(EXAMPLE), budget="85%", trials=5, resolution=64, steps=6, reports=2,
                           limit=240, batch_size=32)
    result = run_explore(config, out)
    frame = pd.read_csv(out / "trials.csv")
    assert len(frame) == 5 and set(frame["state"]) <= {"COMPLETE", "PRUNED", "REJECTED"}
    trained = frame[frame["state"] != "REJECTED"]
    assert (trained["predicted_latency_ms"] <= result.budget_value).all()
    assert (frame[frame["state"] == "REJECTED"]["predicted_latency_ms"] > result.budget_value).all()
    table = LatencyTable.open(json.loads((out / "explore.json").read_text())["latency_table"]["path"],
                              make_backend("onnxruntime"))  # the machine's table, as the run recorded it
    assert result.chosen, "no feasible trial in 5"
    for _, path in result.chosen:
        spec = load_spec(path)  # a valid concrete spec
        assert spec.num_classes == 10 and spec.resolution == 64
        assert table.predict(spec).calibrated_ms <= result.budget_value
    # resumable: the same command with more trials runs only the missing one
    more = run_explore(ExploreConfig(**{**config.__dict__, "trials": 6}), out)
    assert len(more.trials) == 6


@pytest.mark.slow
def test_explore_multi_objective_cli(tmp_path: Path) -> None:
    out = tmp_path / "mo"
    result = CliRunner().invoke(cli, ["explore", str(EXAMPLE), "--budget", "4.5M-macs", "--multi-objective",
                                      "--trials", "4", "--resolution", "64", "--steps", "4", "--reports", "2",
                                      "--limit", "240", "--batch-size", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "trials.csv")
    pareto = sorted((out / "pareto").glob("trial-*.yaml"))
    assert len(pareto) == int(frame["pareto"].sum()) >= 1
    for path in pareto:
        assert load_spec(path).resolution == 64
    assert (frame[frame["pareto"]]["macs"] <= 4.5e6).all()


@pytest.mark.slow
def test_explore_median_pruner_stops_trials_and_best_yaml_is_the_best_feasible_trial(tmp_path: Path) -> None:
    """Single objective, MACs budget: the median pruner must stop some trials after their first reports
    (deterministic here: seeded sampler and training), best.yaml is the best feasible completed trial, and
    the same folder refuses other settings."""
    import optuna

    from mnv3_search import UserError, dump_spec
    from mnv3_search.netadapt.study import make_storage

    out = tmp_path / "so"
    config = ExploreConfig(spec_path=str(EXAMPLE), budget="1.9M-macs", trials=8, resolution=32, steps=6, reports=3,
                           limit=240, batch_size=32)
    result = run_explore(config, out)
    study = optuna.load_study(study_name=out.resolve().name, storage=make_storage(str(out / "study.journal")))
    trials = [t for t in study.get_trials() if t.state.is_finished()]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(trials) == 8 and len(pruned) > 0
    for t in pruned:  # stopped before the last report: fewer steps than --steps
        assert 1 <= len(t.intermediate_values) < config.reports and "steps" not in t.user_attrs
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and not t.user_attrs.get("rejected")]
    assert all(t.user_attrs["steps"] == config.steps for t in complete)
    frame = pd.read_csv(out / "trials.csv")
    assert int((frame["state"] == "PRUNED").sum()) == len(pruned)
    assert result.budget_value == 1.9e6 and result.resource == "macs"
    best = max((t for t in complete if t.user_attrs["macs"] <= 1.9e6), key=lambda t: t.value)
    assert result.chosen == [(best.number, out / "best.yaml")]
    assert list(frame[frame["pareto"]]["trial"]) == [best.number]
    expected = tmp_path / "expected.yaml"
    space = load_space(EXAMPLE)
    dump_spec(space.concrete(best.params).with_overrides(resolution=32, num_classes=10), expected)
    assert (out / "best.yaml").read_text() == expected.read_text()
    assert load_spec(out / "best.yaml").resolution == 32 and not (out / "pareto").exists()
    with pytest.raises(UserError, match=r"holds an exploration with other settings \(steps, lr\); use another "
                                        r"--out or the same options to resume it"):
        run_explore(ExploreConfig(**{**config.__dict__, "steps": 8, "lr": 0.1}), out)
    assert len(study.get_trials()) == 8  # refused before any trial ran
