"""Training and evaluation: learns digits from scratch, repeatable by seed, stoppable by `report`,
BN refresh after surgery; and the `train` command's outputs."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mnv3_search import ArchSpec, build_model, shrink
from mnv3_search.cli import cli
from mnv3_search.data import batches, load_dataset
from mnv3_search.train import evaluate, fine_tune, refresh_bn, train, train_epochs
from mnv3_search.model.weights import read_state_dict


@pytest.fixture(scope="module")
def digits32():
    return load_dataset("digits", resolution=32, holdout=0.1, seed=0)


@pytest.fixture(scope="module")
def digits16():
    return load_dataset("digits", resolution=16, holdout=0.1, seed=0, limit=256)


def _small10(small: ArchSpec) -> ArchSpec:
    return replace(small, num_classes=10)


@pytest.mark.slow
def test_small_learns_digits_from_chance_to_90_percent(small: ArchSpec, digits32) -> None:
    torch.manual_seed(0)
    model = build_model(_small10(small))
    before = evaluate(model, digits32, digits32.holdout)
    # 100 steps of 32 (a quarter of the images the README's runs see; 94.4 % here, well clear of 90 %)
    result = train(model, digits32, 100, lr=0.1, batch_size=32, warmup=10, eval_every=50, seed=0)
    after = evaluate(model, digits32, digits32.holdout)
    print(f"\ndigits, Small at 32 px, 100 steps of 32: holdout {before:.3f} -> {after:.3f} in {result.seconds:.1f} s "
          f"({result.images_per_s:.0f} images/s)")
    assert before < 0.3
    assert after >= 0.90
    assert result.accuracy == pytest.approx(after)
    assert [h["step"] for h in result.history] == [50, 100]


@pytest.mark.slow
def test_same_seed_same_weights_other_seed_other_weights(small: ArchSpec, digits16) -> None:
    def run(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(_small10(small))
        train(model, digits16, 4, batch_size=32, seed=seed)
        return model.state_dict()

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_report_can_stop_a_run_early(small: ArchSpec, digits16) -> None:
    model = build_model(_small10(small))
    seen: list[tuple[int, float]] = []

    def report(step: int, accuracy: float) -> bool:
        seen.append((step, accuracy))
        return step >= 4

    result = train(model, digits16, 20, batch_size=32, eval_every=2, report=report)
    assert [s for s, _ in seen] == [2, 4] and result.steps == 4 and result.stopped
    assert all(0.0 <= a <= 1.0 for _, a in seen)


def test_an_exception_from_report_propagates_and_bn_momentum_is_restored(small: ArchSpec, digits16) -> None:
    class Pruned(Exception):
        pass

    def report(step: int, accuracy: float) -> None:
        raise Pruned

    model = build_model(_small10(small))
    with pytest.raises(Pruned):
        fine_tune(model, digits16, 10, batch_size=32, eval_every=2, report=report)
    assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}


@pytest.mark.slow
def test_train_epochs_evaluates_every_epoch(small: ArchSpec, digits16) -> None:
    model = build_model(_small10(small))
    result = train_epochs(model, digits16, 2, batch_size=128)
    assert [h["epoch"] for h in result.history] == [1, 2] and result.steps == 4
    first, last = (h["lr"] for h in result.history)
    assert last < first < 0.1 and last < 0.02  # cosine decay from the peak 0.1


def test_refresh_bn_measures_the_training_images(small: ArchSpec, digits16) -> None:
    model = build_model(_small10(small))
    spec, sd = shrink(_small10(small), model.state_dict(), "out9-11", 48)
    child = build_model(spec)
    child.load_state_dict(sd)
    stem_bn = child.features[0][1]
    stem_bn.running_mean.fill_(100.0)
    refresh_bn(child, digits16, num_batches=1, batch_size=len(digits16.train))
    x, _ = next(batches(digits16, digits16.train, len(digits16.train)))
    with torch.no_grad():
        expected = child.features[0][0](x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(stem_bn.running_mean, expected, atol=1e-4, rtol=1e-4)
    assert stem_bn.momentum == 0.01


# --- the train command ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_command_writes_weights_and_metrics(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "small", "--data", "digits", "--epochs", "2", "--out", str(out),
                                      "--train-resolution", "16", "--batch-size", "128", "--seed", "1",
                                      "--limit", "256"])
    assert result.exit_code == 0, result.output
    state = read_state_dict(out / "weights.pt")
    assert state["classifier.3.weight"].shape[0] == 10
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"step", "lr", "train_loss", "holdout_accuracy", "images_per_s"} <= set(rows[0])
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["data"] == "digits"
    assert "num_classes: 10" in (out / "spec.yaml").read_text()
    # resume from those weights
    again = CliRunner().invoke(cli, ["train", str(out / "spec.yaml"), "--epochs", "1", "--out", str(tmp_path / "b"),
                                     "--train-resolution", "16", "--weights", str(out / "weights.pt"),
                                     "--limit", "256"])
    assert again.exit_code == 0, again.output
    resumed = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert resumed["weights_from"] == str(out / "weights.pt") and resumed["epochs"] == 1
    assert f"test accuracy {100 * resumed['test_accuracy']:.2f}% · holdout {100 * resumed['holdout_accuracy']:.2f}%" \
        in again.output and f"wrote {tmp_path / 'b'}/" in again.output
    # the same command from scratch (training is deterministic here): had --weights been ignored, the two
    # would end with identical weights
    scratch = CliRunner().invoke(cli, ["train", str(out / "spec.yaml"), "--epochs", "1", "--out",
                                       str(tmp_path / "c"), "--train-resolution", "16", "--limit", "256"])
    assert scratch.exit_code == 0, scratch.output
    a, b = read_state_dict(tmp_path / "b" / "weights.pt"), read_state_dict(tmp_path / "c" / "weights.pt")
    assert a.keys() == b.keys()
    assert not torch.equal(a["features.0.0.weight"], b["features.0.0.weight"])
    again_scratch = CliRunner().invoke(cli, ["train", str(out / "spec.yaml"), "--epochs", "1", "--out",
                                             str(tmp_path / "d"), "--train-resolution", "16", "--limit", "256"])
    assert again_scratch.exit_code == 0, again_scratch.output
    assert torch.equal(read_state_dict(tmp_path / "d" / "weights.pt")["features.0.0.weight"],
                       b["features.0.0.weight"])  # deterministic: so the difference above is the weights'


@pytest.mark.parametrize("args, message", [
    (["--data", "nope"], "unknown dataset 'nope'"),
    (["--data", "fashion-mnist:/no/such"], "/no/such: no such folder"),
    (["--weights", "/no/such.pt"], "no such checkpoint file"),
])
def test_train_command_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["train", "small", "--epochs", "1", "--out", str(tmp_path / "x")] + args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


# --- the chosen device ---------------------------------------------------------------------------------------

SPY = torch.device("cpu", 0)  # a device of a name of its own that computes on the CPU
STAGES = ("seed_network", "_start", "_evaluate", "final_training", "search")  # where in a run, innermost first
RECIPE_PARTS = ("advance", "evaluate", "holdout_metrics", "refresh_bn", "taylor_importance")


class DeviceSpy:
    """A GPU stood in for on the CPU. `cuda` resolves to SPY (cpu stays cpu); every Module.to and Tensor.to is
    recorded, and a network or tensor moved to SPY counts as there until moved elsewhere. Every forward of a
    whole network must find it and its input there (ONNX export aside, which must find it on the CPU), and
    every checkpoint and export must find no network there. What it saw of a run: `pieces`, as
    'stage/recipe part' ('_evaluate/holdout_metrics'); what was wrong: `problems`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import collections
        import weakref

        from mnv3_search import train as recipe
        from mnv3_search.model.build import MobileNetV3
        from mnv3_search.netadapt import runner
        from mnv3_search.netadapt.runfolder import RunFolder

        self.targets: set[torch.device] = set()
        self.problems: list[str] = []
        self.pieces: collections.Counter[str] = collections.Counter()
        self.on_device: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        module_to, tensor_to = torch.nn.Module.to, torch.Tensor.to
        spy = self

        def target(*args, **kwargs) -> torch.device | None:
            kwargs.pop("copy", None)
            try:
                return torch._C._nn._parse_to(*args, **kwargs)[0]
            except TypeError:
                return None

        def spy_module_to(module, *args, **kwargs):
            result = module_to(module, *args, **kwargs)
            device = target(*args, **kwargs)
            if device is not None:
                spy.targets.add(device)
                (spy.on_device.add if device == SPY else spy.on_device.discard)(module)
            return result

        def spy_tensor_to(tensor, *args, **kwargs):
            result = tensor_to(tensor, *args, **kwargs)
            device = target(*args, **kwargs)
            if device is not None:
                spy.targets.add(device)
                if device == SPY:
                    result._on_spy = True
            return result

        def check_forward(module: torch.nn.Module, args: tuple) -> None:
            if not isinstance(module, MobileNetV3):
                return
            if torch.onnx.is_in_onnx_export():
                if module in spy.on_device:
                    spy.problems.append("an ONNX export of a network on the device")
                return
            piece = spy.piece()
            spy.pieces[piece] += 1
            if module not in spy.on_device:
                spy.problems.append(f"{piece}: the network is not on the device")
            if not getattr(args[0], "_on_spy", False):
                spy.problems.append(f"{piece}: its input is not on the device")

        def none_on_device(what: str, call):
            def checked(*args, **kwargs):
                if len(spy.on_device):
                    spy.problems.append(f"{what} while a network is on the device")
                return call(*args, **kwargs)
            return checked

        monkeypatch.setattr(torch.nn.Module, "to", spy_module_to)
        monkeypatch.setattr(torch.Tensor, "to", spy_tensor_to)
        real_resolve = recipe.resolve_device

        def resolve(device: str | torch.device | None = None) -> torch.device:  # cuda is the spy's
            if isinstance(device, torch.device):
                return device
            name = device or os.environ.get(recipe.DEVICE_ENV) or "cpu"
            return SPY if name == "cuda" else real_resolve(name)

        monkeypatch.setattr(recipe, "resolve_device", resolve)
        monkeypatch.setattr(recipe, "device_of",
                            lambda model: SPY if model in spy.on_device else torch.device("cpu"))
        monkeypatch.setattr(RunFolder, "save", staticmethod(none_on_device("a checkpoint", RunFolder.save)))
        monkeypatch.setattr(runner, "export_onnx", none_on_device("an ONNX export", runner.export_onnx))
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(check_forward)

    @staticmethod
    def piece() -> str:
        import sys

        names, frame = [], sys._getframe(1)
        while frame is not None:
            names.append(frame.f_code.co_name)
            frame = frame.f_back
        part = next((n for n in names if n in RECIPE_PARTS), "?")
        stage = next((n for n in names if n in STAGES), "?")
        return f"{stage}/{part}"

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture
def device_spy(monkeypatch: pytest.MonkeyPatch):
    spy = DeviceSpy(monkeypatch)
    yield spy
    spy.close()


NETADAPT_PIECES = {"seed_network/advance", "seed_network/evaluate", "seed_network/holdout_metrics",
                   "_start/refresh_bn", "_evaluate/advance", "_evaluate/holdout_metrics", "final_training/advance",
                   "final_training/evaluate"}
KNAPSACK_PIECES = {"seed_network/advance", "seed_network/evaluate", "seed_network/holdout_metrics",
                   "search/taylor_importance", "final_training/advance", "final_training/evaluate"}


@pytest.mark.slow
@pytest.mark.parametrize("method,final,pieces", [("netadapt", "retrain", NETADAPT_PIECES),
                                                 ("knapsack", "fine-tune", KNAPSACK_PIECES)])
def test_a_run_on_a_device_trains_and_scores_everything_there(method: str, final: str, pieces: set[str],
                                                              device_spy: DeviceSpy, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`--device` reaches every training and scoring of a run: seed training and its holdout score, BN refresh
    and the fine-tunes and scores of proposals (or Taylor importance), the final training and its test score;
    checkpoints and the ONNX export get the network back on the CPU."""
    from mnv3_search.train import DEVICE_ENV
    from support.tiny_run import MICRO_SPEC_PATH

    monkeypatch.setenv(DEVICE_ENV, "cpu")  # --device sets it for worker processes: put back afterwards
    result = CliRunner().invoke(cli, ["netadapt", str(MICRO_SPEC_PATH), "--budget", "1.3M-macs", "--method",
                                      method, "--final", final, "--device", "cuda", "--limit", "240",
                                      "--batch-size", "32", "--short-steps", "8", "--seed-epochs", "1",
                                      "--long-epochs", "1", "--quiet", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert device_spy.problems == []
    assert set(device_spy.pieces) == pieces
    assert device_spy.targets == {SPY, torch.device("cpu")}  # the device, and the CPU to come back to


def test_the_device_spy_catches_a_piece_that_ignores_the_device(device_spy: DeviceSpy, small: ArchSpec,
                                                                digits16, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spy has teeth: a scorer that leaves the network or its batches on the CPU is reported."""
    from contextlib import contextmanager

    from mnv3_search import train as recipe
    from mnv3_search.train import DEVICE_ENV, holdout_metrics

    monkeypatch.setenv(DEVICE_ENV, "cuda")
    model = build_model(_small10(small))
    holdout_metrics(model, digits16)
    assert device_spy.problems == [] and device_spy.pieces == {"?/holdout_metrics": 1}
    assert model not in device_spy.on_device  # back on the CPU

    @contextmanager
    def stays(model, device=None):  # a scorer that forgets to move the network
        yield recipe.resolve_device(device)

    placed = recipe.placed
    monkeypatch.setattr(recipe, "placed", stays)
    holdout_metrics(model, digits16)
    assert device_spy.problems == ["?/holdout_metrics: the network is not on the device"]
    device_spy.problems.clear()
    with torch.no_grad(), placed(model):  # a network moved, its batch left behind
        model(next(batches(digits16, digits16.holdout, 8))[0])
    assert device_spy.problems == ["?/?: its input is not on the device"]
