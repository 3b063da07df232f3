"""benchmarks/latency_floor.py: what it says about a calibration form must follow from the measurements it reads."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "latency_floor.py"


def load_script():
    """The script as a module (benchmarks/ is not a package), run in this process: no second torch import."""
    spec = importlib.util.spec_from_file_location("latency_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_check(path: Path, raw: np.ndarray, measured: np.ndarray) -> None:
    ratio = measured / measured[0]
    pd.DataFrame({"network": ["seed", *[f"variant {i}" for i in range(1, len(raw))]], "raw_ms": raw,
                  "measured_ms": measured, "measured_ratio": ratio,
                  "relative_error_pct": 100 * (raw / raw[0] / ratio - 1)}).to_csv(path, index=False)


def test_a_two_term_host_is_fitted_exactly_by_two_term_and_not_by_the_plain_factor(tmp_path, monkeypatch, capsys):
    """Measurements that follow whole = 0.8 x sum + 0.5 ms per M params exactly, the same in both checks: the
    two-term form predicts every held-out variant (0 % in the same and in the other check), the plain factor
    cannot (the params term does not scale with the sum), and the variants' shares did not move."""
    variants = 12
    script = load_script()
    params = script.param_counts("small", variants)
    raw = np.linspace(3.0, 0.8, variants + 1)  # the seed's sum first, the variants' below it
    measured = 0.8 * raw + 0.5 * params / 1e6
    for repeat in (1, 2):
        write_check(tmp_path / f"latency_check_onnxruntime_small_quiet_{repeat}.csv", raw, measured)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--run", str(tmp_path), "--companions", "6", "--draws", "2"])
    script.main()
    rows = pd.read_csv(tmp_path / "latency_floor.csv").set_index("metric")["value"]
    assert rows["ratio_spread_median_pct"] == 0.0
    assert rows["same_two-term_mape_pct"] < 1e-6 and rows["other_two-term_mape_pct"] < 1e-6
    assert rows["same_plain_mape_pct"] > 5.0
    assert rows["same_chosen_mape_pct"] < 1e-6  # the rule keeps the form that fits
    assert "onnxruntime       small quiet  ratio moves 0.0% between repeats" in capsys.readouterr().out


def test_a_folder_without_checks_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--run", str(tmp_path)])
    with pytest.raises(SystemExit) as info:
        load_script().main()
    assert info.value.code == 2
    assert capsys.readouterr().err == (f"latency_floor.py: no latency_check_*.csv in {tmp_path}; run "
                                       f"benchmarks/latency.py --out {tmp_path} first\n")
