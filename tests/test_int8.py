"""INT8 end to end with ONNX Runtime: quantized table entries, a table that refuses the other precision, and
`export --precision int8`, whose file is reloaded and must predict exactly what the export reported."""

from __future__ import annotations

import json
import re
from io import StringIO
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from mnv3_search import build_model, load_spec
from mnv3_search.cli import cli
from mnv3_search.data import Dataset, batches, load_dataset
from mnv3_search.errors import UserError
from mnv3_search.export import export_model, onnx_op_counts
from mnv3_search.latency import (InterleavedPolicy, LatencyTable, OnnxRuntimeBackend, default_table_path,
                                 make_backend, onnx_bytes, quantize_onnx, spec_keys)
from mnv3_search.latency.backends.onnxfile import random_calibration
from mnv3_search.latency.tablefile import FORMAT_VERSION
from mnv3_search.model.weights import save_checkpoint
from mnv3_search.netadapt.runfolder import RunFolder
from mnv3_search.quantize import calibration_images, int8_accuracy
from mnv3_search.train import evaluate, train
from support.tiny_run import MICRO_SPEC_PATH

FAST = InterleavedPolicy(passes=2, runs_per_pass=1, warmup_runs=1, min_passes=1)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", resolution=32)


@pytest.fixture(scope="module")
def trained(digits: Dataset, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """The micro network trained 100 steps on digits (38 % right: enough for INT8 to move some
    predictions) and its checkpoint."""
    torch.manual_seed(0)
    spec = load_spec(MICRO_SPEC_PATH)
    model = build_model(spec)
    train(model, digits, 100, batch_size=32, seed=0)
    path = tmp_path_factory.mktemp("int8") / "micro.pt"
    save_checkpoint(model, spec, path)
    return model.eval(), path


def _fresh_predictions(path: Path, dataset: Dataset) -> np.ndarray:
    """The file's top-1 classes on the test split, by a session of its own (not the export's)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x.numpy()})[0].argmax(axis=1)
                           for x, _ in batches(dataset, dataset.test, 100)])


@pytest.mark.slow
def test_int8_export_predicts_what_it_reported(trained, digits, tmp_path):
    model, _ = trained
    out = tmp_path / "micro_int8.onnx"
    result = export_model(model, (1, 3, 32, 32), "onnx", out, precision="int8", dataset=digits, measure=False)
    assert result.precision == "int8" and result.tolerance is None and result.predictions is not None
    predictions = _fresh_predictions(out, digits)
    np.testing.assert_array_equal(predictions, result.predictions)
    labels = digits.test.labels.numpy()
    assert result.accuracy is not None and result.accuracy.images == len(labels) == 359
    assert result.accuracy.file_accuracy == float(np.mean(predictions == labels))
    assert result.accuracy.torch_accuracy == evaluate(model, digits, digits.test)
    assert 0.2 < result.accuracy.file_accuracy < 0.9 and result.accuracy.agreement > 0.5
    ops = onnx_op_counts(out.read_bytes())
    assert ops["QuantizeLinear"] > 10 and ops["DequantizeLinear"] > 10 and "BatchNormalization" not in ops
    graph = onnx.load(str(out)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]  # one file: deployment size and test images alike
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 10  # every conv
    # the CLI reports the same file's accuracy beside FP32's, and its speed beside the FP32 file's
    cli_out = tmp_path / "cli_int8.onnx"
    done = CliRunner().invoke(cli, ["export", str(MICRO_SPEC_PATH), "--weights", str(trained[1]), "--format", "onnx",
                                    "--precision", "int8", "--data", "digits", "--out", str(cli_out)])
    assert done.exit_code == 0, done.output
    a = result.accuracy
    assert (f"test accuracy (digits, 359 images at 32 px): INT8 file {100 * a.file_accuracy:.2f}%, FP32 PyTorch "
            f"{100 * a.torch_accuracy:.2f}% ({100 * (a.file_accuracy - a.torch_accuracy):+.2f} points)") in done.output
    assert re.search(r"ONNX Runtime INT8 p25 [0-9.]+ ms.*FP32 ONNX p25 [0-9.]+ ms \(INT8 / FP32 = [0-9.]+\)",
                     done.output.replace("\n", " "))
    np.testing.assert_array_equal(_fresh_predictions(cli_out, digits), predictions)


@pytest.mark.parametrize("args, words", [
    (["--format", "torchscript", "--precision", "int8", "--data", "digits"],
     "--precision int8 writes ONNX (QDQ, ONNX Runtime's static quantization): use --format onnx"),
    (["--format", "onnx", "--precision", "int8"],
     "--precision int8 needs --data SOURCE: its training images calibrate the quantization and its test split"),
])
def test_int8_export_refusals(tmp_path, args, words):
    done = CliRunner().invoke(cli, ["export", str(MICRO_SPEC_PATH), "--out", str(tmp_path / "x"), *args])
    assert done.exit_code == 2 and words in done.output and "Traceback" not in done.output
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_compare_scores_int8_networks(trained, digits):
    model, weights = trained
    done = CliRunner().invoke(cli, ["compare", str(MICRO_SPEC_PATH), "--weights", str(weights), "--data", "digits",
                                    "--precision", "int8", "--no-latency", "--csv", "-"])
    assert done.exit_code == 0, done.output
    row = pd.read_csv(StringIO(done.stdout)).iloc[0]
    assert row["accuracy_source"] == "digits test, INT8"
    assert row["accuracy"] == int8_accuracy(model, digits)[0].file_accuracy


def test_calibration_images_come_from_the_training_split(digits):
    images = calibration_images(digits)
    assert len(images) == 512 and all(x.shape == (1, 3, 32, 32) and x.dtype == np.float32 for x in images)
    assert all(np.array_equal(a, b) for a, b in zip(images, calibration_images(digits)))  # fixed, not --seed's
    train_inputs = digits.inputs(digits.train.images).numpy()
    assert all(any(np.array_equal(x[0], t) for t in train_inputs) for x in images[:4])
    assert len({x.tobytes() for x in images}) == 512  # drawn without replacement
    assert len(calibration_images(digits, 2000)) == len(digits.train) == 1294  # never more than it holds


def test_a_block_quantized_alone_has_quantize_at_its_input_and_dequantize_at_its_output():
    """Table entries are blocks as they run in the INT8 network: QDQ at both ends, HardSigmoid in float."""
    label, key = spec_keys(load_spec(MICRO_SPEC_PATH))[2]  # bneck 2: squeeze-and-excite, hard-swish
    shape = key.input_shape(1)
    data = quantize_onnx(onnx_bytes(key.module().eval(), shape), random_calibration(shape))
    graph = onnx.load_from_string(data).graph
    first = next(n for n in graph.node if "input" in n.input)
    last = next(n for n in graph.node if "output" in n.output)
    assert (label, first.op_type, last.op_type) == ("bneck 2", "QuantizeLinear", "DequantizeLinear")
    sigmoid = next(n for n in graph.node if n.op_type == "HardSigmoid")
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert producers[sigmoid.input[0]] == "DequantizeLinear"


def test_calibration_methods_find_other_ranges_and_an_unknown_one_is_refused():
    """benchmarks/calibration.py compares ONNX Runtime's ways of finding activation ranges: each gives a QDQ
    file, percentile's clipped ranges make other scales than minmax's, and a misspelt method is refused."""
    _, key = spec_keys(load_spec(MICRO_SPEC_PATH))[2]
    shape = key.input_shape(1)
    fp32 = onnx_bytes(key.module().eval(), shape)
    calibration = random_calibration(shape)
    files = {m: quantize_onnx(fp32, calibration, m) for m in ("minmax", "percentile")}
    assert files["minmax"] == quantize_onnx(fp32, calibration)  # the default
    scales = {}
    for method, data in files.items():
        graph = onnx.load_from_string(data).graph
        assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 3
        scales[method] = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in graph.initializer
                          if t.name.endswith("_scale")}
    assert scales["minmax"].keys() == scales["percentile"].keys()
    assert scales["minmax"] != scales["percentile"]
    with pytest.raises(ValueError, match="calibration method 'max': use one of minmax, percentile, entropy"):
        quantize_onnx(fp32, calibration, "max")


def test_int8_table_is_its_own_and_refuses_fp32(tmp_path):
    spec = load_spec(MICRO_SPEC_PATH)
    keys = [key for _, key in spec_keys(spec)][-2:]  # last conv and classifier: the cheapest to quantize
    path = tmp_path / "int8.json"
    table = LatencyTable.open(path, OnnxRuntimeBackend(1, "int8"), 1, FAST)
    assert table.ensure(keys) == 2
    saved = json.loads(path.read_text())
    assert (saved["version"], saved["precision"], saved["backend"]) == (FORMAT_VERSION, "int8", "onnxruntime")
    assert all(e["latency_ms"] > 0 for e in saved["entries"].values())
    with pytest.raises(UserError) as info:
        LatencyTable.open(path, OnnxRuntimeBackend(1, "fp32"), 1, FAST)
    assert str(info.value) == (f"{path}: this table was measured with precision INT8, not FP32 (here); it cannot "
                               f"predict this machine's latency: give another --lut path to build a new one")
    done = CliRunner().invoke(cli, ["lut", "build", str(MICRO_SPEC_PATH), "--lut", str(path)])
    assert done.exit_code == 2 and "measured with precision INT8, not FP32" in done.output
    assert len(done.output.strip().splitlines()) == 2  # the spec line, then the one error line
    assert default_table_path(make_backend("onnxruntime", 1, "int8")).name.endswith("-onnxruntime-int8-t1-b1.json")
    assert default_table_path(make_backend("onnxruntime", 1)).name.endswith("-onnxruntime-t1-b1.json")


def test_backends_refuse_a_precision_they_cannot_time():
    with pytest.raises(UserError, match="backend torch times FP32 only, not INT8"):
        make_backend("torch", 1, "int8")
    with pytest.raises(UserError, match="unknown precision 'int4'"):
        make_backend("onnxruntime", 1, "int4")
    # a run refuses the pair before it writes a folder; its list is the registry's
    from mnv3_search.latency import BACKENDS
    from mnv3_search.netadapt import RunConfig
    from mnv3_search.netadapt.config import FP32_BACKENDS

    assert sorted(FP32_BACKENDS) == sorted(n for n, c in BACKENDS.items() if "int8" not in c.precisions)
    with pytest.raises(UserError, match="backend torch times FP32 only, not INT8"):
        RunConfig("small", "50%", precision="int8", backend="torch")


# --- netadapt --precision int8 ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_int8_run_decides_on_int8_latency_and_reports_the_int8_files_accuracy(tmp_path):
    """The micro network to 80 % of its INT8 latency (knapsack: one shot), on digits: the table is INT8, the
    confirmation timed the INT8 candidate beside the INT8 seed, and the test accuracy the run reports and
    run.json records is final_int8.onnx's own, with the FP32 network's beside it."""
    out = tmp_path / "run"
    done = CliRunner().invoke(cli, ["netadapt", str(MICRO_SPEC_PATH), "--budget", "80%", "--precision", "int8",
                                    "--method", "knapsack", "--data", "digits", "--limit", "240", "--batch-size",
                                    "32", "--seed-epochs", "10", "--long-epochs", "1", "--threads", "1", "--json",
                                    "--out", str(out)])
    assert done.exit_code == 0, done.output
    shown = json.loads(done.stdout)
    saved = json.loads((out / "run.json").read_text())
    result = saved["result"]
    assert saved["config"]["precision"] == "int8" and result["precision"] == shown["precision"] == "int8"
    assert result["measured_latency_ms"] / result["seed_measured_latency_ms"] <= 0.8  # measured in INT8
    table = json.loads(Path(saved["latency_table"]["path"]).read_text())
    assert Path(saved["latency_table"]["path"]).name.endswith("-onnxruntime-int8-t1-b1.json")
    assert (table["precision"], table["backend"]) == ("int8", "onnxruntime")
    # the run's own data: --limit 240 normalises by its 240 training images' mean and std, not all 1,079's (a
    # near-chance network's predictions move with that)
    data = load_dataset("digits", resolution=32, holdout=None, seed=0, limit=240)
    labels = data.test.labels.numpy()
    assert result["test_accuracy"] == shown["test_accuracy"] == float(np.mean(
        _fresh_predictions(out / "final_int8.onnx", data) == labels))
    spec, state = RunFolder.load(out / "final.pt")
    final = build_model(spec)
    final.load_state_dict(state)
    assert result["fp32_test_accuracy"] == shown["fp32_test_accuracy"] == evaluate(final, data, data.test)
    resumed = CliRunner().invoke(cli, ["netadapt", "--resume", str(out), "--precision", "fp32"])
    assert resumed.exit_code == 2
    assert "--precision fp32 differs from this run's int8 (run.json)" in resumed.output
