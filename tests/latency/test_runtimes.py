"""The deployment runtimes beyond ONNX Runtime, real and installed at the pins CI tests: ExecuTorch with XNNPACK
(FP32 and INT8) and OpenVINO (FP32 and NNCF INT8), on the two-block micro network at 32 px.

ExecuTorch lowering costs seconds per network even this small, so its tests share one module fixture that
lowers the network once per precision, and carry the `slow` marker (they run in CI like every test)."""

from __future__ import annotations

import importlib.metadata
import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from mnv3_search import build_model, load_spec
from mnv3_search.errors import UserError
from mnv3_search.latency import InterleavedPolicy, LatencyTable, make_backend, measure_interleaved, spec_keys
from support.tiny_run import MICRO_SPEC_PATH

REPO = Path(__file__).resolve().parents[2]
SHAPE = (1, 3, 32, 32)
FAST = InterleavedPolicy(passes=2, runs_per_pass=2, warmup_runs=1, min_passes=1, clock="thread")


def _pins(extra: str) -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found = {}
    for requirement in project["optional-dependencies"][extra]:
        name, _, version = requirement.partition("==")
        found[name] = version
    return found


@pytest.fixture(scope="module")
def micro() -> torch.nn.Module:
    """The micro network with weights and batch-norm statistics of a trained network's magnitude (a fresh
    classifier's outputs are ~1e-5: INT8 would round them all to one value)."""
    torch.manual_seed(0)
    model = build_model(load_spec(MICRO_SPEC_PATH))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            elif isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, 0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(4)]


def _reference(model: torch.nn.Module, inputs: list[np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x)).numpy() for x in inputs])


def test_the_runtimes_installed_are_the_pinned_ones():
    """The extras pin the releases tested; the test extra installs the same ones, so CI tests the exact pair
    (executorch declares no torch pin: setup installs torch==2.13.0 first)."""
    test_extra = _pins("test")
    for extra in ("executorch", "openvino"):
        for name, version in _pins(extra).items():
            assert test_extra[name] == version
            assert importlib.metadata.version(name) == version, name
    assert importlib.metadata.version("torch").startswith("2.13.0")


# --- ExecuTorch + XNNPACK ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def executorch_programs(micro):
    """The micro network lowered once per precision (what every ExecuTorch test below reuses from the cache)."""
    from mnv3_search.latency.backends import xnnpack

    runners = {precision: make_backend("executorch", 1, precision).runner(micro, SHAPE)
               for precision in ("fp32", "int8")}
    return xnnpack, runners


@pytest.mark.slow
def test_executorch_computes_what_torch_computes(micro, inputs, executorch_programs):
    xnnpack, runners = executorch_programs
    converted = xnnpack._PROGRAMS.converted
    expected = _reference(micro, inputs)
    fp32 = xnnpack.ProgramRunner(xnnpack.lower(micro, SHAPE))
    got = np.concatenate([fp32.predict(x) for x in inputs])
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())), rtol=0)
    from mnv3_search.latency.backends.onnxfile import random_calibration

    int8 = xnnpack.ProgramRunner(xnnpack.lower(micro, SHAPE, random_calibration(SHAPE)))
    quantized = np.concatenate([int8.predict(x) for x in inputs])
    error = float(np.abs(quantized - expected).max())
    assert 0 < error < 0.25 * float(np.abs(expected).max())  # quantized (not exact), yet the same function
    assert xnnpack._PROGRAMS.converted == converted  # both were the fixture's programs, found by content
    rebuilt = build_model(load_spec(MICRO_SPEC_PATH))
    rebuilt.load_state_dict(micro.state_dict())
    make_backend("executorch", 1, "int8").runner(rebuilt, SHAPE)  # another object, the same network
    assert xnnpack._PROGRAMS.converted == converted


@pytest.mark.slow
def test_executorch_times_fp32_and_int8_together(executorch_programs):
    _, runners = executorch_programs
    fp32, int8 = measure_interleaved([runners["fp32"], runners["int8"]], FAST)
    assert fp32.repeats == int8.repeats == 4 and fp32.p25_ms > 0 and int8.p25_ms > 0


@pytest.mark.slow
def test_an_executorch_int8_table(tmp_path):
    key = spec_keys(load_spec(MICRO_SPEC_PATH))[-1][1]  # the classifier: the cheapest unit to lower
    path = tmp_path / "et.json"
    table = LatencyTable.open(path, make_backend("executorch", 1, "int8"), 1, FAST)
    assert table.ensure([key]) == 1
    saved = json.loads(path.read_text())
    assert (saved["backend"], saved["precision"]) == ("executorch", "int8")
    assert saved["versions"]["executorch"] == _pins("executorch")["executorch"]
    with pytest.raises(UserError, match="measured with backend executorch, not onnxruntime"):
        LatencyTable.open(path, make_backend("onnxruntime", 1, "int8"), 1, FAST)


# --- OpenVINO ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_openvino_fp32_computes_what_torch_computes_and_int8_is_close(micro, inputs):
    from mnv3_search.latency.backends.onnxfile import export_onnx, random_calibration
    from mnv3_search.latency.backends.openvino_cpu import config, ov_model
    import openvino as ov

    expected = _reference(micro, inputs)
    outputs = {}
    for precision, calibration in (("fp32", None), ("int8", random_calibration(SHAPE))):
        compiled = ov.Core().compile_model(ov_model(export_onnx(micro, SHAPE), calibration), "CPU", config(1))
        request = compiled.create_infer_request()
        outputs[precision] = np.concatenate([request.infer({0: x})[0] for x in inputs])
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(outputs["fp32"], expected, atol=1e-4 * max(1.0, scale), rtol=0)
    assert 0 < float(np.abs(outputs["int8"] - expected).max()) < 0.25 * scale
    backend = make_backend("openvino", 1, "int8")
    assert backend.versions()["nncf"] == _pins("openvino")["nncf"]
    fp32, int8 = measure_interleaved([make_backend("openvino", 1).runner(micro, SHAPE), backend.runner(micro, SHAPE)],
                                     FAST)
    assert fp32.p25_ms > 0 and int8.p25_ms > 0


def test_openvino_writes_no_file_for_a_runner():
    with pytest.raises(UserError, match=re.escape("--runner: backend openvino writes no model file a device can run")):
        make_backend("openvino", 1, runner="run {model}")
