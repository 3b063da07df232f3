"""The shared vocabulary of the commands: one name, one meaning, one help text for every option that
several commands take (tests/cli/test_cli.py walks all commands and holds them to it).

No library imports here: `--help` must not pay for torch.
"""

from __future__ import annotations

from typing import Any, Callable

import click

# latency.BACKENDS, spelled out so that building the commands imports no torch (a test keeps them equal)
BACKEND_NAMES = ["onnxruntime", "torch", "torch-cuda", "executorch", "openvino"]
PRECISIONS = ["fp32", "int8"]
DEVICES = ["auto", "cpu", "cuda"]

RESOLUTION_HELP = "Deployment input size in pixels (latency and MACs are for this size); default: the spec's."
TRAIN_RESOLUTION_HELP = "Size the training images are resized to (independent of --resolution)."
BACKEND_HELP = ("Latency backend (torch-cuda only with a GPU; executorch and openvino with their extras: "
                "pip install 'mnv3-search[executorch]' or '[openvino]').")
PRECISION_HELP = ("fp32, or int8: post-training static quantization (latency calibrated on random inputs, which "
                  "do not change the speed; accuracy on --data training images). A table holds one precision.")
RUNNER_HELP = ("Time on a device reached by a command, e.g. 'adb shell /data/local/tmp/run {model} {runs}': the "
               "model file is written here, the command prints one run's ms a line (see docs/latency-table.md).")
RUNNER_DEVICE_HELP = "The --runner device's name (keys its table); default: the name the runner prints."
THREADS_HELP = "CPU threads (latency and training); on a small shared box keep 1: a second thread spin-waits."
BATCH_HELP = "Batch size for latency."
SEED_HELP = "Random seed (init, holdout split, batch order, sampling): the same seed repeats a run."
LIMIT_HELP = "Use at most this many training images (quick runs)."
BATCH_SIZE_HELP = "Images per training step."
LUT_HELP = ("Latency table file; default: the machine's table in $MNV3_SEARCH_LUT_DIR or "
            "~/.cache/mnv3-search/lut/ (see `mnv3-search lut show`).")
# data.SOURCES_HELP, spelled out so that building the commands imports no torch (a test keeps them equal)
DATA_HELP = "Dataset: digits, fashion-mnist[:DIR], fashion-mnist-tops[:DIR], cifar10:DIR or imagefolder:DIR."
CSV_HELP = "Write the rows as CSV to FILE ('-': stdout)."
DEVICE_HELP = "Where training runs: auto (cuda when available), cpu or cuda. Latency stays on the table's backend."
WEIGHTS_HELP = ("Checkpoint to start from (torchvision or own); one made for another class count loads all but "
                "the final layer, which starts fresh.")
HOLDOUT_HELP = ("Images set aside from the training images by --seed to score networks: a count (1000) or a "
                "fraction (0.1); default 1000, or a quarter of them when fewer than 4000. train and netadapt "
                "carve the same split, so a seed trained by `train` never saw netadapt's holdout.")


def _parse_holdout(ctx: click.Context, param: click.Parameter, text: object) -> object:
    """`1000` (images) or `0.1` (a fraction) -> int or float; None keeps the data-sized default."""
    if text is None or isinstance(text, (int, float)):
        return text
    try:
        value = float(str(text))
    except ValueError:
        raise click.BadParameter(f"{text!r}: give a number of images (1000) or a fraction (0.1)") from None
    if value <= 0:
        raise click.BadParameter(f"{text!r}: give a number of images (1000) or a fraction (0.1)")
    return int(value) if value >= 1 and value.is_integer() else value


def holdout_option(default: None = None, more_help: str = ""):
    """--holdout: a count or a fraction of the training images, in every command that carves a holdout."""
    return click.option("--holdout", type=str, default=default, metavar="N|FRACTION", callback=_parse_holdout,
                        help=HOLDOUT_HELP + more_help)


def resolution_option(default: None = None, more_help: str = ""):
    """--resolution: the deployment size, in every command that takes it."""
    return click.option("--resolution", type=click.IntRange(min=1), help=RESOLUTION_HELP + more_help,
                        **_given(default))


def train_resolution_option(more_help: str = "", default: int = 32):
    """--train-resolution: the size training images are resized to, in every command that trains or evaluates."""
    return click.option("--train-resolution", type=click.IntRange(4, 1024), default=default, show_default=True,
                        help=TRAIN_RESOLUTION_HELP + more_help)


def batch_size_option(default: int, more_help: str = ""):
    """--batch-size: images per training step; the default is the command's (train's seed runs take larger
    batches than netadapt's and explore's short fine-tunes). At least 2: BatchNorm needs more than one image."""
    return click.option("--batch-size", type=click.IntRange(min=2), default=default, show_default=True,
                        help=BATCH_SIZE_HELP + more_help)


def limit_option(default: None = None, more_help: str = ""):
    """--limit: cap on the training images, in every command that loads a dataset to train on."""
    return click.option("--limit", type=click.IntRange(min=1), help=LIMIT_HELP + more_help, **_given(default))


def backend_option(default: str = "onnxruntime", more_help: str = ""):
    return click.option("--backend", type=click.Choice(BACKEND_NAMES), default=default, show_default=True,
                        help=BACKEND_HELP + more_help)


def precision_option(default: str = "fp32", more_help: str = ""):
    """--precision: what the timed (and, with --data, scored) network computes in, in every command."""
    return click.option("--precision", type=click.Choice(PRECISIONS), default=default, show_default=True,
                        help=PRECISION_HELP + more_help)


def data_option(default: str = "digits", more_help: str = "", name: str = "data"):
    """--data: the dataset a command trains on; `name`: the function's parameter."""
    return click.option("--data", name, default=default, show_default=True, metavar="SOURCE",
                        help=DATA_HELP + more_help)


def weights_option(default: None = None, more_help: str = ""):
    """--weights: one checkpoint to start from."""
    return click.option("--weights", type=click.Path(dir_okay=False), help=WEIGHTS_HELP + more_help,
                        **_given(default))


def seed_option(default: int = 0, more_help: str = ""):
    return click.option("--seed", type=int, default=default, show_default=True, help=SEED_HELP + more_help)


def threads_option(default: int = 1, more_help: str = ""):
    return click.option("--threads", type=click.IntRange(min=1), default=default, show_default=True,
                        help=THREADS_HELP + more_help)


def lut_option(default: None = None, more_help: str = ""):
    """--lut FILE (profile and compare take --lut alone too: they keep options of their own)."""
    return click.option("--lut", type=click.Path(dir_okay=False), help=LUT_HELP + more_help, **_given(default))


def _given(default: object) -> dict[str, Any]:
    """click's own default when there is none: an option declared without one reads the same in --help."""
    return {} if default is None else {"default": default, "show_default": True}


# the options several commands share, by config field name: a config setting of one of these names
# (settings.py) becomes this option, with the field's default and its help appended (cli/settings.py)
SHARED_OPTIONS: dict[str, Callable[..., Callable[[Any], Any]]] = {
    "data": data_option, "weights": weights_option, "holdout": holdout_option, "batch_size": batch_size_option,
    "train_resolution": train_resolution_option, "resolution": resolution_option, "limit": limit_option,
    "seed": seed_option, "backend": backend_option, "precision": precision_option, "threads": threads_option,
    "lut": lut_option}


def runner_options(f):
    """--runner and --runner-device: time on a device reached by a command instead of on this machine."""
    f = click.option("--runner-device", "runner_device", metavar="NAME", help=RUNNER_DEVICE_HELP)(f)
    return click.option("--runner", metavar="'CMD {model}'", help=RUNNER_HELP)(f)


def device_option(inherit: bool = False):
    """--device; with `inherit`, no default: a local worker trains where the netadapt that started it does."""
    if inherit:
        return click.option("--device", type=click.Choice(DEVICES), default=None,
                            help=DEVICE_HELP + " Default: the starting netadapt's device, else auto.")
    return click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help=DEVICE_HELP)


def use_device(device: "str | None") -> str:
    """Check --device now (one line, exit 2, before any work) and make it the default of every training in
    this process and the worker processes it starts; returns the device training will use."""
    import os

    from ..train import DEVICE_ENV, resolve_device

    device = device or os.environ.get(DEVICE_ENV) or "auto"
    resolved = resolve_device(device)
    os.environ[DEVICE_ENV] = device
    return str(resolved)
