"""Transfer: a checkpoint for another class count (torchvision's 1000-class layout, or our own) seeds a
network for the data's classes; only the final classifier layer starts fresh, and the user is told so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mnv3_search import CheckpointError, build_model
from mnv3_search.cli import cli
from mnv3_search.model.weights import load_weights, save_checkpoint, transfer_state_dict
from support.reference_weights import reference_state_dict

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


@pytest.mark.parametrize("variant", ["large", "small"])
def test_torchvision_1000_classes_load_into_10_with_a_fresh_final_layer(variant: str, request, tmp_path: Path) -> None:
    spec = request.getfixturevalue(variant).with_overrides(num_classes=10)
    path = tmp_path / f"{variant}.pth"
    source = reference_state_dict(variant)
    torch.save(source, path)
    torch.manual_seed(3)
    model = build_model(spec)
    note = load_weights(model, path, spec_name=variant)
    hidden = source["classifier.0.weight"].shape[0]
    assert note == (f"{path}: made for 1000 classes, {variant} has 10: loaded every tensor but the final "
                    "classifier layer classifier.3, which starts fresh (N(0, 0.01), bias 0)")
    state = model.state_dict()
    for key, tensor in source.items():
        if not key.startswith("classifier.3."):
            assert torch.equal(state[key], tensor), key
    weight, bias = state["classifier.3.weight"], state["classifier.3.bias"]
    assert weight.shape == (10, hidden) and torch.equal(bias, torch.zeros(10))
    assert abs(weight.std().item() - 0.01) < 0.001 and abs(weight.mean().item()) < 0.001
    # repeatable under the global seed, like the rest of a seeded run's init
    torch.manual_seed(3)
    again = build_model(spec)
    load_weights(again, path)
    assert torch.equal(again.state_dict()["classifier.3.weight"], weight)


def test_same_class_count_loads_without_a_note(small, tmp_path: Path) -> None:
    own = tmp_path / "own.pt"
    model = build_model(small)
    save_checkpoint(model, small, own)
    other = build_model(small)
    assert load_weights(other, own) is None
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_own_checkpoint_with_10_classes_seeds_a_3_class_network(small, tmp_path: Path) -> None:
    ten = small.with_overrides(num_classes=10)
    own = tmp_path / "own.pt"
    save_checkpoint(build_model(ten), ten, own)
    note = load_weights(build_model(small.with_overrides(num_classes=3)), own, spec_name="small")
    assert note is not None and "made for 10 classes, small has 3" in note


def test_any_other_mismatch_is_refused_with_the_tensor_named(small, large) -> None:
    tv_small = reference_state_dict("small")
    with pytest.raises(CheckpointError, match=r"^x\.pth: does not fit spec large: tensor "
                                              r"'features\.1\.block\.1\.0\.weight' is missing$"):
        transfer_state_dict(tv_small, build_model(large.with_overrides(num_classes=10)), "x.pth", "large")
    # the final layer's input (the hidden width) must still match: only the class count may differ
    narrow = small.with_overrides(num_classes=10)
    shrunk = dict(tv_small)
    shrunk["classifier.3.weight"] = shrunk["classifier.3.weight"][:, :512]
    with pytest.raises(CheckpointError, match=r"tensor 'classifier\.3\.weight' has shape \(1000, 512\) in the "
                                              r"checkpoint but the spec needs \(10, 1024\)$"):
        transfer_state_dict(shrunk, build_model(narrow), "x.pth", "small")
    missing_bias = {k: v for k, v in tv_small.items() if k != "classifier.3.bias"}
    with pytest.raises(CheckpointError, match=r"tensor 'classifier\.3\.weight' has shape \(1000, 1024\)"):
        transfer_state_dict(missing_bias, build_model(narrow), "x.pth", "small")


@pytest.mark.slow
def test_train_command_seeds_10_classes_from_1000_class_torchvision_weights(tmp_path: Path) -> None:
    """The issue's case: ImageNet-layout Large weights on a 10-class dataset, trained (tiny)."""
    weights = tmp_path / "mobilenet_v3_large.pth"
    source = reference_state_dict("large")
    torch.save(source, weights)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "large", "--data", "digits", "--epochs", "1", "--limit", "64",
                                      "--train-resolution", "32", "--batch-size", "16", "--weights", str(weights),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "made for 1000 classes" in line]
    assert notes == [f"{weights}: made for 1000 classes, {SPACES / 'large.yaml'} has 10: loaded every tensor but "
                     "the final classifier layer classifier.3, which starts fresh (N(0, 0.01), bias 0)"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == summary["train_images"] // 16 > 0 and summary["weights_from"] == str(weights)
    assert summary["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    trained = torch.load(out / "weights.pt", weights_only=True)["state_dict"]
    assert trained["classifier.3.weight"].shape == (10, 1280)
    assert not torch.equal(trained["features.16.0.weight"], source["features.16.0.weight"])  # it trained


@pytest.mark.slow
def test_netadapt_seed_from_1000_class_torchvision_weights(tmp_path: Path) -> None:
    """netadapt --weights with ImageNet-layout Small on digits: the seed keeps every tensor but classifier.3,
    and the run says so once (the CLI prints the event even with --quiet)."""
    from mnv3_search.netadapt import RunConfig
    from mnv3_search.netadapt.runner import NetAdapt
    from mnv3_search.netadapt.session import seed_network

    weights = tmp_path / "mobilenet_v3_small.pth"
    source = reference_state_dict("small")
    torch.save(source, weights)
    events: list[tuple[str, dict]] = []
    config = RunConfig(spec_path="small", budget="5.3M-macs", data="digits", limit=120, batch_size=16,
                       resolution=64, short_steps=2, rungs=1, long_epochs=1, weights=str(weights))
    runner = NetAdapt(config, out=str(tmp_path / "run"), on_event=lambda kind, **info: events.append((kind, info)))
    runner.folder.prepare()
    state, (accuracy, loss) = seed_network(runner.plan, runner.emit)
    assert [info["note"] for kind, info in events if kind == "transfer"] == [
        f"{weights}: made for 1000 classes, {SPACES / 'small.yaml'} has 10: loaded every tensor but the final "
        "classifier layer classifier.3, which starts fresh (N(0, 0.01), bias 0)"]
    assert state["classifier.3.weight"].shape == (10, 1024)
    assert all(torch.equal(state[k], v) for k, v in source.items() if not k.startswith("classifier.3."))
    assert 0.0 <= accuracy <= 1.0 and loss > 0.0
    # a checkpoint of another network is still refused before anything runs, naming the tensor
    large = tmp_path / "large.pth"
    torch.save(reference_state_dict("large"), large)
    with pytest.raises(CheckpointError, match=r"^\S+large\.pth: does not fit spec \S+small\.yaml \(with 10 classes\): "
                                              r"tensor 'features\.1\.block\.1\.fc1\.weight' is missing$"):
        NetAdapt(RunConfig(**{**config.__dict__, "weights": str(large)}), out=str(tmp_path / "other"))
