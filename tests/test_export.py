"""export: ONNX and TorchScript files with BN folded, reloaded from disk, match PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from mnv3_search import build_model, load_spec
from mnv3_search.cli import cli
from mnv3_search.export import ATOL, bn_nodes_unfolded_onnx, count_bn, fold_bn, load_exported, onnx_op_counts
from mnv3_search.model.weights import save_checkpoint

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


def trained_like(seed: int = 0) -> nn.Module:
    """Small at 32 px with non-trivial BN statistics and affine terms, so folding really changes weights."""
    torch.manual_seed(seed)
    spec = load_spec(SPACES / "small.yaml").with_overrides(resolution=32, num_classes=10)
    model = build_model(spec)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.05)
    return model.eval()


def test_fold_bn_is_exact_and_removes_every_bn() -> None:
    model = trained_like()
    folded = fold_bn(model)
    assert count_bn(model) == 34 and count_bn(folded) == 0 and folded.folded_bn == 34
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert expected.abs().max() > 0.1  # a meaningful comparison, not two zeros
        torch.testing.assert_close(folded(x), expected, atol=ATOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_export_round_trip(tmp_path: Path, fmt: str, suffix: str) -> None:
    model = trained_like()
    spec = model.spec
    weights = tmp_path / "w.pt"
    save_checkpoint(model, spec, weights)
    spec_file = tmp_path / "small32.yaml"
    from mnv3_search import dump_spec

    dump_spec(spec, spec_file)
    out = tmp_path / f"net{suffix}"
    result = CliRunner().invoke(cli, ["export", str(spec_file), "--weights", str(weights), "--format", fmt,
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "34 conv+BN pairs folded, 0 batch norms left" in result.output
    assert "latency" in result.output and " ms" in result.output
    run = load_exported(out, fmt)
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(run(x) - expected)) <= ATOL
    if fmt == "onnx":
        assert onnx_op_counts(out.read_bytes()).get("BatchNormalization", 0) == 0


@pytest.mark.slow
def test_torch_onnx_exporter_folds_bn_only_with_constant_folding() -> None:
    """What torch's own exporter does with an unfolded eval model (documented in export.py)."""
    model = trained_like()
    assert bn_nodes_unfolded_onnx(model, (1, 3, 32, 32), constant_folding=True) == 0
    assert bn_nodes_unfolded_onnx(model, (1, 3, 32, 32), constant_folding=False) == 34


def test_export_bad_format_and_bad_source(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["export", "small", "--format", "tflite", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "Invalid value for '--format': 'tflite' is not one of 'onnx', 'torchscript'." in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()
    result = CliRunner().invoke(cli, ["export", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not a run folder" in result.output
