"""report: non-empty PNGs and a summary from a tiny real NetAdapt run; a folder of runs gives a Pareto plot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mnv3_search.cli import cli
from mnv3_search.report.plots import pareto_mask, read_run, runs_frame
from tiny_run import tiny_run_folder

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir() -> Path:
    return tiny_run_folder()


def _png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG


def test_report_run(tmp_path: Path, run_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["report", str(run_dir), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name in ("iterations.png", "proposals.png", "widths.png"):
        _png(tmp_path / name)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries
    for figure in ("params", "MACs", "holdout accuracy", "test accuracy", "proposals (pruned early)"):
        assert figure in result.output
    data = read_run(run_dir)
    assert data.resource == "macs" and data.seed_spec is not None and data.final_spec is not None


def test_report_folder_of_runs(tmp_path: Path, run_dir: Path) -> None:
    runs = tmp_path / "results"
    shutil.copytree(run_dir, runs / "a", ignore=shutil.ignore_patterns("*.pt", "*.onnx", "iterations", "trials"))
    shutil.copytree(run_dir, runs / "b", ignore=shutil.ignore_patterns("*.pt", "*.onnx", "iterations", "trials"))
    run_json = json.loads((runs / "b" / "run.json").read_text())
    run_json["result"]["test_accuracy"] -= 0.05
    run_json["result"]["final_macs"] -= 100_000
    (runs / "b" / "run.json").write_text(json.dumps(run_json))
    (runs / "not-a-run").mkdir()
    result = CliRunner().invoke(cli, ["report", str(runs)])
    assert result.exit_code == 0, result.output
    _png(runs / "pareto.png")
    assert "2 finished runs" in result.output
    frame = runs_frame([read_run(runs / "a"), read_run(runs / "b")])
    assert list(frame["run"]) == ["a", "b"]


def test_pareto_mask() -> None:
    # (latency, accuracy): b dominates c (faster and more accurate); a and b trade off
    assert pareto_mask([2.0, 1.0, 1.5], [0.9, 0.8, 0.7]) == [True, True, False]


def test_report_not_a_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a NetAdapt run folder" in result.output
