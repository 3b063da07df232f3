"""NetAdapt end to end on tiny settings: Small, 32 px training on digits, a few steps per proposal.

Budgets in MACs make runs deterministic (exact counts, no timing noise), which the resume and scale-out
tests need; one run with a latency budget checks the measured confirmation.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from mnv3_search import UserError, build_model, load_spec
from mnv3_search.budget import LATENCY, MACS, PARAMS, Schedule, parse_budget, parse_schedule
from mnv3_search.cli import cli
from mnv3_search.netadapt import BudgetUnreachable, RunConfig, run_netadapt
from mnv3_search.netadapt.selection import Candidate, rank, survivors
from mnv3_search.netadapt.runfolder import ITERATION_COLUMNS, PROPOSAL_COLUMNS, RunFolder
from mnv3_search.netadapt.study import ITERATION_ATTR, create_study, make_storage, requeue_stale
from mnv3_search.spec.spaces import resolve_spec_path
from mnv3_search.model.weights import read_checkpoint
from support.tiny_run import MICRO_ARGS, MICRO_BUDGET, MICRO_SPEC_PATH

TINY = dict(data="digits", limit=240, batch_size=32, short_steps=8, seed_epochs=2, long_epochs=1,
            resolution=64, threads=1)
TINY_ARGS = ["--limit", "240", "--batch-size", "32", "--short-steps", "8", "--seed-epochs", "2",
             "--long-epochs", "1", "--resolution", "64", "--threads", "1", "--quiet"]
SMALL_MACS_64 = 5_502_720  # Small at 64 px, 10 classes (checked against fvcore in the tests below)
HALVING_BUDGET = "5.3M-macs"  # tiny_run.py's run


@pytest.mark.parametrize("text, resource, value, relative", [
    ("15ms", LATENCY, 15.0, False), ("800us", LATENCY, 0.8, False), ("0.5 s", LATENCY, 500.0, False),
    ("60%", LATENCY, 0.6, True), ("150M-macs", MACS, 150e6, False), ("3M-params", PARAMS, 3e6, False),
    ("2.5k-params", PARAMS, 2500.0, False), ("40m macs", MACS, 40e6, False),
])
def test_parse_budget(text: str, resource: str, value: float, relative: bool) -> None:
    budget = parse_budget(text)
    assert (budget.resource, budget.relative) == (resource, relative)
    assert budget.value == pytest.approx(value)


@pytest.mark.parametrize("text, message", [
    ("fast", "budget 'fast' is not understood"), ("15", "is not understood"), ("0ms", "must be greater than zero"),
    ("150%", "between 0% and 100%"), ("12M-flops", "is not understood"),
])
def test_bad_budget(text: str, message: str) -> None:
    from mnv3_search.errors import UserError

    with pytest.raises(UserError, match=message):
        parse_budget(text)


def test_schedules() -> None:
    assert parse_schedule("netadapt") == Schedule(0.025, 0.96)
    assert parse_schedule("mobilenetv3").reduction(5, 20.0) == pytest.approx(0.2)
    assert parse_schedule("0.05,0.9").reduction(2, 100.0) == pytest.approx(5 * 0.81)


def test_counts_match_fvcore() -> None:
    from mnv3_search.model.counts import spec_macs, spec_params
    from mnv3_search.profile import profile_model

    spec = load_spec(resolve_spec_path("small")).with_overrides(resolution=64, num_classes=10)
    model = build_model(spec)
    assert spec_macs(spec) == profile_model(model).macs == SMALL_MACS_64
    assert spec_params(spec) == sum(p.numel() for p in model.parameters())


def check_run_folder(folder: Path, seed_macs: int) -> pd.DataFrame:
    """The documented files and columns, a strictly shrinking network, final weights that load strict."""
    iterations = pd.read_csv(folder / "iterations.csv")
    proposals = pd.read_csv(folder / "proposals.csv")
    assert list(iterations.columns) == ITERATION_COLUMNS
    assert list(proposals.columns) == PROPOSAL_COLUMNS
    assert iterations["iteration"].tolist() == list(range(len(iterations)))
    assert iterations["macs"].iloc[0] == seed_macs
    assert (iterations["macs"].diff().dropna() < 0).all()
    final_spec = load_spec(folder / "final.yaml")
    embedded, state = read_checkpoint(folder / "final.pt")
    assert embedded == final_spec
    build_model(final_spec).load_state_dict(state, strict=True)
    assert (folder / "final.onnx").stat().st_size > 0 and (folder / "run.json").exists()
    assert not any((folder / "trials").iterdir())  # fine-tuned proposals are cleaned up once chosen
    return iterations


def study_of(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name=folder.resolve().name,
                             storage=make_storage(RunFolder(folder).default_storage_url))


@pytest.fixture(scope="module")
def halving_run(tiny_run: Path) -> tuple[Path, dict]:
    """The session's tiny MACs-budget run (1-2 iterations, default evaluation; settings = TINY, HALVING_BUDGET)
    and its run.json result."""
    out = tiny_run
    assert RunFolder(out).read_run_json()["config"] == RunConfig(spec_path="small", budget=HALVING_BUDGET,
                                                                 **TINY).as_json()
    return out, RunFolder(out).read_run_json()["result"]


def test_macs_budget_met_one_row_per_proposal(halving_run) -> None:
    out, result = halving_run
    assert result["final_resource"] <= 5.3e6 < result["seed_resource"] == SMALL_MACS_64
    iterations = check_run_folder(out, SMALL_MACS_64)
    assert len(iterations) >= 2 and iterations["macs"].iloc[-1] == result["final_resource"]
    proposals = pd.read_csv(out / "proposals.csv")
    assert len(proposals) == iterations["proposals"].sum()
    assert not proposals.duplicated(["iteration", "group"]).any()
    assert set(proposals["state"]) == {"COMPLETE", "PRUNED"}
    assert proposals["chosen"].sum() == len(iterations) - 1
    assert 0.0 <= result["test_accuracy"] <= 1.0
    run_json = RunFolder(out).read_run_json()
    assert run_json["holdout_images"] == 359  # a quarter of digits' 1,438 training images
    seed_accuracy = iterations["holdout_accuracy"].iloc[0]
    assert iterations["tie_tolerance"].iloc[0] == pytest.approx(
        max(1 / 359, (seed_accuracy * (1 - seed_accuracy) / 359) ** 0.5))


def test_halving_every_proposal_reaches_the_first_rung_and_stopped_ones_stop_there(halving_run) -> None:
    """Synchronous successive halving, checked trial by trial in the study: every proposal is scored at rung
    0; exactly the best 60 % by the selection rule (recomputed here) go on; nothing trains past the rung it
    was stopped at; a comparison never mixes iterations."""
    out, _ = halving_run
    config = RunConfig(spec_path="small", budget=HALVING_BUDGET, **TINY)
    boundaries = config.rung_steps()

    def kept(n: int) -> int:  # 60 %, the nearest whole number, at least one
        return max(1, round(0.6 * n))

    assert boundaries == [1, 2, 8]
    study = study_of(out)
    assert {t.state for t in study.get_trials()} == {optuna.trial.TrialState.COMPLETE}
    iterations = pd.read_csv(out / "iterations.csv")
    proposals = pd.read_csv(out / "proposals.csv")
    for it in iterations["iteration"].iloc[1:]:
        trials = [t for t in study.get_trials() if t.user_attrs["iteration"] == it]
        assert len({t.user_attrs["parent"] for t in trials}) == 1
        mine = proposals[proposals["iteration"] == it].set_index("group")
        by_rung = {r: {t.params["group"]: t for t in trials if t.user_attrs["rung"] == r} for r in range(3)}
        assert set(by_rung[0]) == set(mine.index)  # every proposal reported at the first rung
        for rung in range(3):
            for t in by_rung[rung].values():  # steps recorded per trial: exactly its rung's share
                assert t.user_attrs["steps"] == boundaries[rung] - (boundaries[rung - 1] if rung else 0)
                assert [m[0] for m in t.user_attrs["metrics"]] == [boundaries[rung]]
            if rung:
                ranked = rank([Candidate(g, t.user_attrs["holdout_accuracy"], t.user_attrs["holdout_loss"],
                                         t.user_attrs["resource"]) for g, t in by_rung[rung - 1].items()],
                              "ratio", t.user_attrs["parent_accuracy"], t.user_attrs["parent_resource"],
                              t.user_attrs["tie_tolerance"])
                assert set(by_rung[rung]) == {r.candidate.group for r in ranked[:kept(len(ranked))]}
                assert all(t.user_attrs["resume_from"] == by_rung[rung - 1][g].number for g, t in by_rung[rung].items())
        stopped = mine[mine["state"] == "PRUNED"]
        assert len(stopped) > 0 and len(stopped) == len(mine) - len(by_rung[2])
        for group, row in stopped.iterrows():
            assert row["steps"] == boundaries[row["rung"]] < config.short_steps
            assert all(r <= row["rung"] for r in range(3) if group in by_rung[r])
            assert group not in by_rung[row["rung"] + 1]
        assert (mine.loc[mine["state"] == "COMPLETE", "steps"] == config.short_steps).all()
        row = iterations[iterations["iteration"] == it].iloc[0]
        n = len(mine)
        assert row["steps"] == mine["steps"].sum() == n * 1 + kept(n) * 1 + kept(kept(n)) * 6
        assert row["full_steps"] == n * config.short_steps and row["steps"] <= row["full_steps"] / 2
        assert row["pruned"] == len(stopped)
        chosen = mine[mine["chosen"]]
        assert len(chosen) == 1 and chosen["rank"].iloc[0] == 1 and chosen["state"].iloc[0] == "COMPLETE"
        assert row["proposal"] == f"{chosen.index[0]}={chosen['channels'].iloc[0]}"


def test_halving_sees_what_full_evaluation_sees(halving_run, tmp_path: Path) -> None:
    """Rung trials continue from checkpoints (weights, momentum, data order, RNG): iteration 1 evaluated in
    full, from the same seed, scores every proposal exactly as the halving run did at each rung."""
    out, _ = halving_run
    full = tmp_path / "full"
    config = RunConfig(spec_path="small", budget=HALVING_BUDGET, evaluation="full", max_iterations=1,
                       weights=str(out / "seed.pt"), **TINY)
    try:
        run_netadapt(config, out=str(full))  # its own choice may meet the budget at once
    except BudgetUnreachable as exc:
        assert "stopped after --max-iterations 1" in str(exc)
    halving = {(t.params["group"], t.user_attrs["stop_step"]): t.user_attrs["metrics"][0]
               for t in study_of(out).get_trials() if t.user_attrs["iteration"] == 1}
    seen = 0
    for t in study_of(full).get_trials():
        assert t.user_attrs["steps"] == 8 and [m[0] for m in t.user_attrs["metrics"]] == [1, 2, 8]
        for step, accuracy, loss in t.user_attrs["metrics"]:
            if (t.params["group"], step) in halving:
                assert halving[(t.params["group"], step)] == [step, accuracy, loss]
                seen += 1
    assert seen == len(halving)  # (which proposal wins may differ: benchmarks/pruner.py measures how often)


@pytest.mark.slow
def test_short_tune_resumes_exactly() -> None:
    """4 steps in one go equal 2 steps, a save of the training state, and 2 more in a fresh object."""
    from mnv3_search.data import load_dataset
    from mnv3_search.netadapt.evaluate import ShortTune

    data = load_dataset("digits", resolution=16, holdout=0.1, limit=200)
    spec = load_spec(resolve_spec_path("small")).with_overrides(num_classes=10, resolution=64)
    torch.manual_seed(1)
    start = {k: v.clone() for k, v in build_model(spec).state_dict().items()}

    def tune(state):
        model = build_model(spec)
        model.load_state_dict(state)
        return ShortTune(model, data, lr=0.05, batch_size=32, seed=3)

    straight = tune(start)
    straight.run_to(4)
    half = tune(start)
    half.run_to(2)
    saved, weights = half.state(), {k: v.clone() for k, v in half.model.state_dict().items()}
    torch.manual_seed(99)  # whatever ran in between
    resumed = tune(weights)
    resumed.restore(saved)
    resumed.run_to(4)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert not torch.equal(start["classifier.3.weight"], straight.model.state_dict()["classifier.3.weight"])


@pytest.mark.timing
def test_latency_budget_is_confirmed_by_measurement(tiny_seed: Path, tmp_path: Path) -> None:
    out = tmp_path / "latency"
    # from the tiny run's seed (the same Small at 64 px), trained alone: this pass runs in a process of its own
    result = run_netadapt(RunConfig(spec_path="small", budget="96%", weights=str(tiny_seed),
                                    **TINY), out=str(out))
    assert result.measured_latency_ms is not None and result.seed_measured_latency_ms is not None
    assert result.measured_latency_ms / result.seed_measured_latency_ms <= 0.96
    iterations = check_run_folder(out, SMALL_MACS_64)
    predicted = iterations["predicted_latency_ms"].tolist()
    assert all(b < a for a, b in zip(predicted, predicted[1:]))
    assert pd.notna(iterations["measured_latency_ms"].iloc[-1])
    # the verdict came from a measurement of the network beside the seed, and says whether the host disturbed it
    assert str(iterations["latency_reliable"].iloc[-1]) in ("True", "False")
    # every iteration's network was timed beside the seed (the seed row is not); the loop stopped at the first
    # whose measurement met the budget: every earlier one measured above it
    earlier = iterations.iloc[1:-1]
    assert earlier["measured_latency_ms"].notna().all() and pd.isna(iterations["measured_latency_ms"].iloc[0])
    assert (earlier["measured_latency_ms"] / earlier["seed_measured_latency_ms"] > 0.96).all()
    assert Path(json.loads((out / "run.json").read_text())["latency_table"]["path"]).exists()  # the machine's table


def test_the_timing_tests_seed_is_the_tiny_runs_seed(tiny_run: Path, tiny_seed: Path) -> None:
    """The `timing` tests adapt tiny_seed (seconds) instead of building the tiny run (~30 s) in
    their pass: the same network, bit for bit."""
    spec, state = read_checkpoint(tiny_seed)
    run_spec, run_state = read_checkpoint(tiny_run / "seed.pt")
    assert spec == run_spec and state.keys() == run_state.keys()
    assert all(torch.equal(state[k], run_state[k]) for k in run_state)


def micro_command(out: Path, *extra: str) -> list[str]:
    """micro_run's run as a user would type it: the micro network, MICRO_BUDGET, MICRO_ARGS."""
    return [sys.executable, "-m", "mnv3_search", "netadapt", str(MICRO_SPEC_PATH), "--budget", MICRO_BUDGET,
            "--out", str(out), *MICRO_ARGS, *extra]


def _complete_trials(folder: Path) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study_of(folder).get_trials() if t.state == optuna.trial.TrialState.COMPLETE]


def test_resume_in_the_middle_of_a_rung_loses_nothing(micro_run: Path, tmp_path: Path) -> None:
    """SIGKILL while iteration 1's first rung is half done; the resumed run reuses every finished trial
    (trial and step counts equal the uninterrupted run's), retries only the one in flight and ends with the
    same network, weights and test accuracy. (The micro network: 7 proposals in the first rung, 4 iterations.)"""
    reference = micro_run
    result = RunFolder(reference).read_run_json()["result"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(micro_command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    watched = None  # one storage, read incrementally: re-reading the whole journal every poll takes a core
    while time.monotonic() < deadline:
        if watched is None and (killed / "study.journal").exists():
            try:
                watched = study_of(killed)
            except KeyError:  # the journal file is there, the study's first record not yet
                pass
        if watched is not None and len([t for t in watched.get_trials(deepcopy=False, states=(
                optuna.trial.TrialState.COMPLETE,)) if t.user_attrs["iteration"] == 1]) >= 3:
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.number: t for t in _complete_trials(killed)}
    reference_trials = _complete_trials(reference)
    first_rung = [t for t in reference_trials if t.user_attrs["iteration"] == 1 and t.user_attrs["rung"] == 0]
    assert 3 <= len(before) < len(first_rung), "the kill did not land in the middle of iteration 1's first rung"
    assert len(pd.read_csv(killed / "iterations.csv")) == 1 and not (killed / "final.yaml").exists()

    # --stale-after 10 (a setting of the process, not of the run): a kill that lands between a claim and the
    # claimer's name being stamped leaves a RUNNING trial of no known process, retried once stale (default 300 s)
    done = subprocess.run(micro_command(killed, "--stale-after", "10"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    after = study_of(killed).get_trials()
    complete = [t for t in after if t.state == optuna.trial.TrialState.COMPLETE]
    for number, t in before.items():  # reused, not run again
        assert after[number].state == optuna.trial.TrialState.COMPLETE
        assert after[number].user_attrs["metrics"] == t.user_attrs["metrics"]
    assert len(complete) == len(reference_trials)
    assert sum(t.user_attrs["steps"] for t in complete) == sum(t.user_attrs["steps"] for t in reference_trials)
    failed = [t for t in after if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) <= 1 and len(after) == len(complete) + len(failed)  # at most the one in flight again
    assert load_spec(killed / "final.yaml") == load_spec(reference / "final.yaml")
    for key, value in read_checkpoint(reference / "final.pt")[1].items():
        assert torch.equal(value, read_checkpoint(killed / "final.pt")[1][key]), key
    assert RunFolder(killed).read_run_json()["result"]["test_accuracy"] == result["test_accuracy"]
    first = pd.read_csv(reference / "iterations.csv")
    again = pd.read_csv(killed / "iterations.csv")
    assert first["proposal"].tolist() == again["proposal"].tolist()
    assert first["steps"].tolist()[1:] == again["steps"].tolist()[1:]


def _scale_out(micro_run: Path, out: Path, storage: str | None) -> None:
    args = ["--workers", "2"] + (["--storage", storage] if storage else [])
    done = subprocess.run(micro_command(out, *args), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    proposals = pd.read_csv(out / "proposals.csv")
    assert not proposals.duplicated(["iteration", "group"]).any()
    assert set(proposals["state"]) == {"COMPLETE", "PRUNED"}
    trials = optuna.load_study(study_name=out.resolve().name, storage=make_storage(
        storage or RunFolder(out).default_storage_url)).get_trials()
    assert not pd.Series([(t.user_attrs["iteration"], t.params["group"], t.user_attrs["rung"]) for t in trials
                          if t.state == optuna.trial.TrialState.COMPLETE]).duplicated().any()
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes evaluated proposals
    iterations = pd.read_csv(out / "iterations.csv")
    assert len(proposals) == iterations["proposals"].sum()
    # the same command in one process (the session's micro run): the same choices, scores and network, since
    # every rung is deterministic and the selection never depends on which process finished first
    reference = micro_run
    one = pd.read_csv(reference / "iterations.csv")
    assert iterations["proposal"].tolist() == one["proposal"].tolist()
    assert iterations["holdout_accuracy"].tolist() == one["holdout_accuracy"].tolist()
    assert (out / "final.yaml").read_text() == (reference / "final.yaml").read_text()


def test_two_local_workers_on_embedded_storage(micro_run: Path, tmp_path: Path) -> None:
    _scale_out(micro_run, tmp_path / "journal", None)
    assert (tmp_path / "journal" / "study.journal").exists()


def test_two_local_workers_on_sqlite(micro_run: Path, tmp_path: Path) -> None:
    _scale_out(micro_run, tmp_path / "sqlite", f"sqlite:///{tmp_path / 'study.db'}")


def test_two_local_workers_on_postgresql(micro_run: Path, postgres_url: str, tmp_path: Path) -> None:
    url = postgres_url
    _scale_out(micro_run, tmp_path / "pg", url)
    names = [s.study_name for s in optuna.get_all_study_summaries(make_storage(url))]
    assert names == ["pg"]


def test_dead_worker_trial_is_retried(tmp_path: Path) -> None:
    study = create_study(f"sqlite:///{tmp_path / 's.db'}", "s")
    study.enqueue_trial({"group": "exp2", "channels": 64}, user_attrs={ITERATION_ATTR: 1, "parent": "seed.pt"})
    from mnv3_search.netadapt.study import claim

    trial = claim(study)
    assert trial is not None and claim(study) is None  # claimed once only
    trial.set_user_attr("heartbeat", time.time() - 1000)
    assert requeue_stale(study, 1, stale_seconds=60) == 1
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    retried = claim(study)
    assert retried is not None and retried.user_attrs["retry_of"] == trial.number
    assert study.get_trials()[1].system_attrs["fixed_params"] == {"group": "exp2", "channels": 64}


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_one_line_error(result, expected: str, exit_code: int = 2) -> None:
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("spec:")]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.output


def test_bad_inputs(tmp_path: Path) -> None:
    base = ["netadapt", "small", *TINY_ARGS]
    assert_one_line_error(run_cli(*base, "--budget", "fast", "--out", str(tmp_path / "a")),
                          "budget 'fast' is not understood")
    assert_one_line_error(run_cli(*base, "--budget", "1k-macs", "--out", str(tmp_path / "b")),
                          "budget 1k-macs cannot be reached: the smallest network this search can make", exit_code=3)
    assert_one_line_error(run_cli(*base, "--budget", "5M-macs", "--data", "nope", "--out", str(tmp_path / "c")),
                          "unknown dataset 'nope'")
    weights = tmp_path / "large.pt"
    torch.save(build_model(load_spec(resolve_spec_path("large")).with_overrides(num_classes=10)).state_dict(),
               weights)
    assert_one_line_error(run_cli(*base, "--budget", "5M-macs", "--weights", str(weights), "--out",
                                  str(tmp_path / "d")), "does not fit spec")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(run_cli(*base, "--budget", "5M-macs", "--out", str(blocker / "run")),
                          "cannot write the run folder")
    assert_one_line_error(run_cli(*base, "--budget", "5M-macs", "--storage", "postgresql://nobody@127.0.0.1:1/x",
                                  "--out", str(tmp_path / "e")), "storage 'postgresql://nobody@127.0.0.1:1/x' "
                                                                 "cannot be opened")
    for name in "abcde":
        assert not (tmp_path / name).exists()  # nothing half-written


def test_budget_above_the_seed_is_nothing_to_do(tmp_path: Path) -> None:
    result = run_cli("netadapt", "small", *TINY_ARGS, "--budget", "6M-macs", "--out", str(tmp_path / "n"))
    assert result.exit_code == 0, result.output
    assert "nothing to do: the seed already meets the budget" in result.stdout
    assert not (tmp_path / "n").exists()


def test_help_has_examples() -> None:
    for command in ("netadapt", "worker"):
        result = run_cli(command, "--help")
        assert result.exit_code == 0 and "Examples:" in result.output



# --- the selection rule ------------------------------------------------------------------------------------

def _choice(candidates: list[Candidate], rule: str = "ratio", parent: float = 0.90, current: float = 10.0,
            tolerance: float = 0.001):
    """The winner must not depend on the order the proposals come in (trial numbers, finishing order)."""
    import itertools

    winners = {rank(list(order), rule, parent, current, tolerance)[0] for order in itertools.permutations(candidates)}
    assert len(winners) == 1
    return winners.pop()


def test_a_tie_goes_to_the_lower_loss_then_the_larger_saving() -> None:
    a = Candidate("out11-12", accuracy=0.9907, loss=0.050, resource=9.9)  # the tie: same accuracy ...
    b = Candidate("out13-15", accuracy=0.9907, loss=0.050, resource=9.7)  # ... b saves more
    best = _choice([a, b])
    assert (best.candidate, best.decided_by, best.tied) == (b, "saving", 2)
    c = Candidate("exp5", accuracy=0.9907, loss=0.049, resource=9.9)  # smaller saving, better loss
    best = _choice([a, b, c])
    assert (best.candidate, best.decided_by, best.tied) == (c, "loss", 3)
    d = Candidate("exp9", accuracy=0.9907, loss=0.050, resource=9.7)  # equal in every signal: the name
    assert _choice([b, d]).candidate == d and _choice([b, d]).decided_by == "name"


def test_differences_within_the_holdout_standard_error_tie() -> None:
    from mnv3_search.netadapt.selection import tolerance

    assert tolerance(0.76, 1000) == pytest.approx(0.0135, abs=1e-4)  # 13.5 images
    assert tolerance(1.0, 359) == pytest.approx(1 / 359)  # never below one image
    one_image = 1 / 1000
    a = Candidate("a", accuracy=0.901, loss=0.30, resource=9.5)
    b = Candidate("b", accuracy=0.900, loss=0.29, resource=9.5)  # one image less, better loss
    assert _choice([a, b], tolerance=one_image).candidate == b
    c = Candidate("c", accuracy=0.899, loss=0.28, resource=9.5)  # two images less: accuracy decides
    assert _choice([a, c], tolerance=one_image).candidate == a
    assert _choice([a, c], tolerance=one_image).decided_by == "accuracy"
    assert _choice([a, b], tolerance=0.0).candidate == a


def test_a_gain_never_loses_to_an_equal_gain_with_a_smaller_saving() -> None:
    # dAcc/|dLat| would score small = 0.02/0.5 = 0.04 above large = 0.02/2.0 = 0.01
    small = Candidate("small", accuracy=0.92, loss=0.30, resource=9.5)
    large = Candidate("large", accuracy=0.92, loss=0.30, resource=8.0)
    assert _choice([small, large]).candidate == large
    bigger_gain = Candidate("more", accuracy=0.93, loss=0.31, resource=9.8)
    assert _choice([small, large, bigger_gain]).candidate == bigger_gain  # a larger gain still counts
    loses = Candidate("loses", accuracy=0.80, loss=0.60, resource=5.0)
    assert _choice([loses, small]).candidate == small  # any gain beats any loss


def test_ratio_rule_trades_accuracy_for_saving_and_accuracy_rule_does_not() -> None:
    # parent 0.90 at 10 ms: a loses 1 point for 1 ms, b loses 1.5 points for 3 ms (0.5 point per ms)
    a = Candidate("a", accuracy=0.89, loss=0.35, resource=9.0)
    b = Candidate("b", accuracy=0.885, loss=0.36, resource=7.0)
    ratio = _choice([a, b])
    assert ratio.candidate == b and ratio.score == pytest.approx(-0.015 / 3)
    assert ratio.saving == pytest.approx(3.0)
    assert _choice([a, b], rule="accuracy").candidate == a
    ranked = rank([a, b], "accuracy", 0.9, 10.0, 0.001)
    assert [r.candidate.group for r in ranked] == ["a", "b"]


def test_real_trials_in_any_order_give_the_same_choice() -> None:
    """Two studies holding the same finished proposals with opposite trial numbers pick the same one."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    evidence = [("out11-12", 0.9907, 0.051, 9.9), ("out13-15", 0.9907, 0.051, 9.7), ("exp3", 0.9861, 0.020, 9.8)]
    picks = []
    for order in (evidence, evidence[::-1]):
        study = optuna.create_study(direction="maximize")
        for group, accuracy, loss, resource in order:
            study.add_trial(create_trial(params={"group": group}, distributions={
                "group": CategoricalDistribution([e[0] for e in evidence])}, value=accuracy,
                user_attrs={"holdout_loss": loss, "resource": resource}))
        picks.append(rank([Candidate(t.params["group"], t.value, t.user_attrs["holdout_loss"],
                                     t.user_attrs["resource"]) for t in study.trials], "ratio", 0.9907, 10.0,
                          1 / 360)[0].candidate.group)
    assert picks == ["out13-15", "out13-15"]


def test_holdout_sizes() -> None:
    from mnv3_search.data import holdout_size

    assert holdout_size(60_000, None) == 1000  # Fashion-MNIST: one image = 0.1 point
    assert holdout_size(50_000, None) == 1000  # CIFAR-10
    assert holdout_size(1_438, None) == 359  # digits: a quarter of the training images
    assert holdout_size(1_000, 0.2) == 200 and holdout_size(1_000, 300) == 300 and holdout_size(10, 50) == 9
    with pytest.raises(Exception, match="--holdout 1.5"):
        RunConfig(spec_path="small", budget="90%", holdout=1.5)


def test_rung_ladders_and_keep() -> None:
    """The default ladder scores at short-steps/8, /4 and /1 and keeps 60 % a rung; runs recorded before the
    ladder existed resume on theirs (/4, /2, /1, the better half)."""
    def config(**kw):
        return RunConfig(spec_path="small", budget="90%", **kw)

    assert config(short_steps=20).rung_steps() == [2, 5, 20]
    assert config(short_steps=16).rung_steps() == [2, 4, 16]
    assert config(short_steps=20, rungs=4).rung_steps() == [1, 2, 5, 20]
    assert config(short_steps=20, rungs=2).rung_steps() == [5, 20]
    assert config(short_steps=20, rungs=1).rung_steps() == [20]
    assert config(short_steps=20, ladder="geometric").rung_steps() == [5, 10, 20]
    assert config(short_steps=20, rungs=4, ladder="geometric").rung_steps() == [2, 5, 10, 20]
    with pytest.raises(UserError, match=r"--short-steps 15 is too few for --rungs 4: the first rung scores after "
                                        r"short-steps/16, so use at least 16 steps or fewer rungs"):
        config(short_steps=15, rungs=4)
    config(short_steps=8, rungs=4, ladder="geometric")  # /8 of 8 is one step
    for keep in (0.0, 1.0, 1.5):
        with pytest.raises(UserError, match=f"--keep {keep}: give the fraction of proposals"):
            config(keep=keep)
    with pytest.raises(UserError, match="ladder 'steep': use one of early, geometric"):
        config(ladder="steep")
    old = {k: v for k, v in config().as_json().items() if k not in ("ladder", "keep")}
    legacy = RunConfig.from_json(old, "run.json")
    assert (legacy.ladder, legacy.keep, legacy.rung_steps()) == ("geometric", 0.5, [5, 10, 20])
    assert RunConfig.from_json(config().as_json(), "run.json") == config()


def test_survivors_keep_the_nearest_whole_share_a_half_rounded_down() -> None:
    ranked = rank([Candidate(f"g{i:02d}", 0.9 - i / 100, 0.3, 9.0) for i in range(17)], "accuracy", 0.9, 10.0, 0.0)
    kept = {n: len(survivors(ranked[:n], 0.6)) for n in (1, 2, 3, 4, 5, 10, 11, 17)}
    assert kept == {1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 10: 6, 11: 7, 17: 10}
    assert [len(survivors(ranked[:n], 0.5)) for n in (1, 2, 3, 7, 17)] == [1, 1, 1, 3, 8]  # n // 2, at least 1
    assert [r.candidate.group for r in survivors(ranked, 0.6)] == [f"g{i:02d}" for i in range(10)]  # the best


def test_a_remote_worker_joins_through_the_path_the_run_folder_is_mounted_at(micro_run: Path, tmp_path: Path) -> None:
    """`mnv3-search worker --run-dir DIR` as on another machine where the run folder is mounted elsewhere
    (here a symlink): the worker claims and evaluates proposals of a run started without local workers, both
    exit 0, and the run makes the one-process run's choices and network."""
    out, mount, db = tmp_path / "run", tmp_path / "mnt", f"sqlite:///{tmp_path / 'study.db'}"
    out.mkdir()
    mount.symlink_to(out, target_is_directory=True)
    log = tmp_path / "master.log"
    master = subprocess.Popen(micro_command(out, "--storage", db), stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 300
    while "run" not in [s.study_name for s in optuna.get_all_study_summaries(make_storage(db))]:
        assert master.poll() is None and time.monotonic() < deadline, "the master never created its study"
        time.sleep(0.5)
    worker = subprocess.run([sys.executable, "-m", "mnv3_search", "worker", "--storage", db, "--study", "run",
                             "--run-dir", str(mount), "--quiet"], capture_output=True, text=True, timeout=600)
    assert master.wait(timeout=600) == 0, log.read_text()
    assert worker.returncode == 0, worker.stderr
    trials = optuna.load_study(study_name="run", storage=make_storage(db)).get_trials()
    by_worker = pd.Series([t.user_attrs["worker"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE])
    assert by_worker.nunique() == 2  # the remote worker evaluated some of them
    reference = micro_run
    assert pd.read_csv(out / "iterations.csv")["proposal"].tolist() == \
        pd.read_csv(reference / "iterations.csv")["proposal"].tolist()
    assert (out / "final.yaml").read_text() == (reference / "final.yaml").read_text()
