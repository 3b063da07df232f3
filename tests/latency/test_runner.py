"""A device reached by a command (`--runner`): the repository's local runner script as the device, its output
format parsed exactly, tables keyed by the device's name, and each way a runner can fail as one line, exit 2."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mnv3_search import load_spec
from mnv3_search.cli import cli
from mnv3_search.errors import UserError
from mnv3_search.latency import InterleavedPolicy, LatencyTable, default_table_path, make_backend, spec_keys
from mnv3_search.latency.backends.command import parse_output
from support.tiny_run import MICRO_SPEC_PATH

REPO = Path(__file__).resolve().parents[2]
PYTHON = shlex.quote(sys.executable)
SCRIPT = REPO / "scripts" / "runners" / "local_onnxruntime.py"
LOCAL = f"{PYTHON} {SCRIPT} {{model}} --runs {{runs}} --warmup {{warmup}}"
FAST = InterleavedPolicy(passes=2, runs_per_pass=3, warmup_runs=1, min_passes=1)


def test_the_output_format():
    text = "# a comment\n\ndevice: Pixel 7 (Tensor G2)\n4.25\n  3.5 ms\n1e1\n"
    assert parse_output(text) == ("Pixel 7 (Tensor G2)", [4.25, 3.5, 10.0])
    assert parse_output("2\n") == (None, [2.0])
    for bad, words in [("fast\n", "printed 'fast' on line 1, not a run's milliseconds"),
                       ("1.0\n-2\n", "printed '-2' on line 2"), ("nan\n", "printed 'nan' on line 1"),
                       ("device: a\ndevice: b\n1\n", "named its device 'b' on line 2 after 'a'"),
                       ("device:\n1\n", "named its device '' on line 1")]:
        with pytest.raises(UserError) as info:
            parse_output(bad)
        assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_profile_on_a_runner_device():
    done = CliRunner().invoke(cli, ["profile", str(MICRO_SPEC_PATH), "--precision", "int8", "--runner",
                                    LOCAL + " --device test-box", "--json"])
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout)
    latency = data["latency"]
    assert (latency["backend"], latency["precision"], latency["device"]) == ("runner:onnxruntime", "int8", "test-box")
    assert latency["repeats"] == 20 and latency["median_ms"] > 0  # one call of the runner: 20 runs
    assert all(row["latency_ms"] > 0 for row in data["rows"])


@pytest.mark.slow
def test_a_runner_table_is_keyed_by_the_device(tmp_path):
    spec = load_spec(MICRO_SPEC_PATH)
    keys = [key for _, key in spec_keys(spec)][-2:]
    backend = make_backend("onnxruntime", 1, runner=LOCAL + " --device box-a")
    assert backend.fingerprint() == {"device": "box-a"}  # asked of the runner itself
    assert default_table_path(backend, folder=tmp_path) == tmp_path / "box-a-runner-onnxruntime-t1-b1.json"
    path = tmp_path / "a.json"
    table = LatencyTable.open(path, backend, 1, FAST)
    assert table.ensure(keys) == 2
    saved = json.loads(path.read_text())
    assert (saved["backend"], saved["device"], saved["precision"]) == ("runner:onnxruntime", {"device": "box-a"},
                                                                        "fp32")
    assert all(e["runs"] == 6 for e in saved["entries"].values())  # 2 passes x 3 runs, as the runner printed them
    other = make_backend("onnxruntime", 1, runner=LOCAL + " --device box-b")
    with pytest.raises(UserError, match="this table was measured with device device 'box-a', not 'box-b'"):
        LatencyTable.open(path, other, 1, FAST)
    with pytest.raises(UserError, match="measured with backend runner:onnxruntime, not onnxruntime"):
        LatencyTable.open(path, make_backend("onnxruntime", 1), 1, FAST)
    named = make_backend("onnxruntime", 1, runner=LOCAL, runner_device="box-a")  # --runner-device: no probe
    assert LatencyTable.open(path, named, 1, FAST).entries.keys() == table.entries.keys()


@pytest.mark.parametrize("runner, device, words", [
    ("no-such-runner-9f2 {model}", None, "--runner: command 'no-such-runner-9f2' not found"),
    (f"{PYTHON} -c 'import sys; print(\"no device here\", file=sys.stderr); sys.exit(3)' {{model}}", None,
     f"--runner: {Path(sys.executable).name} exited with status 3: no device here"),
    (f"{PYTHON} -c 'print(\"fast\")' {{model}}", None, "printed 'fast' on line 1, not a run's milliseconds"),
    (f"{PYTHON} -c 'print(\"device: x\")' {{model}}", None, "printed no run's milliseconds"),
    (f"{PYTHON} -c 'print(1.5)' {{model}}", None, "does not name its device (print 'device: NAME'); give "
                                                  "--runner-device NAME"),
    (f"{PYTHON} -c 'print(1.5)'", None, "the command must contain {model}, where the model file's path goes"),
    (LOCAL + " --device a", "b", "says it runs on 'a' but --runner-device says 'b'"),
    (None, "b", "--runner-device names the device a --runner command reaches; give --runner too"),
])
def test_a_bad_runner_is_one_line_and_exit_2(runner, device, words):
    args = ["profile", str(MICRO_SPEC_PATH)]
    args += ["--runner", runner] if runner else []
    args += ["--runner-device", device] if device else []
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 2, done.output
    errors = [line for line in done.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and words in errors[0], done.output
    assert "Traceback" not in done.output
