"""The README's netadapt claims, end to end through the command line (issue 13): `--resume DIR` alone
continues a run with the settings in its run.json and refuses a changed one; a finished run run again trains
nothing; `--select accuracy`; `--max-iterations`; a params budget checked with the exact counter.

Every run starts from a session seed of tiny_run.py (its seed.pt, via --weights), so no seed is trained here:
Small at 64 px on 240 digits images (the micro network at 32 px for --select accuracy / --max-iterations),
8-step fine-tunes, MACs or params budgets (exact, no timing noise).
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
from click.testing import CliRunner, Result

from mnv3_search import build_model, load_spec
from mnv3_search.cli import cli
from mnv3_search.model.counts import spec_macs, spec_params
from mnv3_search.model.weights import read_checkpoint
from mnv3_search.netadapt.runfolder import RunFolder
from mnv3_search.netadapt.selection import LOSS_TIE
from mnv3_search.netadapt.study import make_storage
from mnv3_search.spec.spaces import resolve_spec_path
from support.tiny_run import MICRO_ARGS, MICRO_SPEC_PATH

TINY_ARGS = ["--limit", "240", "--batch-size", "32", "--short-steps", "8", "--seed-epochs", "2",
             "--long-epochs", "1", "--resolution", "64", "--threads", "1", "--quiet"]
SMALL_PARAMS_64 = 1_528_106  # Small at 64 px, 10 classes (README's compare table; checked below)
RESUME_BUDGET = "5.3M-macs"  # 2 iterations from the tiny seed (5,502,720 -> 5,364,480 -> 5,230,464 MACs)
ACCURACY_BUDGET = "0.85M-macs"  # the micro network: 8 iterations, so --max-iterations 2 stops the run


def run_cli(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def netadapt_args(tiny_run: Path, out: Path, budget: str, *extra: str) -> list[str]:
    """A fresh run from the session's tiny seed, as a user would type it."""
    return ["netadapt", "small", "--budget", budget, "--weights", str(tiny_run / "seed.pt"),
            "--out", str(out), *TINY_ARGS, *extra]


def one_error_line(result: Result, exit_code: int) -> str:
    """The single `Error: ...` line a refused command prints (besides the `spec: ...` note), no traceback."""
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("spec:")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def trials(folder: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=folder.resolve().name,
                             storage=make_storage(RunFolder(folder).default_storage_url)).get_trials()


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and modification time of every file in the run folder (checkpoints, tables, study, finals)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- runs shared by the tests below (module scope: each is made once) ---------------------------------------

@pytest.fixture(scope="module")
def resumed_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run killed (SIGKILL) right after its first iteration, then continued with `--resume DIR` and no
    other option. Returns the folder, what the killed run left, and the resume's CLI result."""
    out = tmp_path_factory.mktemp("resume") / "run"
    command = [sys.executable, "-m", "mnv3_search", *netadapt_args(tiny_run, out, RESUME_BUDGET)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    iterations_csv = out / "iterations.csv"
    while time.monotonic() < deadline:  # iterations.csv is written atomically: header, seed, iteration 1
        if iterations_csv.exists() and len(iterations_csv.read_text().splitlines()) >= 3:
            break
        assert proc.poll() is None, "the run ended before its first iteration was done"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final.yaml").exists(), "the kill came too late: the run had finished"
    killed = {
        "iterations": pd.read_csv(iterations_csv),
        "trials": {t.number: t for t in trials(out) if t.state == optuna.trial.TrialState.COMPLETE},
        "run_json": RunFolder(out).read_run_json(),
    }
    resumed = run_cli("netadapt", "--resume", str(out), "--quiet")
    return {"out": out, "killed": killed, "result": resumed}


@pytest.fixture(scope="module")
def accuracy_run(micro_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """`--select accuracy --max-iterations 2` with a budget 2 iterations cannot reach: the session's micro
    network from its seed (a third of a second a proposal, 7 proposals), 2 rungs so 4 reach the last one."""
    out = tmp_path_factory.mktemp("accuracy") / "run"
    return out, run_cli("netadapt", str(MICRO_SPEC_PATH), "--budget", ACCURACY_BUDGET, "--weights",
                        str(micro_run / "seed.pt"), "--out", str(out), *MICRO_ARGS, "--rungs", "2",
                        "--select", "accuracy", "--max-iterations", "2")


# --- 1. --resume DIR without --budget ------------------------------------------------------------------------

def test_resume_without_budget_continues_with_the_runs_own_settings(resumed_run: dict) -> None:
    out, killed, result = resumed_run["out"], resumed_run["killed"], resumed_run["result"]
    assert result.exit_code == 0, result.output
    assert f"results in {out}" in result.stdout and result.stdout.startswith("budget met after ")
    assert len(killed["iterations"]) >= 2  # the seed row and at least iteration 1 were done before the kill
    after = pd.read_csv(out / "iterations.csv")
    assert len(after) > len(killed["iterations"])  # the resume ran iterations of its own
    # the finished iterations are kept as they were, the run goes on from the last one
    columns = ["iteration", "proposal", "macs", "params", "holdout_accuracy", "steps"]
    pd.testing.assert_frame_equal(after[columns].iloc[:len(killed["iterations"])], killed["iterations"][columns])
    # every trial finished before the kill is reused, not run again
    now = {t.number: t for t in trials(out)}
    assert killed["trials"]
    for number, t in killed["trials"].items():
        assert now[number].state == optuna.trial.TrialState.COMPLETE
        assert now[number].user_attrs["metrics"] == t.user_attrs["metrics"]
    # the settings are run.json's (budget, tiny steps, weights), unchanged by the resume
    run_json = RunFolder(out).read_run_json()
    assert run_json["config"] == killed["run_json"]["config"]
    assert run_json["config"]["budget"] == RESUME_BUDGET and run_json["config"]["short_steps"] == 8
    assert (run_json["config"]["ladder"], run_json["config"]["keep"]) == ("early", 0.6)
    # rungs at 1, 2 and 8 steps: each trial trains its rung's share
    assert {t.user_attrs["steps"] for t in now.values() if t.state == optuna.trial.TrialState.COMPLETE} == {1, 6}
    final = load_spec(out / "final.yaml")
    assert spec_macs(final) == run_json["result"]["final_resource"] == after["macs"].iloc[-1] <= 5.3e6


def test_resume_refuses_a_changed_setting_in_one_line(resumed_run: dict, tmp_path: Path) -> None:
    out = resumed_run["out"]
    before = snapshot(out)
    cases = [
        (["--short-steps", "16"], "--short-steps 16 differs from this run's 8 (run.json)"),
        (["--keep", "0.5"], "--keep 0.5 differs from this run's 0.6 (run.json)"),
        (["--budget", "5M-macs"], f"--budget 5M-macs differs from this run's {RESUME_BUDGET} (run.json)"),
        (["--select", "accuracy"], "--select accuracy differs from this run's ratio (run.json)"),
        (["--holdout", "0.1"], "--holdout 0.1 differs from this run's default (run.json)"),
    ]
    for extra, expected in cases:
        line = one_error_line(run_cli("netadapt", "--resume", str(out), "--quiet", *extra), 2)
        assert line == (f"Error: {out}: {expected}; --resume continues a run with its own settings: leave "
                        f"{extra[0]} out, or start a new run with another --out"), line
    line = one_error_line(run_cli("netadapt", "large", "--resume", str(out), "--quiet"), 2)
    assert "SPEC large differs from this run's small (run.json)" in line
    line = one_error_line(run_cli("netadapt", "--resume", str(out), "--out", str(tmp_path / "x"), "--quiet"), 2)
    assert line.endswith("name different folders; --resume continues the run in its folder: give one of them")
    line = one_error_line(run_cli("netadapt", "small", "--quiet", "--out", str(tmp_path / "y")), 2)
    assert line == ("Error: --budget is required to start a run (15ms, 60%, 150M-macs, 3M-params); --resume DIR "
                    "continues a run with its own settings")
    assert snapshot(out) == before and not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # the same settings given again are no change: accepted (and the finished run says so)
    same = run_cli("netadapt", str(resolve_spec_path("small")), "--resume", str(out), "--quiet", "--budget",
                   RESUME_BUDGET, "--short-steps", "8", "--limit", "240", "--select", "ratio")
    assert same.exit_code == 0, same.output
    assert same.stdout.startswith("already finished: ")


# --- 2. a finished run run again ----------------------------------------------------------------------------

def test_a_finished_run_run_again_says_so_and_trains_nothing(tiny_run: Path, resumed_run: dict) -> None:
    out = resumed_run["out"]
    assert resumed_run["result"].exit_code == 0
    before, trial_count = snapshot(out), len(trials(out))
    run_json = RunFolder(out).read_run_json()
    assert {"final.yaml", "final.pt", "final.onnx", "iterations.csv", "proposals.csv", "study.journal",
            "run.json"} <= set(before)
    for args in (["netadapt", "--resume", str(out), "--quiet"], netadapt_args(tiny_run, out, RESUME_BUDGET)):
        again = run_cli(*args)
        assert again.exit_code == 0, again.output
        lines = again.stdout.splitlines()
        assert lines[0] == (f"already finished: {out} holds a finished run; nothing was trained (a new run needs "
                            f"another --out)")
        assert lines[1].startswith(f"budget met after {run_json['result']['iterations']} iterations: ")
        assert snapshot(out) == before  # no file written, not even touched
        assert len(trials(out)) == trial_count
    as_json = json.loads(run_cli("netadapt", "--resume", str(out), "--json").stdout)
    assert as_json["already_finished"] is True and as_json["test_accuracy"] == run_json["result"]["test_accuracy"]
    assert snapshot(out) == before


# --- 3. --select accuracy -----------------------------------------------------------------------------------

def test_select_accuracy_chooses_by_holdout_accuracy(accuracy_run: tuple[Path, Result]) -> None:
    """The accuracy rule end to end: run.json and iterations.csv record it (the score is the accuracy), and
    each iteration's choice is the most accurate proposal of the last rung, recomputed here from proposals.csv
    (accuracies within the holdout's tolerance tie and go to the lower loss, then the larger saving)."""
    out, _ = accuracy_run
    assert RunFolder(out).read_run_json()["config"]["select"] == "accuracy"
    iterations = pd.read_csv(out / "iterations.csv").iloc[1:]
    proposals = pd.read_csv(out / "proposals.csv")
    assert (iterations["score"] == iterations["holdout_accuracy"]).all()  # ratio would score dAcc/saving
    complete = proposals[proposals["state"] == "COMPLETE"]
    assert (complete["score"] == complete["holdout_accuracy"]).all()
    assert len(iterations) == 2
    for _, row in iterations.iterrows():
        last_rung = complete[complete["iteration"] == row["iteration"]]
        assert len(last_rung) >= 2  # a real choice
        best = last_rung["holdout_accuracy"].max()
        tied = last_rung[last_rung["holdout_accuracy"] + row["tie_tolerance"] + 1e-12 >= best]
        near = tied[tied["holdout_loss"] - tied["holdout_loss"].min() <= LOSS_TIE]
        expected = near.sort_values(["saving", "group"], ascending=[False, True]).iloc[0]
        chosen = proposals[(proposals["iteration"] == row["iteration"]) & proposals["chosen"]]
        assert len(chosen) == 1 and chosen["group"].iloc[0] == expected["group"]
        assert row["proposal"] == f"{expected['group']}={expected['channels']}"
        assert row["holdout_accuracy"] == expected["holdout_accuracy"] >= best - row["tie_tolerance"]
        assert row["tied"] == len(tied)
        if len(tied) == 1:
            assert row["holdout_accuracy"] == best and row["decided_by"] == "accuracy"


# --- 4. --max-iterations --------------------------------------------------------------------------------------

def test_max_iterations_stops_after_n_with_exit_3(accuracy_run: tuple[Path, Result]) -> None:
    out, result = accuracy_run
    iterations = pd.read_csv(out / "iterations.csv")
    assert iterations["iteration"].tolist() == [0, 1, 2]  # the seed's row and exactly 2 iterations
    reached = int(iterations["macs"].iloc[-1])
    assert reached > 850_000
    line = one_error_line(result, 3)
    assert line == (f"Error: stopped after --max-iterations 2; reached {reached:,} macs, budget 850,000 macs; "
                    f"the results so far are in {out}")
    assert sorted(set(pd.read_csv(out / "proposals.csv")["iteration"])) == [1, 2]
    assert (out / "iterations" / "002.pt").exists() and not (out / "iterations" / "003.pt").exists()
    assert not (out / "final.yaml").exists() and "result" not in RunFolder(out).read_run_json()
    # resumed (no --budget), it keeps its own limit: it stops again at once, training nothing
    before, count = snapshot(out), len(trials(out))
    again = run_cli("netadapt", "--resume", str(out), "--quiet")
    assert one_error_line(again, 3) == line
    assert len(trials(out)) == count
    assert {k: v for k, v in snapshot(out).items() if k != "study.journal"} == \
        {k: v for k, v in before.items() if k != "study.journal"}  # the study only records its status
    # a higher limit is not a different run: it continues from iteration 2, and run.json records the new limit
    rows_before = pd.read_csv(out / "iterations.csv")
    more = run_cli("netadapt", "--resume", str(out), "--max-iterations", "3", "--quiet")
    after = pd.read_csv(out / "iterations.csv")
    assert after["iteration"].tolist()[:4] == [0, 1, 2, 3]
    pd.testing.assert_frame_equal(after.iloc[:3].reset_index(drop=True), rows_before)
    assert RunFolder(out).read_run_json()["config"]["max_iterations"] == 3
    if more.exit_code == 3:
        assert one_error_line(more, 3).startswith("Error: stopped after --max-iterations 3; ")
    else:
        assert more.exit_code == 0, more.output
        assert (out / "final.yaml").exists()


# --- 5. a params budget ---------------------------------------------------------------------------------------

def test_params_budget_is_met_by_the_exact_count(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "params"
    result = run_cli(*netadapt_args(tiny_run, out, "1.5M-params"))
    assert result.exit_code == 0, result.output
    seed = load_spec(resolve_spec_path("small")).with_overrides(resolution=64, num_classes=10)
    assert spec_params(seed) == SMALL_PARAMS_64
    final = load_spec(out / "final.yaml")
    final_params = spec_params(final)
    assert final_params <= 1_500_000 < SMALL_PARAMS_64
    embedded, state = read_checkpoint(out / "final.pt")
    model = build_model(embedded)
    model.load_state_dict(state, strict=True)
    assert embedded == final and sum(p.numel() for p in model.parameters()) == final_params
    run_json = RunFolder(out).read_run_json()
    assert run_json["result"]["final_resource"] == run_json["result"]["final_params"] == final_params
    assert run_json["result"]["seed_resource"] == SMALL_PARAMS_64 and run_json["result"]["target"] == 1_500_000
    iterations = pd.read_csv(out / "iterations.csv")
    assert iterations["params"].iloc[0] == SMALL_PARAMS_64 and iterations["params"].iloc[-1] == final_params
    assert (iterations["params"].diff().dropna() < 0).all()
    assert result.stdout.startswith(f"budget met after {len(iterations) - 1} iterations: {final_params:,} params "
                                    f"(target 1,500,000 params); test accuracy ")
