"""One latency table per machine: runs share the table in $MNV3_SEARCH_LUT_DIR (tests point it at a temp
folder, see conftest.py), record which table they used, and never measure an entry it already holds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mnv3_search.cli import cli
from mnv3_search.latency import default_table_dir, default_table_path, make_backend

EXAMPLE = Path(__file__).resolve().parents[2] / "search_spaces" / "examples" / "small_choices.yaml"


def test_default_folder_is_the_env_var_else_the_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MNV3_SEARCH_LUT_DIR", str(tmp_path / "luts"))
    assert default_table_dir() == tmp_path / "luts"
    assert default_table_path(make_backend("onnxruntime", 1)).parent == tmp_path / "luts"
    monkeypatch.delenv("MNV3_SEARCH_LUT_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_table_dir() == tmp_path / "cache" / "mnv3-search" / "lut"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_table_dir() == Path.home() / ".cache" / "mnv3-search" / "lut"


def _explore(out: Path) -> dict:
    result = CliRunner().invoke(cli, ["explore", str(EXAMPLE), "--budget", "95%", "--trials", "2", "--resolution",
                                      "64", "--steps", "2", "--reports", "1", "--limit", "120", "--batch-size", "16",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "explore.json").read_text())["latency_table"]


@pytest.mark.slow
def test_a_second_run_measures_no_entry_the_machines_table_holds(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("MNV3_SEARCH_LUT_DIR", str(tmp_path / "luts"))
    table_path = default_table_path(make_backend("onnxruntime", 1))
    first = _explore(tmp_path / "a")
    assert first["path"] == str(table_path.resolve()) and first["entries_measured"] > 0
    entries = len(json.loads(table_path.read_text())["entries"])
    assert first["entries"] == entries
    content = table_path.read_bytes()
    # same search, another folder: same seed network and trials, every entry already in the machine's table
    second = _explore(tmp_path / "b")
    assert second["entries_measured"] == 0
    assert second["entries"] == entries == len(json.loads(table_path.read_text())["entries"])
    assert table_path.read_bytes() == content  # not even the calibration was redone
    assert second["sha256"] == hashlib.sha256(content).hexdigest() == first["sha256"]
