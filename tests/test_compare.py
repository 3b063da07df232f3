"""compare: one CSV row per variant with the documented columns, ratios relative to the first (baseline)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from mnv3_search import dump_spec, load_spec
from mnv3_search.cli import cli
from mnv3_search.report.compare import COMPARE_COLUMNS, compare_frame, load_variant
from mnv3_search.model.counts import spec_macs, spec_params
from tiny_run import tiny_run_folder

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


@pytest.fixture(scope="module")
def run_dir() -> Path:
    return tiny_run_folder()


def test_compare_csv(tmp_path: Path, run_dir: Path) -> None:
    narrow = tmp_path / "small_075.yaml"
    dump_spec(load_spec(SPACES / "small.yaml").with_overrides(width=0.75, num_classes=10, resolution=64), narrow)
    csv = tmp_path / "cmp.csv"
    result = CliRunner().invoke(cli, ["compare", "small", str(run_dir), str(narrow), "--resolution", "64",
                                      "--passes", "5", "--csv", str(csv)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(csv)
    assert list(frame.columns) == COMPARE_COLUMNS
    assert len(frame) == 3
    assert list(frame["kind"]) == ["spec", "run", "spec"]
    assert (frame["resolution"] == 64).all()
    base = frame.iloc[0]
    for column, ratio in (("params", "params_ratio"), ("macs", "macs_ratio"), ("latency_p25_ms", "latency_ratio")):
        assert frame[ratio].iloc[0] == pytest.approx(1.0)
        assert frame[ratio].to_numpy() == pytest.approx((frame[column] / base[column]).to_numpy())
    assert (frame["latency_p25_ms"] > 0).all() and (frame["latency_median_ms"] >= frame["latency_p25_ms"]).all()
    final = load_spec(run_dir / "final.yaml")
    assert frame["params"].iloc[1] == spec_params(final) and frame["macs"].iloc[1] == spec_macs(final)
    # accuracy: known only for the run folder (run.json's test accuracy); the baseline's is unknown -> no delta
    assert pd.isna(frame["accuracy"].iloc[0]) and 0.0 <= frame["accuracy"].iloc[1] <= 1.0
    assert frame["accuracy_delta"].isna().all()
    assert "mobilenet_v3_small" in result.output and run_dir.name in result.output


def test_compare_accuracy_delta_and_data(run_dir: Path) -> None:
    """Two variants with known accuracy: the delta is relative to the first; --data evaluates weights."""
    a, b = load_variant(str(run_dir)), load_variant(str(run_dir))
    b.accuracy = a.accuracy - 0.1
    frame = compare_frame([a, b])
    assert frame["accuracy_delta"].iloc[1] == pytest.approx(-0.1)
    assert frame["latency_ratio"].isna().all()  # not measured
    result = CliRunner().invoke(cli, ["compare", str(run_dir), "--data", "digits", "--no-latency"])
    assert result.exit_code == 0, result.output
    assert "%" in result.output


def test_compare_errors(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["compare", str(tmp_path)])
    assert result.exit_code == 2 and "not a run folder" in result.output
    result = CliRunner().invoke(cli, ["compare", "small", "--weights", "3=x.pt"])
    assert result.exit_code == 2 and "only 1 variants" in result.output
