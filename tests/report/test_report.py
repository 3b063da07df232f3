"""report: non-empty PNGs and a summary from a tiny real NetAdapt run; a folder of runs gives a Pareto plot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mnv3_search.cli import cli
from mnv3_search.report.plots import pareto_mask, read_run, runs_frame

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tiny_run: Path) -> Path:
    return tiny_run


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


TAB_BLUE, TAB_RED, GREY = (0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28), (0x80, 0x80, 0x80)


def _pixels(path: Path, rgb: tuple[int, int, int], tolerance: int = 8) -> int:
    """How many pixels of the PNG have this colour (within `tolerance` per channel, 0-255)."""
    import numpy as np
    from matplotlib.image import imread

    image = np.round(imread(path)[..., :3] * 255).astype(int)
    return int((np.abs(image - np.array(rgb)).max(axis=-1) <= tolerance).sum())


def _colourful(path: Path) -> int:
    """Pixels that are clearly coloured (not white, grey or black): markers, lines, bars, colour maps."""
    from matplotlib.image import imread

    image = imread(path)[..., :3]
    return int((image.max(axis=-1) - image.min(axis=-1) > 0.25).sum())


def test_report_pngs_show_the_runs_data(tmp_path: Path, run_dir: Path) -> None:
    """Data on the axes, not just a valid file: each figure is drawn again from the same run with its rows
    removed (axes, labels, legend and title stay), and the real one must hold far more coloured pixels —
    the series it plots. An empty figure, or one that lost a series, fails. (Seen on the tiny run:
    iterations 1,081 blue / 1,080 red pixels vs 165 / 172 empty; proposals 1,415 coloured vs 0.)"""
    from dataclasses import replace

    from mnv3_search.report.plots import plot_iterations, plot_proposals, plot_widths

    data = read_run(run_dir)
    assert len(data.iterations) >= 2 and len(data.proposals) >= 2
    empty = replace(data, iterations=data.iterations.iloc[0:0], proposals=data.proposals.iloc[0:0])
    real_it, blank_it = plot_iterations(data, tmp_path / "it.png"), plot_iterations(empty, tmp_path / "it0.png")
    # MACs per iteration (blue line + circles) and holdout accuracy (red line + triangles)
    assert _pixels(real_it, TAB_BLUE) > _pixels(blank_it, TAB_BLUE) + 300
    assert _pixels(real_it, TAB_RED) > _pixels(blank_it, TAB_RED) + 300
    real_pr, blank_pr = plot_proposals(data, tmp_path / "pr.png"), plot_proposals(empty, tmp_path / "pr0.png")
    chosen = int((data.proposals["chosen"].astype(str).str.lower() == "true").sum())
    assert chosen == len(data.iterations) - 1  # one red star per iteration after the seed
    assert _pixels(real_pr, TAB_RED) > _pixels(blank_pr, TAB_RED) + 60 * chosen  # the stars
    # every proposal's dot: coloured for those that trained to the end, hollow grey for those that halving
    # stopped at an earlier rung
    stopped = int((data.proposals["state"] == "PRUNED").sum())
    assert _colourful(real_pr) > _colourful(blank_pr) + 20 * (len(data.proposals) - stopped)
    assert stopped == 0 or _pixels(real_pr, GREY, 40) > _pixels(blank_pr, GREY, 40) + 10 * stopped
    # widths: blue bars for the final network beside the seed's grey ones; the final is narrower than the
    # seed, so it draws less blue than the seed drawn as final would
    widths = plot_widths(data, tmp_path / "w.png")
    same = plot_widths(replace(data, final_spec=data.seed_spec), tmp_path / "w1.png")
    assert data.final_spec != data.seed_spec
    assert 20_000 < _pixels(widths, TAB_BLUE) < _pixels(same, TAB_BLUE)  # bars, not a legend swatch


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
