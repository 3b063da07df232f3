"""The `profile` command: output formats, SPEC resolution, and one clear line (exit 2) per bad input; and
what every command shares: one vocabulary of options, fast --help, CSV on stdout, --device."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner

from mnv3_search import build_model
from mnv3_search.cli import cli
from mnv3_search.cli import options as shared
from mnv3_search.report.frames import PROFILE_COLUMNS
from mnv3_search.model.weights import save_checkpoint
from support.reference_weights import reference_state_dict

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
SMALL_TEXT = (SPACES / "small.yaml").read_text()


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def edited(**changes) -> str:
    """small.yaml with top-level keys replaced (None deletes the key)."""
    data = yaml.safe_load(SMALL_TEXT)
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    return yaml.safe_dump(data, sort_keys=False)


def with_row(row: int, value) -> str:
    data = yaml.safe_load(SMALL_TEXT)
    data["bneck"][row - 1] = value
    return yaml.safe_dump(data, sort_keys=False)


BAD_SPECS = {
    "yaml syntax": ("stem: {out: 16\nbneck: [", "YAML syntax error at line"),
    "empty file": ("", "the file is empty"),
    "top level not a mapping": ("- 1\n- 2\n", "the top level must be a mapping"),
    "unknown key": (edited(colour="red"), "unknown key 'colour'"),
    "missing key": (edited(bneck=None), "missing key 'bneck'"),
    "wrong type": (with_row(3, [3, "wide", 24, False, "RE", 1]), "bneck row 3, field 'exp': a channel count must be an integer, got 'wide'"),
    "non-integer channels": (with_row(2, [3, 72.5, 24, False, "RE", 2]), "bneck row 2, field 'exp': a channel count must be an integer, got 72.5"),
    "zero channels": (with_row(2, [3, 72, 0, False, "RE", 2]), "bneck row 2, field 'out': a channel count must be at least 1, got 0"),
    "negative channels": (edited(stem={"out": -16}), "stem, field 'out': a channel count must be at least 1, got -16"),
    "absurd channels": (with_row(4, [5, 1000000, 40, True, "HS", 2]), "bneck row 4, field 'exp': a channel count 1000000 is absurdly large"),
    "even kernel": (with_row(5, [4, 240, 40, True, "HS", 1]), "bneck row 5, field 'k': kernel must be a positive odd integer"),
    "negative kernel": (with_row(5, [-3, 240, 40, True, "HS", 1]), "bneck row 5, field 'k': kernel must be a positive odd integer"),
    "stride 3": (with_row(6, [5, 240, 40, True, "HS", 3]), "bneck row 6, field 's': stride must be 1 or 2, got 3"),
    "unknown NL": (with_row(7, [5, 120, 48, True, "SWISH", 1]), "bneck row 7, field 'nl': unknown nonlinearity 'SWISH'"),
    "non-boolean SE": (with_row(8, [5, 144, 48, "maybe", "HS", 1]), "bneck row 8, field 'se': SE must be true or false, got 'maybe'"),
    "short row": (with_row(1, [3, 16, 16, True, "RE"]), "bneck row 1: a row has 6 values [k, exp, out, SE, NL, s], got 5"),
    "empty block list": (edited(bneck=[]), "bneck is empty"),
    "zero width": (edited(width=0), "field 'width': width must be > 0, got 0.0"),
    "negative width": (edited(width=-0.5), "field 'width': width must be > 0, got -0.5"),
    "resolution too small": (edited(resolution=16), "resolution 16 is too small for this network, which downsamples by 32"),
    "unknown row key": (with_row(1, {"k": 3, "exp": 16, "out": 16, "se": True, "nl": "RE", "s": 2, "x": 1}), "bneck row 1: unknown key 'x'"),
}


def assert_one_line_error(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: "), result.output
    assert expected in lines[-1], lines[-1]
    assert "Traceback" not in result.output
    assert sum(line.startswith("Error") for line in lines) == 1


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_gives_one_clear_line(tmp_path: Path, case: str) -> None:
    text, expected = BAD_SPECS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run("profile", str(path), "--no-latency")
    assert_one_line_error(result, f"{path}: " if case != "resolution too small" else str(path))
    assert_one_line_error(result, expected)


def test_missing_file() -> None:
    assert_one_line_error(run("profile", "nowhere/none.yaml", "--no-latency"),
                          "nowhere/none.yaml: no such file, and not a shipped search space; give a YAML path or one "
                          "of: large, small")


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00bad")
    assert_one_line_error(run("profile", str(path), "--no-latency"), f"{path}: cannot read the file")
    assert_one_line_error(run("profile", str(tmp_path), "--no-latency"), f"{tmp_path}: is a folder")


@pytest.mark.parametrize(
    "option, expected",
    [(["--resolution", "16"], "resolution 16 is too small for this network, which downsamples by 32; use a "
                              "resolution of at least 32"),
     (["--width", "0"], "width must be > 0, got 0.0"),
     (["--width", "-1"], "width must be > 0, got -1.0"),
     (["--width", "1000"], "over the limit of 8192")],
)
def test_bad_options(option: list[str], expected: str) -> None:
    assert_one_line_error(run("profile", "small", "--no-latency", *option), expected)


def test_checkpoint_that_does_not_fit(tmp_path: Path, small) -> None:
    path = tmp_path / "small.pt"
    torch.save(reference_state_dict("small"), path)
    assert_one_line_error(run("profile", "large", "--no-latency", "--weights", str(path)),
                          f"{path}: does not fit spec {SPACES / 'large.yaml'}: tensor 'features.1.block.1.0.weight' "
                          "is missing")
    # another class count is not a misfit: all but the final layer loads (tests/netadapt/test_transfer.py)
    result = run("profile", "small", "--no-latency", "--num-classes", "10", "--weights", str(path))
    assert result.exit_code == 0 and "made for 1000 classes" in result.stderr


def test_bad_checkpoint_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert_one_line_error(run("profile", "small", "--no-latency", "--weights", str(garbage)),
                          f"{garbage}: not a readable PyTorch weights file")
    assert_one_line_error(run("profile", "small", "--no-latency", "--weights", str(tmp_path / "none.pt")),
                          "no such checkpoint file")
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    assert_one_line_error(run("profile", "small", "--no-latency", "--weights", str(listing)), "holds no state_dict")


def test_checkpoint_with_extra_tensors_names_the_first(tmp_path: Path) -> None:
    state = reference_state_dict("small")
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    result = run("profile", "small", "--no-latency", "--weights", str(path))
    assert_one_line_error(result, "small.yaml: unexpected tensor 'extra.weight' (1 extra in all); is it a checkpoint "
                                  "of another network?")
    assert f"Error: {path}: does not fit spec " in result.output
    state["extra.bias"] = torch.zeros(3)
    torch.save(state, path)
    assert_one_line_error(run("profile", "small", "--no-latency", "--weights", str(path)),
                          "unexpected tensor 'extra.weight' (2 extra in all)")


@pytest.mark.slow
def test_weights_torchvision_and_own_checkpoints_load(tmp_path: Path, small) -> None:
    """Both kinds are accepted by the CLI (which then profiles the right network) and really loaded: every
    tensor of the model equals the checkpoint's afterwards."""
    from mnv3_search.model.weights import load_weights

    reference = reference_state_dict("small")
    torchvision_file = tmp_path / "tv.pth"
    torch.save(reference, torchvision_file)
    torch.manual_seed(1)
    trained = build_model(small)
    own = tmp_path / "own.pt"
    save_checkpoint(trained, small, own)
    for checkpoint, want in ((torchvision_file, reference), (own, trained.state_dict())):
        result = run("profile", "small", "--no-latency", "--json", "--weights", str(checkpoint))
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["totals"]["params"] == 2_542_856 and data["spec_file"].endswith("search_spaces/small.yaml")
        torch.manual_seed(2)  # a fresh model whose own initialisation differs from the checkpoint's
        model = build_model(small)
        load_weights(model, checkpoint)
        got = model.state_dict()
        assert set(got) == set(want)
        assert all(torch.equal(got[key], want[key]) for key in want), checkpoint


def test_json_output(small) -> None:
    result = run("profile", "small", "--no-latency", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["totals"]["params"] == 2_542_856
    assert data["totals"]["fvcore_total"] == 59_649_536
    assert len(data["rows"]) == 14 and data["latency"] is None
    assert data["spec_file"].endswith("search_spaces/small.yaml")


@pytest.mark.slow
def test_csv_with_latency(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    result = run("profile", "small", "--resolution", "32", "--num-classes", "10", "--backend", "torch",
                 "--csv", str(out))
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert list(frame.columns) == PROFILE_COLUMNS
    assert list(frame["block"])[-3:] == ["last_conv", "classifier", "total"]
    assert frame["latency_ms"].notna().all()
    assert "whole network median" in result.stdout and "torch FP32, 1 thread, batch 1" in result.stdout
    assert "MAdds (conv + linear)" in result.stdout and "fvcore total (also counts BN, pooling)" in result.stdout


def test_table_output_names_file_and_totals() -> None:
    result = run("profile", "large.yaml", "--no-latency")
    assert result.exit_code == 0, result.output
    assert "search_spaces/large.yaml" in result.stderr
    assert "5,483,032" in result.stdout and "216.59M" in result.stdout and "226,033,824" in result.stdout
    assert "Unsupported operator" not in result.output


@pytest.mark.slow
def test_spec_names_resolve_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for argument in ("large.yaml", "large", "search_spaces/large.yaml"):
        result = run("profile", argument, "--no-latency", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["totals"]["params"] == 5_483_032
    (tmp_path / "large.yaml").write_text(SMALL_TEXT)  # a local file of that name wins over the shipped one
    result = run("profile", "large.yaml", "--no-latency", "--json")
    assert json.loads(result.stdout)["totals"]["params"] == 2_542_856
    assert result.stderr.strip() == "spec: large.yaml"


@pytest.mark.parametrize("command", [[], ["profile"], ["lut"], ["lut", "build"], ["lut", "check"], ["lut", "show"],
                                     ["train"], ["netadapt"], ["worker"], ["compare"], ["report"], ["export"],
                                     ["explore"]])
def test_help_shows_examples(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.output and "mnv3-search " in result.output.split("Examples:")[1]


@pytest.mark.slow
def test_installed_console_script(tmp_path: Path) -> None:
    script = shutil.which("mnv3-search", path=str(Path(sys.executable).parent)) or shutil.which("mnv3-search")
    assert script, "the mnv3-search console script is not installed (pip install -e .)"
    done = subprocess.run([script, "profile", "small", "--resolution", "64", "--json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["resolution"] == 64 and data["latency"]["backend"] == "onnxruntime"
    assert data["latency"]["median_ms"] > 0
    assert done.stderr.strip() == f"spec: {Path(__file__).resolve().parents[2] / 'search_spaces' / 'small.yaml'}"
    bad = subprocess.run([script, "profile", "small", "--resolution", "8"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("Error:") and "Traceback" not in bad.stderr


# --- one vocabulary across commands ---------------------------------------------------------------------------

def all_commands() -> dict[str, "click.Command"]:
    """Every command by its full name ('lut show'), loading the lazy ones."""
    ctx = click.Context(cli)
    found: dict[str, click.Command] = {}

    def walk(group: click.Group, prefix: str) -> None:
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            assert command is not None, name
            if isinstance(command, click.Group):
                walk(command, f"{prefix}{name} ")
            else:
                found[prefix + name] = command

    walk(cli, "")
    return found


# one meaning per shared name: each use's help starts with the shared text (cli/options.py)
CANONICAL_HELP = {"--resolution": shared.RESOLUTION_HELP, "--train-resolution": shared.TRAIN_RESOLUTION_HELP,
                  "--backend": shared.BACKEND_HELP, "--threads": shared.THREADS_HELP, "--batch": shared.BATCH_HELP,
                  "--seed": shared.SEED_HELP, "--limit": shared.LIMIT_HELP, "--lut": shared.LUT_HELP,
                  "--csv": shared.CSV_HELP, "--device": shared.DEVICE_HELP, "--weights": shared.WEIGHTS_HELP,
                  "--batch-size": "Images per training step.", "--precision": shared.PRECISION_HELP,
                  "--runner": shared.RUNNER_HELP, "--runner-device": shared.RUNNER_DEVICE_HELP}
# (command, option) that share a name but not the shared text, and why
EXCEPTIONS = {("compare", "--weights"): "N=PATH per variant, repeatable",
              ("export", "--weights"): "a SPEC's weights, exported as they are",
              ("profile", "--lut"): "an optional value: --lut alone means the machine's table",
              ("compare", "--lut"): "an optional value: --lut alone means the machine's table"}


def _kind(option) -> tuple:
    import click

    kinds = {click.types.IntParamType: "integer", click.types.FloatParamType: "float",
             click.types.BoolParamType: "flag", click.Choice: "choice", click.Path: "path",
             click.types.StringParamType: "text"}
    kind = next(v for k, v in kinds.items() if isinstance(option.type, k))
    return kind, tuple(getattr(option.type, "choices", ()) or ()), option.is_flag, option.multiple


def test_every_option_has_help_and_shared_names_mean_one_thing() -> None:
    import click

    commands = all_commands()
    assert set(commands) == {"compare", "explore", "export", "lut build", "lut check", "lut show", "netadapt",
                             "profile", "report", "train", "worker"}
    uses: dict[str, list[tuple[str, click.Option]]] = {}
    for name, command in commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.help, f"{name} {param.opts[0]} has no help"
                for opt in param.opts:
                    uses.setdefault(opt, []).append((name, param))
    checked = 0
    for opt, places in uses.items():
        ordinary = [(n, p) for n, p in places if (n, opt) not in EXCEPTIONS]
        assert len({_kind(p) for _, p in ordinary}) <= 1, (opt, {n: _kind(p) for n, p in ordinary})
        if opt in CANONICAL_HELP:
            for name, param in ordinary:
                assert param.help.startswith(CANONICAL_HELP[opt]), (name, opt, param.help)
                checked += 1
    assert checked >= 35
    # the meanings the issue names: --resolution is the deployment size everywhere, training has one name
    assert {n for n, _ in uses["--resolution"]} == {"compare", "explore", "export", "lut build", "lut check",
                                                    "netadapt", "profile", "train"}
    assert {n for n, _ in uses["--train-resolution"]} == {"compare", "explore", "export", "netadapt", "train"}
    assert {n for n, _ in uses["--precision"]} >= {"compare", "export", "lut build", "lut check", "lut show", "profile"}
    assert {n for n, _ in uses["--runner"]} >= {"compare", "lut build", "lut check", "profile"}
    assert {n for n, _ in uses["--backend"]} >= {"compare", "explore", "netadapt", "profile", "lut build"}
    assert all(_kind(p)[1] == tuple(shared.BACKEND_NAMES) for _, p in uses["--backend"])
    assert {n for n, _ in uses["--device"]} == {"explore", "netadapt", "train", "worker"}


def test_backend_names_are_the_librarys() -> None:
    from mnv3_search.latency import BACKENDS

    assert sorted(shared.BACKEND_NAMES) == sorted(BACKENDS)


def test_lazy_command_list_matches_the_commands() -> None:
    from mnv3_search.cli.main import LAZY_COMMANDS

    commands = {name.split()[0]: command for name, command in all_commands().items()}
    for name, (_, _, first_line) in LAZY_COMMANDS.items():
        command = cli.get_command(None, name)  # type: ignore[arg-type]
        assert command.get_short_help_str(limit=200) == first_line, name
    assert set(LAZY_COMMANDS) | {"profile"} == set(commands)


def test_help_imports_no_torch() -> None:
    """--help is fast because nothing heavy is imported: checked by module, not by a timer."""
    code = ("import sys, runpy; sys.argv = ['mnv3-search', '--help']\n"
            "try:\n    runpy.run_module('mnv3_search', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'pandas', 'optuna', 'onnxruntime', 'rich') if m in sys.modules)\n"
            "print('HEAVY', heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert done.returncode == 0, done.stderr
    assert "Commands:" in done.stdout and "netadapt" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_csv_dash_writes_stdout_that_pandas_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.chdir(tmp_path)
    result = run("profile", "small", "--no-latency", "--csv", "-")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "-").exists()
    frame = pd.read_csv(io.StringIO(result.stdout))
    assert list(frame.columns) == PROFILE_COLUMNS
    assert frame["params"].iloc[-1] == 2_542_856
    # integers stay integers, also where a column has gaps (the stem has no expansion): "3", never "3.0"
    stem = result.stdout.splitlines()[1].split(",")
    assert stem[:8] == ["stem", "features.0", "3", "16", "3", "2", "", ""]
    text = pd.read_csv(io.StringIO(result.stdout), dtype=str, keep_default_na=False)
    for column in ("in_channels", "out_channels", "kernel", "stride", "exp", "params", "macs", "fvcore_total"):
        assert text[column].str.fullmatch(r"\d*").all(), (column, text[column].tolist())


def test_json_numbers_are_numbers_and_the_statistic_is_named() -> None:
    result = run("profile", "small", "--no-latency", "--json")
    data = json.loads(result.stdout)
    assert data["rows"][0]["output_size"] == [112, 112]
    assert data["rows"][-1]["output_size"] == [1000]
    assert data["latency_statistic"] == "median"


def test_profile_usage_says_spec_is_optional() -> None:
    result = run("profile", "--help")
    assert "Usage: cli profile [OPTIONS] [SPEC]" in result.output.replace("mnv3-search", "cli")
    assert "default: large" in result.output


def test_lut_show_missing_table_suggests_only_what_show_takes(tmp_path: Path) -> None:
    missing = tmp_path / "none.json"
    assert_one_line_error(run("lut", "show", str(missing)),
                          f"{missing}: no such latency table; build one with `mnv3-search lut build SPEC --lut "
                          f"{missing}`")
    result = run("lut", "show", "--backend", "torch", "--threads", "3")
    assert result.exit_code == 2 and "--table" not in result.output
    assert "or name one: `mnv3-search lut show TABLE`" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("command", [["train", "small", "--out", "unused"], ["netadapt", "small", "--budget", "90%"],
                                     ["explore", "small", "--budget", "90%"]])
def test_device_cuda_without_a_gpu_is_one_line(command: list[str], tmp_path: Path) -> None:
    assert_one_line_error(run(*command, "--device", "cuda"),
                          "--device cuda: no CUDA GPU is visible to PyTorch here (torch.cuda.is_available() is False")
    assert not (tmp_path / "unused").exists()


@pytest.mark.slow
def test_compare_predicts_from_the_machines_table(tmp_path: Path) -> None:
    import io
    import os

    from mnv3_search.latency import LatencyTable, default_table_path, make_backend

    result = run("compare", "small", "small", "--resolution", "64", "--no-latency", "--lut", "--csv", "-")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(io.StringIO(result.stdout))
    table_path = default_table_path(make_backend("onnxruntime", 1))
    assert str(table_path).startswith(os.environ["MNV3_SEARCH_LUT_DIR"])  # conftest: never the real home
    table = LatencyTable.load(table_path)
    spec = __import__("mnv3_search").load_spec(SPACES / "small.yaml").with_overrides(resolution=64)
    assert frame["predicted_p25_ms"].tolist() == pytest.approx([table.predict(spec, measure_missing=False)
                                                                .calibrated_ms] * 2, rel=1e-9)
