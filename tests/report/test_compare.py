"""compare: one CSV row per variant with the documented columns, ratios relative to the first (baseline)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from mnv3_search import dump_spec, load_spec
from mnv3_search.cli import cli
from mnv3_search.report.compare import COMPARE_COLUMNS, compare_frame, load_variant
from mnv3_search.model.counts import spec_macs, spec_params

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


@pytest.fixture(scope="module")
def run_dir(tiny_run: Path) -> Path:
    return tiny_run


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



def test_compare_data_evaluates_the_weights_instead_of_reading_run_json(tmp_path: Path, run_dir: Path) -> None:
    """--data digits --data-resolution 48: the accuracy is the final weights' on that test split (computed
    here independently), not run.json's figure, and the source column says so."""
    from mnv3_search.data import load_dataset
    from mnv3_search.train import evaluate

    plain, evaluated = tmp_path / "plain.csv", tmp_path / "data.csv"
    result = CliRunner().invoke(cli, ["compare", str(run_dir), "--no-latency", "--csv", str(plain)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["compare", str(run_dir), "--data", "digits", "--data-resolution", "48",
                                      "--no-latency", "--csv", str(evaluated)])
    assert result.exit_code == 0, result.output
    before, after = pd.read_csv(plain).iloc[0], pd.read_csv(evaluated).iloc[0]
    assert before["accuracy_source"] == "run.json test"
    run_json = json.loads((run_dir / "run.json").read_text())
    assert before["accuracy"] == pytest.approx(run_json["result"]["test_accuracy"], abs=1e-12)
    assert after["accuracy_source"] == "digits test"
    variant = load_variant(str(run_dir))
    expected = evaluate(variant.model(), load_dataset("digits", resolution=48), load_dataset(
        "digits", resolution=48).test)
    assert after["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert f"{100 * expected:.2f}%" in result.output


@pytest.mark.parametrize("group, keep", [("out0", 8), ("exp2", 40), ("exp2", 16), ("out2-3", 16), ("out4-6", 24),
                                         ("exp5", 120),
                                         ("exp10", 200), ("last_conv", 136), ("hidden", 256)])
def test_spec_counts_match_fvcore_for_shrunk_children(group: str, keep: int) -> None:
    """spec_macs / spec_params are arithmetic on the spec; fvcore traces the built child: they must agree on
    children NetAdapt makes (expansion shrinks, coupled output groups, the head), not just on the seed.
    exp2 = 16 equals its input width: the child keeps its expansion conv, which the counts must still see."""
    from mnv3_search import build_model
    from mnv3_search.prune.surgery import child_spec
    from mnv3_search.profile import profile_model

    seed = load_spec(SPACES / "small.yaml").with_overrides(resolution=64, num_classes=10)
    child = child_spec(seed, group, keep)
    if group == "out4-6":  # and a child of a child: two groups shrunk
        child = child_spec(child, "exp9", 96)
    assert spec_macs(child) < spec_macs(seed)
    model = build_model(child)
    assert spec_macs(child) == profile_model(model).macs
    assert spec_params(child) == sum(p.numel() for p in model.parameters())


def test_compare_errors(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["compare", str(tmp_path)])
    assert result.exit_code == 2 and "not a run folder" in result.output
    result = CliRunner().invoke(cli, ["compare", "small", "--weights", "3=x.pt"])
    assert result.exit_code == 2 and "only 1 variants" in result.output
