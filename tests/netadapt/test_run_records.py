"""Typed run records: iterations.csv rows and run.json's result read back as the same typed values the loop
wrote, in one vocabulary (the library's RunResult, run.json and the CLI's --json share field names)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mnv3_search import UserError
from mnv3_search.netadapt.runfolder import ITERATION_COLUMNS, IterationRecord, RunFolder, RunResult

SEED = IterationRecord(iteration=0, proposal="seed", predicted_latency_ms=3.25, macs=56_000_000, params=1_500_000,
                       holdout_accuracy=0.875, holdout_loss=0.41, tie_tolerance=0.001, wall_seconds=0.0)
FIRST = IterationRecord(iteration=1, proposal="exp10=288", group="exp10", channels_before=576, channels=288,
                        target_latency_ms=3.1, predicted_latency_ms=3.05, measured_latency_ms=2.9,
                        seed_measured_latency_ms=3.2, latency_reliable=False, macs=50_000_000, params=1_300_000,
                        holdout_accuracy=0.87, holdout_loss=0.43, saving=0.2, score=-0.025, tie_tolerance=0.001,
                        tied=2, decided_by="holdout_loss", proposals=7, pruned=4, steps=96, full_steps=224,
                        wall_seconds=12.5)


def test_iteration_records_round_trip_with_their_types(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.write_iterations([SEED, FIRST])
    assert (tmp_path / "iterations.csv").read_text().splitlines()[0] == ",".join(ITERATION_COLUMNS)
    back = folder.read_iterations()
    assert back == [SEED, FIRST]
    assert type(back[1].channels) is int and type(back[1].latency_reliable) is bool
    assert back[0].group is None and back[0].latency_reliable is None


def test_the_csv_columns_are_the_record_fields_in_order() -> None:
    assert ITERATION_COLUMNS == [f.name for f in dataclasses.fields(IterationRecord)]
    assert ITERATION_COLUMNS[:2] == ["iteration", "proposal"] and ITERATION_COLUMNS[-1] == "wall_seconds"
    assert len(ITERATION_COLUMNS) == 24


def test_run_summary_and_run_result_share_one_vocabulary(tmp_path: Path) -> None:
    summary = RunResult(iterations=3, seed_resource=10.5, target=9.9, final_resource=9.8, measured_latency_ms=9.7,
                        seed_measured_latency_ms=10.4, test_accuracy=0.99, final_method="retrain")
    folder = RunFolder(tmp_path)
    folder.write_run_json({"config": {}})
    folder.write_result(summary)
    assert json.loads((tmp_path / "run.json").read_text())["result"]["seed_resource"] == 10.5
    assert folder.read_result() == summary
    result_fields = {f.name for f in dataclasses.fields(RunResult)}
    shared = {"iterations", "seed_resource", "target", "final_resource", "measured_latency_ms",
              "seed_measured_latency_ms", "test_accuracy"}
    assert shared <= result_fields and shared <= {f.name for f in dataclasses.fields(RunResult)}


def test_one_record_is_run_json_and_the_cli_json(tmp_path: Path) -> None:
    """run.json keeps what the run reached; --json adds where and how this call found it; reading run.json back
    gives the record without those."""
    result = RunResult(iterations=3, seed_resource=10.5, target=9.9, final_resource=9.8, measured_latency_ms=None,
                       seed_measured_latency_ms=None, test_accuracy=0.99, final_method="retrain", final_macs=7,
                       final_params=5, finished="2026-01-01T00:00:00", run_dir=tmp_path, already_finished=True)
    assert list(result.to_run_json()) == [
        "iterations", "seed_resource", "target", "final_resource", "measured_latency_ms", "seed_measured_latency_ms",
        "test_accuracy", "final_method", "final_macs", "final_params", "latency_table_entries_measured", "precision",
        "fp32_test_accuracy", "finished"]
    assert result.as_json() == {
        "run_dir": str(tmp_path), "nothing_to_do": False, "already_finished": True, "seed_resource": 10.5,
        "target": 9.9, "final_resource": 9.8, "iterations": 3, "measured_latency_ms": None,
        "seed_measured_latency_ms": None, "test_accuracy": 0.99, "precision": "fp32", "fp32_test_accuracy": None}
    assert list(result.as_json())[:3] == ["run_dir", "nothing_to_do", "already_finished"]
    folder = RunFolder(tmp_path)
    folder.write_run_json({"config": {}})
    folder.write_result(result)
    assert folder.read_result() == dataclasses.replace(result, run_dir=None, already_finished=False)


def test_a_summary_from_an_older_run_reads_and_a_damaged_one_is_one_line(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    older = {"iterations": 2, "seed_resource": 10.0, "target": 9.5, "final_resource": 9.4,
             "measured_latency_ms": None, "seed_measured_latency_ms": None, "test_accuracy": 0.98}
    folder.write_run_json({"config": {}, "result": older})
    assert folder.read_result() == RunResult(**older)  # no final_method: made before --final auto
    del older["target"]
    folder.write_run_json({"config": {}, "result": older})
    with pytest.raises(UserError, match=r"run\.json: damaged run file \(its result has no 'target'\); the run "
                                        r"cannot go on from it"):
        folder.read_result()
