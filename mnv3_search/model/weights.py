"""Reading and writing checkpoints safely (weights_only) and checking they fit a spec before loading.

Accepts a bare state_dict (torchvision's format) or this tool's own checkpoint, a dict holding the
state_dict and the spec's YAML so the file says what network it belongs to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Union

import torch
import yaml
from torch import nn

from ..errors import CheckpointError
from ..fileio import PathLike, atomic_path
from ..spec.arch import ArchSpec
from ..spec.yaml_io import spec_from_dict, spec_to_yaml

CHECKPOINT_FORMAT = "mnv3-search/1"


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Load a checkpoint with torch.load(weights_only=True) and return its state_dict."""
    source = str(path)
    if not Path(path).is_file():
        raise CheckpointError(f"{source}: no such checkpoint file; pass --weights PATH to a .pt/.pth file")
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{source}: not a readable PyTorch weights file ({first[:200]})") from None
    if isinstance(data, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{source}: holds no state_dict (a mapping of parameter names to tensors)")
    return dict(data)


def check_fits(state_dict: Mapping[str, torch.Tensor], expected: Union[nn.Module, Mapping[str, tuple[int, ...]]],
               source: str, spec_name: str) -> None:
    """Raise one clear line for the first missing, unexpected or mis-shaped tensor.

    `expected` is the model the weights are for, or its state_dict's shapes by key."""
    if isinstance(expected, nn.Module):
        expected = {key: tuple(t.shape) for key, t in expected.state_dict().items()}
    for key, shape in expected.items():
        if key not in state_dict:
            raise CheckpointError(f"{source}: does not fit spec {spec_name}: tensor {key!r} is missing")
        got = tuple(state_dict[key].shape)
        if got != tuple(shape):
            raise CheckpointError(
                f"{source}: does not fit spec {spec_name}: tensor {key!r} has shape {got} in the checkpoint "
                f"but the spec needs {tuple(shape)}"
            )
    extra = [key for key in state_dict if key not in expected]
    if extra:
        raise CheckpointError(
            f"{source}: does not fit spec {spec_name}: unexpected tensor {extra[0]!r} "
            f"({len(extra)} extra in all); is it a checkpoint of another network?"
        )


def load_weights(model: nn.Module, path: PathLike, spec_name: str = "the spec") -> None:
    """Check then load a checkpoint into `model` with strict=True."""
    state_dict = read_state_dict(path)
    check_fits(state_dict, model, str(path), spec_name)
    model.load_state_dict(state_dict, strict=True)


def save_state(state_dict: Mapping[str, torch.Tensor], spec: ArchSpec, path: PathLike) -> None:
    """Write a state_dict together with the spec's YAML, atomically."""
    payload = {"format": CHECKPOINT_FORMAT, "spec_yaml": spec_to_yaml(spec), "state_dict": dict(state_dict)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def save_checkpoint(model: nn.Module, spec: ArchSpec, path: PathLike) -> None:
    """Write the model's weights together with the spec's YAML, atomically."""
    save_state(model.state_dict(), spec, path)


def read_checkpoint(path: PathLike) -> tuple[ArchSpec, dict[str, torch.Tensor]]:
    """An own checkpoint: the spec it embeds and its state_dict (already checked to fit each other)."""
    data: Any = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, Mapping) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an mnv3-search checkpoint (no embedded spec)")
    spec = spec_from_dict(yaml.safe_load(data["spec_yaml"]), f"{path} (embedded spec)")
    return spec, dict(data["state_dict"])
