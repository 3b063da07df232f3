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

from mnv3_search import build_model, load_spec
from mnv3_search.budget import LATENCY, MACS, PARAMS, Schedule, parse_budget, parse_schedule
from mnv3_search.cli import cli
from mnv3_search.netadapt import RunConfig, run_netadapt
from mnv3_search.netadapt.runfolder import ITERATION_COLUMNS, PROPOSAL_COLUMNS, RunFolder
from mnv3_search.netadapt.study import ITERATION_ATTR, create_study, make_storage, requeue_stale
from mnv3_search.spec.spaces import resolve_spec_path
from mnv3_search.model.weights import read_checkpoint
from postgres import postgres_bin, running_postgres

TINY = dict(data="digits", limit=240, batch_size=32, short_steps=4, reports=2, seed_epochs=2, long_epochs=1,
            resolution=64, threads=1)
TINY_ARGS = ["--limit", "240", "--batch-size", "32", "--short-steps", "4", "--reports", "2", "--seed-epochs", "2",
             "--long-epochs", "1", "--resolution", "64", "--threads", "1", "--quiet"]
SMALL_MACS_64 = 5_502_720  # Small at 64 px, 10 classes (checked against fvcore in the tests below)


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
    return optuna.load_study(study_name=folder.resolve().name, storage=make_storage(RunFolder(folder).default_storage_url))


def test_macs_budget_met_one_trial_per_proposal(tmp_path: Path) -> None:
    out = tmp_path / "macs"
    result = run_netadapt(RunConfig(spec_path="small", budget="5.2M-macs", **TINY), out=str(out))
    assert result.final_value <= 5.2e6 < result.seed_value == SMALL_MACS_64
    iterations = check_run_folder(out, SMALL_MACS_64)
    assert iterations["macs"].iloc[-1] == result.final_value
    trials = study_of(out).get_trials()
    proposals = pd.read_csv(out / "proposals.csv")
    assert len(trials) == len(proposals) == iterations["proposals"].sum()
    assert not proposals.duplicated(["iteration", "group"]).any()
    assert {t.state for t in trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert proposals["chosen"].sum() == len(iterations) - 1
    assert 0.0 <= result.test_accuracy <= 1.0


def test_latency_budget_is_confirmed_by_measurement(tmp_path: Path) -> None:
    out = tmp_path / "latency"
    result = run_netadapt(RunConfig(spec_path="small", budget="96%", **TINY), out=str(out))
    assert result.measured_ms is not None and result.seed_measured_ms is not None
    assert result.measured_ms / result.seed_measured_ms <= 0.96
    iterations = check_run_folder(out, SMALL_MACS_64)
    predicted = iterations["predicted_latency_ms"].tolist()
    assert all(b < a for a, b in zip(predicted, predicted[1:]))
    assert pd.notna(iterations["measured_latency_ms"].iloc[-1])
    assert Path(json.loads((out / "run.json").read_text())["latency_table"]["path"]).exists()  # the machine's table


def cli_command(out: Path, *extra: str, budget: str = "5.1M-macs") -> list[str]:
    return [sys.executable, "-m", "mnv3_search", "netadapt", "small", "--budget", budget, "--out", str(out),
            *TINY_ARGS, *extra]


def test_resume_after_sigkill_gives_the_same_network(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    subprocess.run(cli_command(reference), check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli_command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        csv = killed / "iterations.csv"
        if csv.exists() and len(pd.read_csv(csv)) >= 2:  # the seed row and iteration 1
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final.yaml").exists()
    done = subprocess.run(cli_command(killed), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert load_spec(killed / "final.yaml") == load_spec(reference / "final.yaml")
    first = pd.read_csv(reference / "iterations.csv")
    again = pd.read_csv(killed / "iterations.csv")
    assert first["proposal"].tolist() == again["proposal"].tolist()


def _scale_out(out: Path, storage: str | None) -> None:
    args = ["--workers", "2"] + (["--storage", storage] if storage else [])
    done = subprocess.run(cli_command(out, *args, budget="5.3M-macs"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    proposals = pd.read_csv(out / "proposals.csv")
    assert not proposals.duplicated(["iteration", "group"]).any()  # each proposal evaluated exactly once
    assert set(proposals["state"]) <= {"COMPLETE", "PRUNED"}
    assert proposals["worker"].nunique() == 2  # both processes evaluated proposals
    iterations = pd.read_csv(out / "iterations.csv")
    assert len(proposals) == iterations["proposals"].sum()


def test_two_local_workers_on_embedded_storage(tmp_path: Path) -> None:
    _scale_out(tmp_path / "journal", None)
    assert (tmp_path / "journal" / "study.journal").exists()


def test_two_local_workers_on_sqlite(tmp_path: Path) -> None:
    _scale_out(tmp_path / "sqlite", f"sqlite:///{tmp_path / 'study.db'}")


@pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL is not installed (apt-get install postgresql); "
                                                 ".ci/run installs it")
def test_two_local_workers_on_postgresql(tmp_path: Path) -> None:
    for url in running_postgres():
        _scale_out(tmp_path / "pg", url)
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


def assert_one_line_error(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("spec:")]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.output


def test_bad_inputs(tmp_path: Path) -> None:
    base = ["netadapt", "small", *TINY_ARGS]
    assert_one_line_error(run_cli(*base, "--budget", "fast", "--out", str(tmp_path / "a")),
                          "budget 'fast' is not understood")
    assert_one_line_error(run_cli(*base, "--budget", "1k-macs", "--out", str(tmp_path / "b")),
                          "budget 1k-macs cannot be reached: the smallest network this search can make")
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

